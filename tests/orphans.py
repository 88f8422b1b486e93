"""Does a process's child outlive it when the process is SIGKILLed (the OOM killer's way, no
clean-up)? Shared by the tests of the forked ranks and the Prefect server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for a reaper counts: it runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def child_outlives_a_killed_parent(code: str, env: dict[str, str] | None = None) -> bool:
    """Run `code` in a fresh Python at the repository root; it starts a child, prints the
    child's pid and waits. SIGKILL the parent and give the child 20 s to go."""
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        assert not gone(child), "the child was not running before its parent was killed"
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 20
        while not gone(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        return not gone(child)
    finally:
        if not gone(child):
            os.kill(child, signal.SIGKILL)
