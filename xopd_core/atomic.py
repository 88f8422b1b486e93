"""Atomic file and directory writes: a reader sees the old artifact or the new one, never half.

Files go to a temporary sibling, are fsync'ed, then os.replace'd into place. Directories are
built in a temporary sibling and swapped in; the previous version is removed only after the
swap succeeded, so a failure at any point leaves the good artifact where it was.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Standard JSON only: a NaN or an infinity is refused (ValueError naming the key), since
    Python's bare `NaN`/`Infinity` are not JSON and other readers reject the file."""
    try:
        text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ValueError(
            f"{path}: refusing to write a non-finite number ({_non_finite_key(obj)}) as JSON"
        ) from None
    write_text_atomic(path, text + "\n")


def _non_finite_key(obj: Any, at: str = "<top>") -> str:
    """Where the first NaN/infinity in `obj` sits, as `key.subkey.0 = nan`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return f"{at} = {obj}"
    items: Any = ()
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    for k, v in items:
        found = _non_finite_key(v, str(k) if at == "<top>" else f"{at}.{k}")
        if found:
            return found
    return ""


def _owner_alive(leftover: Path, marker: str) -> bool:
    """Is the process that made `leftover` (named `.<name>.<marker><pid>-<random>`) alive?"""
    pid = leftover.name.partition(marker)[2].partition("-")[0]
    if not pid.isdigit():
        return False  # a name from before pids were recorded: its writer is long gone
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale_leftovers(path: Path) -> None:
    """Remove what a killed writer of `path` left beside it: its staging folders (a synth
    killed mid-way leaves hundreds of MB), and, where a crash fell between the two renames
    of a swap, put the previous version back instead of losing it."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for marker in (".staging-", ".old-"):
        for leftover in sorted(path.parent.glob(f".{glob.escape(path.name)}{marker}*")):
            if _owner_alive(leftover, marker):
                continue
            if marker == ".old-" and not path.exists():
                os.replace(leftover, path)  # the only whole copy: restore it
            else:
                shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on clean exit it replaces `path` as a whole.

    On an exception the staging directory is deleted and `path` is left untouched. What an
    earlier, killed writer of `path` left behind is cleared first (`clear_stale_leftovers`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale_leftovers(path)
    pid = os.getpid()
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.staging-{pid}-", dir=path.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{pid}-", dir=path.parent))
        os.rmdir(old)
        os.replace(path, old)
    try:
        os.replace(staging, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
