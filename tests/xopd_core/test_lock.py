"""The work-folder lock: a second holder waits, then fails clearly; a dead holder frees it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from xopd_core.lock import Busy, exclusive

HOLD = """
import sys, time
from xopd_core.lock import exclusive
with exclusive(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def hold_in_another_process(path: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_waits_then_fails_naming_the_holder(tmp_path: Path) -> None:
    lock = tmp_path / ".xopd.lock"
    proc = hold_in_another_process(lock, 30)
    try:
        start = time.monotonic()
        with (
            pytest.raises(Busy, match=rf"another nightly run holds .*\(pid {proc.pid} since"),
            exclusive(lock, timeout_s=1.0, what="nightly run"),
        ):
            pass
        assert time.monotonic() - start >= 1.0
    finally:
        proc.kill()
        proc.wait()
    with exclusive(lock, timeout_s=0):  # the killed holder's lock went with it
        pass


def test_waiting_run_gets_the_lock_when_the_first_finishes(tmp_path: Path) -> None:
    lock = tmp_path / ".xopd.lock"
    proc = hold_in_another_process(lock, 1.5)
    start = time.monotonic()
    with exclusive(lock, timeout_s=30):
        waited = time.monotonic() - start
    proc.wait()
    assert 1.0 < waited < 30  # it waited for the holder, then got in
