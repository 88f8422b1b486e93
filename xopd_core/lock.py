"""An exclusive lock on a work folder, so two runs never write the same outputs.

`filelock`'s `FileLock` (`flock` on Unix: released by the kernel when the holder exits, so a
crashed run leaves no stale lock). The holder writes who it is (pid, since when, what) into
the lock file; filelock opens the file without truncating it, so a run that waits past
`timeout_s` stops with a message naming the holder.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout


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
    lock = FileLock(path, timeout=timeout_s, poll_interval=0.2)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = path.read_text(errors="replace")[:200].strip() or "unknown"
        except FileNotFoundError:
            holder = "unknown"
        raise Busy(f"another {what} holds {path} ({holder}); waited {timeout_s:.0f} s") from None
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        with path.open("r+") as f:  # the holder's note; the lock stays on filelock's descriptor
            f.truncate()
            f.write(f"pid {os.getpid()} since {since}, {note or what}")
        yield
    finally:
        lock.release()
