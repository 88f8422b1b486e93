"""Prefect flow `xopd-study`: the study (tasks/study.py) on a work folder laid out like the repo.

Orchestration only: round 0's evaluation, one task per (method, seed) run, then the table and
plots — the functions that `xopd study`, `make study` and the `study` stage of dvc.yaml run.
Holds the work folder's lock. A rerun reuses every run already recorded with the same params,
so a retried task or a rerun flow continues where the last one stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tasks.layout import LOCK
from tasks.study import StudyPaths, eval_round0, run_method, write_study
from xopd_core.config import Params
from xopd_core.lock import exclusive


@task(name="study-round0")
def round0_step(params: Params, paths: StudyPaths) -> dict[str, Any]:
    return eval_round0(params, paths)


# A retry resumes the run from the trainer's state folder and the snapshots it saved.
@task(name="study-run", task_run_name="{name}-seed{seed}", retries=1, retry_delay_seconds=5)
def run_step(params: Params, paths: StudyPaths, name: str, seed: int) -> dict[str, Any]:
    (arm,) = [m for m in params.study.methods if m.name == name]
    return run_method(params, paths, arm, seed)


@task(name="study-report")
def report_step(
    params: Params,
    paths: StudyPaths,
    round0: dict[str, Any],
    runs: list[dict[str, Any]],
    seconds: float,
) -> dict[str, Any]:
    summary = write_study(params, paths, round0, runs, seconds)
    return {"table": summary.table, "plots": [str(p) for p in summary.plots]}


@flow(name="xopd-study")
def xopd_study(params: Params, workdir: str = ".") -> dict[str, Any]:
    """Every arm of `study.methods` × `study.seeds` from `models/student` at the same token
    budget; returns the table, the plots' paths and the wall time in seconds."""
    root = Path(workdir)
    paths = StudyPaths.of(params, root)
    start = time.perf_counter()
    with exclusive(root / LOCK, what="xopd study"):
        round0 = round0_step(params, paths)
        runs = [
            run_step(params, paths, arm.name, seed)
            for arm in params.study.methods
            for seed in params.study.seeds
        ]
        out = report_step(params, paths, round0, runs, time.perf_counter() - start)
    create_markdown_artifact(
        key="study", markdown=out["table"], description="xopd study: methods at an equal budget"
    )
    return {**out, "seconds": time.perf_counter() - start}
