"""The DVC remote against a real S3 endpoint (a moto server on loopback): push, drop the
local cache, pull on a fresh clone, byte-identical; an unreachable remote is retried and
fails clearly, leaving local state intact, and a later push sends what was missing."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on loopback with a bucket `xopd`; dummy credentials in the env."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }.items():
            env.setenv(key, value)
        yield from _moto()


def _moto() -> Iterator[str]:
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "moto did not start"
            time.sleep(0.2)
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="xopd")  # no region: moto
    yield endpoint
    proc.terminate()
    proc.wait(10)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def repo(tmp_path: Path) -> Path:
    """A git + DVC repository tracking a checkpoint-like folder."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q")
    git(root, "config", "user.email", "ci@example.invalid")
    git(root, "config", "user.name", "ci")
    assert dvc(root, "init", "-q").returncode == 0
    assert dvc(root, "config", "core.site_cache_dir", str(tmp_path / "site")).returncode == 0
    assert dvc(root, "config", "core.analytics", "false").returncode == 0
    model = root / "models" / "round1"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(os.urandom(200_000))
    (model / "xopd.json").write_text('{"round": 1}\n')
    out = dvc(root, "add", "models/round1")
    assert out.returncode == 0, out.stderr
    git(root, "add", "-A")
    git(root, "commit", "-qm", "round 1")
    return root


def test_push_then_pull_on_a_fresh_clone_is_byte_identical(
    s3: str, repo: Path, tmp_path: Path
) -> None:
    configure_s3_remote(repo, "store", "s3://xopd/cache", s3)
    assert dvc(repo, "remote", "default", "store").returncode == 0
    assert "testing" not in (repo / ".dvc" / "config").read_text()  # no credentials written
    git(repo, "commit", "-qam", "remote")
    original = digest(repo / "models" / "round1")
    summary = push(repo, backoff_s=0.1)
    assert summary.attempts == 1
    shutil.rmtree(repo / ".dvc" / "cache")  # the local cache is gone
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    assert (
        dvc(clone, "config", "--local", "core.site_cache_dir", str(tmp_path / "s2")).returncode == 0
    )
    out = dvc(clone, "pull")
    assert out.returncode == 0, out.stderr
    assert digest(clone / "models" / "round1") == original


def test_unreachable_remote_is_retried_fails_clearly_and_a_later_push_completes(
    s3: str, repo: Path, tmp_path: Path
) -> None:
    configure_s3_remote(repo, "store", "s3://xopd/retry", f"http://127.0.0.1:{free_port()}")
    workspace, cache = digest(repo / "models"), digest(repo / ".dvc" / "cache")
    start = time.monotonic()
    with pytest.raises(RemoteError, match="failed 3 times; the local cache is unchanged") as err:
        push(repo, remote="store", attempts=3, backoff_s=0.2, timeout_s=120)
    # The real cause, not DVC's support footer.
    assert "Could not connect to the endpoint URL" in str(err.value)
    assert "dvc.org" not in str(err.value) and "unexpected error" not in str(err.value)
    assert time.monotonic() - start >= 0.2 + 0.4  # it backed off between attempts
    assert digest(repo / "models") == workspace and digest(repo / ".dvc" / "cache") == cache
    configure_s3_remote(repo, "store", "s3://xopd/retry", s3)  # the remote is back
    assert push(repo, remote="store", backoff_s=0.1).attempts == 1
    status = dvc(repo, "status", "--cloud", "--remote", "store")
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


def test_a_killed_pushs_temp_object_is_cleared_by_the_next_push(repo: Path) -> None:
    remote = repo.parent / "remote"
    assert dvc(repo, "remote", "add", "-d", "here", str(remote)).returncode == 0
    stale = remote / "files" / "md5" / "ab" / ".Zm9vYmFyYmF6cXV4cXV1eA.tmp"
    live = stale.with_name(".bGl2ZWxpdmVsaXZlbGl2ZQ.tmp")
    stale.parent.mkdir(parents=True)
    stale.touch()  # empty, as a push killed before its first byte leaves it
    os.utime(stale, (time.time() - 3600,) * 2)
    live.write_bytes(b"x")  # written just now: perhaps another push's, in flight
    push(repo, backoff_s=0.1)
    assert not stale.exists() and live.exists()
    objects = [p for p in remote.rglob("*") if p.is_file() and p != live]
    assert objects and all(p.stat().st_size > 0 for p in objects)
    assert clear_stale_temp_objects(remote, grace_s=0) == [live]
