"""The DVC remote against a real S3 endpoint (a moto server on loopback): push, drop the
local cache, pull on a fresh clone, byte-identical; an unreachable remote fails clearly,
leaving local state intact, and a later push sends what was missing (the flows retry a push
with Prefect's task retries: tests/flows/test_publish.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tasks.remote import (
    RemoteError,
    clear_stale_temp_objects,
    configure_s3_remote,
    dvc,
    failure_cause,
    push,
)
from tests.remote_fixtures import digest, free_port, git


def test_push_then_pull_on_a_fresh_clone_is_byte_identical(
    s3: str, dvc_repo: Path, tmp_path: Path
) -> None:
    configure_s3_remote(dvc_repo, "store", "s3://xopd/cache", s3)
    assert dvc(dvc_repo, "remote", "default", "store").returncode == 0
    assert "testing" not in (dvc_repo / ".dvc" / "config").read_text()  # no credentials written
    git(dvc_repo, "commit", "-qam", "remote")
    original = digest(dvc_repo / "models" / "round1")
    summary = push(dvc_repo)
    assert summary.remote == "default"
    shutil.rmtree(dvc_repo / ".dvc" / "cache")  # the local cache is gone
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(dvc_repo), str(clone)], check=True)
    assert (
        dvc(clone, "config", "--local", "core.site_cache_dir", str(tmp_path / "s2")).returncode == 0
    )
    out = dvc(clone, "pull")
    assert out.returncode == 0, out.stderr
    assert digest(clone / "models" / "round1") == original


def test_unreachable_remote_fails_clearly_and_a_later_push_completes(
    s3: str, dvc_repo: Path, tmp_path: Path
) -> None:
    configure_s3_remote(dvc_repo, "store", "s3://xopd/retry", f"http://127.0.0.1:{free_port()}")
    workspace, cache = digest(dvc_repo / "models"), digest(dvc_repo / ".dvc" / "cache")
    with pytest.raises(RemoteError, match="failed; the local cache is unchanged") as err:
        push(dvc_repo, remote="store", timeout_s=120)
    # The real cause, not DVC's support footer.
    assert "Could not connect to the endpoint URL" in str(err.value)
    assert "dvc.org" not in str(err.value) and "unexpected error" not in str(err.value)
    assert digest(dvc_repo / "models") == workspace and digest(dvc_repo / ".dvc" / "cache") == cache
    configure_s3_remote(dvc_repo, "store", "s3://xopd/retry", s3)  # the remote is back
    assert push(dvc_repo, remote="store").remote == "store"
    status = dvc(dvc_repo, "status", "--cloud", "--remote", "store")
    assert status.returncode == 0 and "new" not in status.stdout, status.stdout


DVC_UNREACHABLE = """\
ERROR: unexpected error - Could not connect to the endpoint URL: "http://127.0.0.1:1/b/p/x"

Having any troubles? Hit us up at https://dvc.org/support, we are always happy to help!
"""
DVC_LOCAL_DENIED = """\
Collecting  |1.00 [00:00, 100entry/s]
ERROR: failed to transfer '764efa' - [Errno 13] Permission denied: '/remote/files'
ERROR: failed to push data to the cloud - 1 files failed to upload

Having any troubles? Hit us up at https://dvc.org/support, we are always happy to help!
"""


def test_a_failed_push_names_its_real_cause_without_the_support_footer() -> None:
    assert failure_cause(DVC_UNREACHABLE) == (
        'Could not connect to the endpoint URL: "http://127.0.0.1:1/b/p/x"'
    )
    assert failure_cause(DVC_LOCAL_DENIED) == (
        "failed to transfer '764efa' - [Errno 13] Permission denied: '/remote/files'"
    )
    assert failure_cause("") == "(no output)"


def test_a_killed_pushs_temp_object_is_cleared_by_the_next_push(dvc_repo: Path) -> None:
    remote = dvc_repo.parent / "remote"
    assert dvc(dvc_repo, "remote", "add", "-d", "here", str(remote)).returncode == 0
    stale = remote / "files" / "md5" / "ab" / ".Zm9vYmFyYmF6cXV4cXV1eA.tmp"
    live = stale.with_name(".bGl2ZWxpdmVsaXZlbGl2ZQ.tmp")
    stale.parent.mkdir(parents=True)
    stale.touch()  # empty, as a push killed before its first byte leaves it
    os.utime(stale, (time.time() - 3600,) * 2)
    live.write_bytes(b"x")  # written just now: perhaps another push's, in flight
    push(dvc_repo)
    assert not stale.exists() and live.exists()
    objects = [p for p in remote.rglob("*") if p.is_file() and p != live]
    assert objects and all(p.stat().st_size > 0 for p in objects)
    assert clear_stale_temp_objects(remote, grace_s=0) == [live]
