"""The end of every run that changed rounds: report, record in DVC, lineage, push.

- report: `reports/rounds.json` (the rounds' DVC metrics), `reports/campaign.md`, the plots;
- record: `dvc commit` of the stages the run wrote, only when the run's params are
  params.yaml's (otherwise dvc.lock would claim outputs for params that did not make them);
- lineage (nightly): a commit on `nightly.lineage_branch` for each promoted round;
- push: after a promotion, or while an earlier push is still owed (`.xopd.push-pending`),
  `dvc push` to the default remote with retries; a push that still fails leaves the marker,
  fails the run with the remote's error, and the next run pushes what is missing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.logging import get_run_logger
from prefect.runtime import task_run

from tasks.layout import PUSH_PENDING
from tasks.record import (
    commit_lineage,
    default_remote,
    is_dvc_repo,
    not_recorded_advice,
    params_in_sync,
    record,
)
from tasks.remote import RemoteError, push
from tasks.report import report
from tasks.rounds import write_rounds_metrics
from tasks.stages import needed
from xopd_core.config import Params

PUSH_RETRY_DELAYS_S = [2.0, 4.0, 8.0]  # up to 4 attempts, backing off between them


@task(name="dvc-push", retries=len(PUSH_RETRY_DELAYS_S), retry_delay_seconds=PUSH_RETRY_DELAYS_S)
def dvc_push(root: Path) -> tuple[str, int]:
    """`dvc push` to the default remote, retried by Prefect; the remote and the attempt
    that went through."""
    summary = push(root)
    return summary.remote, int(task_run.run_count)


@task(name="report")
def report_step(root: Path) -> dict[str, Any]:
    write_rounds_metrics(root)
    start = time.perf_counter()
    summary = report(root)  # the `report` stage's function
    seconds = time.perf_counter() - start
    create_markdown_artifact(key="campaign", markdown=summary.table, description="xopd rounds")
    plots = [str(p) for p in summary.plots]
    return {"table": summary.table, "plots": plots, "report_seconds": seconds}


@task(name="record")
def record_step(params: Params, root: Path, *, one_round: bool = False) -> bool:
    """Write dvc.lock for what is on disk; False, and a warning saying what to run, when it
    would not be true. `one_round`: the run trained one round (round, nightly)."""
    log = get_run_logger()
    if not is_dvc_repo(root):
        log.info("%s is not a DVC repository: nothing recorded", root)
        return False
    if not params_in_sync(root, params):
        log.warning(not_recorded_advice(root, params, one_round=one_round))
        return False
    # Named: with no targets dvc would also commit study/dvc.yaml's, and the mini world's
    # builders when `inputs` point elsewhere (their outputs are then not there).
    stages = needed(params, root)
    record(root, list(stages))
    log.info("recorded in %s (dvc commit %s)", root / "dvc.lock", " ".join(stages))
    return True


@task(name="lineage")
def lineage_step(root: Path, branch: str, k: int) -> str:
    sha = commit_lineage(root, branch, f"xopd nightly: round {k} (promoted)")
    get_run_logger().info("lineage of round %d: %s on %s", k, sha[:12], branch)
    return sha


@task(name="push")
def push_step(root: Path) -> str:
    marker = root / PUSH_PENDING
    owed = marker.exists()
    marker.touch()  # cleared only once a push has gone through
    try:
        remote, attempts = dvc_push(root)
    except RemoteError as err:
        raise RemoteError(
            f"{err} (after {len(PUSH_RETRY_DELAYS_S) + 1} attempts; promotion recorded "
            f"locally; {marker} marks the push owed)"
        ) from err
    marker.unlink()
    what = f"the data owed since an earlier run ({PUSH_PENDING}) " if owed else ""
    return f"pushed {what}to {remote} in {attempts} attempt(s)"


def push_owed(root: Path) -> str | None:
    """Push what an earlier run could not (`.xopd.push-pending`), for a run that found
    everything up to date; None when nothing is owed."""
    if (root / PUSH_PENDING).exists() and is_dvc_repo(root) and default_remote(root):
        return str(push_step(root))
    return None


def publish(
    params: Params,
    root: Path,
    promoted: bool,
    *,
    lineage_round: int | None = None,
    one_round: bool = False,
) -> dict[str, Any]:
    """Report, then record; for nightly rounds the lineage; push when owed. `one_round`: the
    run trained a single round (what to advise when it cannot be recorded)."""
    out = report_step(root)
    recorded = record_step(params, root, one_round=one_round)
    out["recorded"] = recorded
    if lineage_round is not None and recorded:
        out["lineage"] = lineage_step(root, params.nightly.lineage_branch, lineage_round)
    if recorded and (promoted or (root / PUSH_PENDING).exists()) and default_remote(root):
        out["push"] = push_step(root)
    return out
