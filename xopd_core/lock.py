"""An exclusive lock on a work folder, so two runs never write the same outputs.

`flock` on a lock file: held per open file, released by the kernel when the holder exits
(a crashed run leaves no stale lock). The second run waits up to `timeout_s`, then stops
with a message naming the holder (its pid, since when, and what it is, written in the file).
Not the `filelock` package: it truncates the lock file on open, which would erase the
holder's note before a waiter could read it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


class Busy(RuntimeError):
    """Another run holds the lock."""


@contextlib.contextmanager
def exclusive(
    path: Path, *, timeout_s: float = 0.0, what: str = "run", note: str | None = None
) -> Iterator[None]:
    """Hold `path`'s lock inside the block. `what`: how a refusal names the holder ("another
    <what> holds …"); `note`: what this holder writes about itself (default `what`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    raise Busy(
                        f"another {what} holds {path} ({holder}); waited {timeout_s:.0f} s"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} since {since}, {note or what}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
