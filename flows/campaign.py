"""Prefect flow `xopd-campaign`: what `make run` runs. Bootstrap the mini world where it is
missing or stale, then N X-OPD rounds (`campaign.rounds`), then report, record in DVC and push.

Orchestration only: each step calls the same stage function as the matching `dvc.yaml` stage.
In a DVC repository, whether a step runs is DVC's own answer (`dvc status <stage>`, asked
just before it), so a second run, or a `dvc repro` after it, does nothing. Elsewhere a step
runs when its output is missing or an earlier step rebuilt something.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow, get_run_logger, task

from flows.publish import publish, push_owed
from flows.round import eval_step, gate_step, validate_step, xopd_round
from tasks.layout import (
    CAMPAIGN_TABLE,
    CHAMPION,
    DATA,
    LOCK,
    ROUND_REPORTS,
    ROUNDS,
    ROUNDS_METRICS,
    STUDENT,
    STUDENT_METRICS,
    TEACHER,
    TEACHER_METRICS,
    VALIDATE,
    round_checkpoint,
    round_eval,
    round_gate,
)
from tasks.record import is_dvc_repo, stage_changes
from tasks.stages import stage_params
from tasks.student import student
from tasks.synth import synth
from tasks.teacher import teacher
from xopd_core.config import Params, load_params
from xopd_core.lock import exclusive

T = TypeVar("T")


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    start = time.perf_counter()
    return fn(*args), time.perf_counter() - start


@task(name="synth")
def synth_step(params: Params, root: Path) -> float:
    return _timed(synth, params, root / DATA)[1]


@task(name="teacher")
def teacher_step(params: Params, root: Path) -> float:
    return _timed(teacher, params, root / DATA, root / TEACHER, root / TEACHER_METRICS)[1]


@task(name="student")
def student_step(params: Params, root: Path) -> float:
    args = (params, root / DATA, root / TEACHER, root / STUDENT, root / STUDENT_METRICS)
    return _timed(student, *args)[1]


def _present(root: Path, stage: str, rounds: int) -> bool:
    """Without DVC: is the stage's output on disk?"""
    if stage == "synth":
        return (root / DATA / "manifests").is_dir()
    if stage in ("teacher", "student"):
        return (root / (TEACHER if stage == "teacher" else STUDENT) / "model.safetensors").is_file()
    if stage == "eval":
        return (round_eval(root, 0) / "metrics.json").is_file()
    if stage == "rounds":
        return all(
            (round_checkpoint(root, k) / "model.safetensors").is_file()
            and round_gate(root, k).is_file()
            for k in range(1, rounds + 1)
        )
    if stage == "validate":
        return (root / VALIDATE / "metrics.json").is_file()
    return False  # the report is cheap and always re-made


def changed_groups(root: Path, params: Params) -> set[str]:
    """The param groups in which the run's params differ from the work folder's params.yaml
    (a run started from the UI with edited params)."""
    path = root / "params.yaml"
    if not path.is_file():
        return set()
    on_disk = load_params(path)
    return {g for g in type(params).model_fields if getattr(params, g) != getattr(on_disk, g)}


def due(root: Path, stage: str, ran: list[str], rounds: int, changed: set[str]) -> bool:
    """Must `stage` run now? When the run's params for it differ from params.yaml, yes. In a
    DVC repository DVC decides (`dvc status <stage>` compares its deps, params and outputs
    with dvc.lock, so an upstream stage that just rebuilt makes it stale); elsewhere, when its
    output is missing or an earlier stage rebuilt something."""
    if changed & set(stage_params(stage)):
        return True
    if is_dvc_repo(root):
        return bool(stage_changes(root, stage))
    return any(s != "validate" for s in ran) or not _present(root, stage, rounds)


def _clear_rounds(root: Path) -> None:
    """What `dvc repro` removes before the rounds stage: earlier rounds and their champion.
    A round's resume state (`round<k>.state`, left by a run that was stopped) is kept, so the
    next run continues that round; the trainer refuses it unless it was written from the
    same starting weights, params and step budget it would use now."""
    rounds = root / ROUNDS
    if rounds.is_dir():
        for path in rounds.iterdir():
            if path.is_dir() and path.name.endswith(".state"):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    shutil.rmtree(root / ROUND_REPORTS, ignore_errors=True)
    for path in (root / CHAMPION, root / ROUNDS_METRICS):
        path.unlink(missing_ok=True)


@flow(name="xopd-campaign")
def xopd_campaign(params: Params, workdir: str = ".") -> dict[str, Any]:
    """Bootstrap where needed, `campaign.rounds` rounds each from the previous one, report.
    Returns which steps ran, each round's decision, the table and the stage functions' own
    seconds (for the orchestration-overhead figure)."""
    root = Path(workdir)
    n = params.campaign.rounds
    seconds: dict[str, float] = {}
    with exclusive(root / LOCK, what="xopd run"):
        ran: list[str] = []
        changed = changed_groups(root, params)

        log = get_run_logger()

        def step(stage: str) -> bool:
            if due(root, stage, ran, n, changed):
                log.info("%s: running", stage)
                ran.append(stage)
                return True
            log.info("%s: up to date, skipped", stage)
            return False

        if step("synth"):
            seconds["synth"] = synth_step(params, root)
        if step("validate"):
            seconds["validate"] = validate_step(params, root, root / VALIDATE)["seconds"]
        if step("teacher"):
            seconds["teacher"] = teacher_step(params, root)
        if step("student"):
            seconds["student"] = student_step(params, root)
        if step("eval"):
            seconds["eval"] = eval_step(params, root, 0)["seconds"]
        promoted: list[bool] = []
        if step("rounds"):
            _clear_rounds(root)
            promoted.append(gate_step(params, root, 0)["promoted"])  # the first champion
            for k in range(1, n + 1):
                r = xopd_round(
                    params=params,
                    round=k,
                    workdir=workdir,
                    lock=False,
                    check_data=False,
                    record=False,
                )
                promoted.append(r["promoted"])
                for name, s in r["seconds"].items():
                    seconds[name] = seconds.get(name, 0.0) + s
        if ran:
            ran.append("report")
            out = publish(params, root, any(promoted))
            seconds["report"] = out.pop("report_seconds")
        else:  # nothing was stale: the recorded results stand, but a push may be owed
            out = {"table": (root / CAMPAIGN_TABLE).read_text(), "recorded": True}
            pushed = push_owed(root)
            if pushed is not None:
                out["push"] = pushed
    # `rounds`: each gate decision, round 0 (the bootstrapped student) first.
    return {"ran": ran, "rounds": promoted, "seconds": seconds, **out}
