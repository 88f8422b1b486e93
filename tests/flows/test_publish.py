"""The push at the end of a run: Prefect's task retries carry a push through a remote that
comes back, and a remote that stays down fails the run clearly with the push marked owed."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from flows import publish
from tasks.layout import PUSH_PENDING
from tasks.remote import RemoteError, configure_s3_remote, dvc
from tests.remote_fixtures import digest, free_port


def test_a_failed_push_is_retried_until_the_remote_is_back(
    prefect_server, s3: str, dvc_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_s3_remote(dvc_repo, "store", "s3://xopd/retry", f"http://127.0.0.1:{free_port()}")
    assert dvc(dvc_repo, "remote", "default", "store").returncode == 0
    real_push, calls = publish.push, list[float]()

    def remote_back_on_the_third_try(root: Path):  # type: ignore[no-untyped-def]
        calls.append(time.monotonic())
        if len(calls) == 3:
            configure_s3_remote(dvc_repo, "store", "s3://xopd/retry", s3)
        return real_push(root)

    monkeypatch.setattr(publish, "push", remote_back_on_the_third_try)
    remote, attempts = publish.dvc_push.with_options(retry_delay_seconds=[0.5, 0.5, 0.5])(dvc_repo)
    assert (remote, attempts, len(calls)) == ("default", 3, 3)
    assert all(b - a >= 0.5 for a, b in itertools.pairwise(calls))  # it waited
    status = dvc(dvc_repo, "status", "--cloud")
    assert status.returncode == 0 and "new" not in status.stdout, status.stdout


def test_a_remote_that_stays_down_fails_the_push_and_marks_it_owed(
    prefect_server, aws_env: None, dvc_repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configure_s3_remote(dvc_repo, "store", "s3://xopd/down", f"http://127.0.0.1:{free_port()}")
    assert dvc(dvc_repo, "remote", "default", "store").returncode == 0
    cache = digest(dvc_repo / ".dvc" / "cache")
    fast = publish.dvc_push.with_options(retry_delay_seconds=[0.1, 0.1, 0.1])
    monkeypatch.setattr(publish, "dvc_push", fast)
    with pytest.raises(RemoteError, match=r"Could not connect.*after 4 attempts.*push owed"):
        publish.push_step(dvc_repo)
    assert (dvc_repo / PUSH_PENDING).exists() and digest(dvc_repo / ".dvc" / "cache") == cache
