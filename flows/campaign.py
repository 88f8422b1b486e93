"""Prefect flow `xopd-campaign`: what `make run` runs. Bootstrap the mini world where it is
missing or stale (unless `inputs` name your own data and models), then N X-OPD rounds
(`campaign.rounds`), then report, record in DVC and push.

Orchestration only: the stages are dvc.yaml's, in its order, and each step calls the function
`xopd stage NAME` calls (tasks/<name>.py `run`; the rounds as one subflow a round). In a DVC
repository, whether a step runs is DVC's own answer (`dvc status <stage>`, asked
just before it), so a second run, or a `dvc repro` after it, does nothing. Elsewhere a step
runs when its output is missing or an earlier step rebuilt something.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.publish import publish, push_owed
from flows.round import gate_step, xopd_round
from tasks.layout import CAMPAIGN_TABLE, CHAMPION, LOCK, ROUND_REPORTS, ROUNDS, ROUNDS_METRICS
from tasks.record import is_dvc_repo, stage_changes
from tasks.stages import Stage, built, needed, pipeline_of, runner
from xopd_core.config import Params, load_params
from xopd_core.lock import exclusive


@task(task_run_name="{name}")
def stage_step(name: str, params: Params, root: Path) -> float:
    """Stage `name`'s function (tasks/<name>.py `run`), as `xopd stage NAME` runs it; its
    seconds."""
    start = time.perf_counter()
    get_run_logger().info("%s: %s", name, runner(name)(params, root))
    return time.perf_counter() - start


def changed_groups(root: Path, params: Params) -> set[str]:
    """The param groups in which the run's params differ from the work folder's params.yaml
    (a run started from the UI with edited params)."""
    path = root / "params.yaml"
    if not path.is_file():
        return set()
    on_disk = load_params(path)
    return {g for g in type(params).model_fields if getattr(params, g) != getattr(on_disk, g)}


def due(root: Path, stage: Stage, ran: list[str], params: Params, changed: set[str]) -> bool:
    """Must `stage` run now? When the run's params for it differ from params.yaml, yes. In a
    DVC repository DVC decides (`dvc status <stage>` compares its deps, params and outputs
    with dvc.lock, so an upstream stage that just rebuilt makes it stale); elsewhere, when its
    output is missing or an earlier stage rebuilt something."""
    if changed & set(stage.params):
        return True
    if is_dvc_repo(root):
        return bool(stage_changes(root, stage.name))
    return any(s != "validate" for s in ran) or not built(stage, params, root)


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


def _rounds(params: Params, root: Path, seconds: dict[str, float]) -> list[bool]:
    """The rounds stage as Prefect subflows: the first champion (round 0), then each round
    from the previous one; each gate decision, round 0's first."""
    _clear_rounds(root)
    promoted = [gate_step(params, root, 0)["promoted"]]
    for k in range(1, params.campaign.rounds + 1):
        r = xopd_round(
            params=params, round=k, workdir=str(root), lock=False, check_data=False, record=False
        )
        promoted.append(r["promoted"])
        for name, s in r["seconds"].items():
            seconds[name] = seconds.get(name, 0.0) + s
    return promoted


@flow(name="xopd-campaign")
def xopd_campaign(params: Params, workdir: str = ".") -> dict[str, Any]:
    """Bootstrap where needed, `campaign.rounds` rounds each from the previous one, report.
    Returns which steps ran, each round's decision, the table and the stage functions' own
    seconds (for the orchestration-overhead figure)."""
    root = Path(workdir)
    seconds: dict[str, float] = {}
    with exclusive(root / LOCK, what="xopd run"):
        ran: list[str] = []
        changed = changed_groups(root, params)

        log = get_run_logger()

        promoted: list[bool] = []
        # dvc.yaml's stages in its order, those the report needs (with your own `inputs`,
        # not the mini world's builders); the report comes last, with the record and push.
        wanted = needed(params, root)
        for stage in pipeline_of(root):
            if stage.name == "report" or stage.name not in wanted:
                continue
            if not due(root, stage, ran, params, changed):
                log.info("%s: up to date, skipped", stage.name)
                continue
            log.info("%s: running", stage.name)
            ran.append(stage.name)
            if stage.name == "rounds":  # one subflow a round, so each shows in the UI
                promoted = _rounds(params, root, seconds)
            else:
                seconds[stage.name] = stage_step(stage.name, params, root)
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
