"""A moto S3 server on loopback and a git + DVC repository, for the remote's tests
(tests/tasks/test_remote.py) and the push's retries (tests/flows/test_publish.py); the
fixtures are registered in tests/conftest.py."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.remote import dvc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def aws_env() -> Iterator[None]:
    """Dummy credentials in the env, and one connection attempt per request: botocore's
    own retries with back-off make a push to a closed port take ~10 s, and xopd's retries
    are Prefect's (flows/publish.py), not botocore's."""
    with pytest.MonkeyPatch.context() as env:
        for key, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_MAX_ATTEMPTS": "1",
        }.items():
            env.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def s3(aws_env: None) -> Iterator[str]:
    """A moto S3 server on loopback with a bucket `xopd`."""
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
def dvc_repo(tmp_path: Path) -> Path:
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
