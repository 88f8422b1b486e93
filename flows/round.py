"""Prefect flow `xopd-round`: one distillation round on a work folder laid out like the repo.

validate → train (rollout, teacher scoring and updates, in one on-policy loop) → eval → gate
(promote or keep the champion). Orchestration only: each step is a function of
`tasks/rounds.py`, the same ones the `rounds` stage of `dvc.yaml` runs. Round k starts from
round k−1's student (`models/student` for k = 1). With no champion yet, the starting student
is evaluated and gated first, as round k−1, so the candidate is always compared with something.
Its settings are the work folder's params.yaml unless given; the UI's form asks only for what
a round needs (which round, `train`, `gate`) and leaves the rest to that file.

Run on its own (a deployment run, `record`), a round leaves DVC consistent: with params.yaml's
settings it sets `campaign.rounds` to the rounds on disk (else `dvc repro` would delete the
new one), reports and records them (`dvc commit`) and logs the `git add … && git commit` line
that keeps dvc.lock and champion.json; with other settings (the form's `train` or `gate`) it
leaves dvc.lock alone and logs the exact commands that make DVC agree again.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, tags, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from flows.publish import publish
from tasks.eval import eval_round
from tasks.gate import describe
from tasks.layout import (
    CHAMPION,
    LOCK,
    WEIGHT_FILES,
    completed_rounds,
    data_root,
    round_checkpoint,
    round_eval,
    round_reports,
)
from tasks.record import (
    advance_rounds,
    git_commit_line,
    git_to_commit,
    is_dvc_repo,
    params_in_sync,
)
from tasks.rounds import gate_round, train_round
from tasks.validate import validate
from xopd_core.config import (
    DEFAULT_PARAMS_FILE,
    CampaignParams,
    GateParams,
    Params,
    TrainParams,
    load_params,
)
from xopd_core.lock import exclusive


def next_round(workdir: Path) -> int:
    """1 + the newest completed round's number (a round is complete once its checkpoint is)."""
    return max(completed_rounds(workdir), default=0) + 1


def run_name(kind: str = "") -> str:
    """`round-3-2026-12-05` (or `round-3-nightly-2026-12-05`): the round a run trains, from
    its parameters (`round`, else the next one in `workdir`), and the day it started."""
    given = flow_run.parameters
    k = given.get("round") or next_round(Path(given.get("workdir", ".")))
    return "-".join(x for x in (f"round-{k}", kind, dt.date.today().isoformat()) if x)


def tag_run(*labels: str) -> None:
    """Add `labels` to the current flow run's tags (searchable in the UI's run list)."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    with get_client(sync_client=True) as client:
        old = list(ctx.flow_run.tags)
        new = old + [x for x in labels if x not in old]
        client.update_flow_run(ctx.flow_run.id, tags=new)
        ctx.flow_run.tags = new


def log_train_steps(k: int, steps: int) -> Callable[[int, dict[str, float]], None]:
    """An `on_step` callback: step, loss and reverse-KL estimate in the run's log, about
    twenty times per round (and the first and last step)."""
    log = get_run_logger()
    every = max(1, steps // 20)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        done = step + 1
        if done == 1 or done == steps or done % every == 0:
            kl = metrics.get("reverse_kl")
            log.info(
                "round %d: train step %d/%d  loss %.4f%s",
                k,
                done,
                steps,
                metrics.get("loss", float("nan")),
                "" if kl is None else f"  reverse KL {kl:.4f}",
            )

    return on_step


@task(name="validate")
def validate_step(params: Params, root: Path, out: Path) -> dict[str, Any]:
    summary = validate(params, [data_root(params, root)], out)
    create_markdown_artifact(
        key="validation-report",
        markdown=f"Validation passed: {summary.n_rows} rows; report `{summary.report_html}`",
    )
    return {"report": str(summary.report_html), "seconds": summary.seconds}


# A retry can help here: a round resumes from its state folder (a vLLM engine that died, an
# OOM-killed step), so the second attempt continues instead of starting over.
@task(name="train", retries=1, retry_delay_seconds=5)
def train_step(params: Params, root: Path, k: int) -> dict[str, Any]:
    on_step = log_train_steps(k, params.train.steps)
    return train_round(params, root, k, on_step=on_step).metrics


@task(name="eval")
def eval_step(params: Params, root: Path, k: int) -> dict[str, Any]:
    return eval_round(params, root, k).metrics


@task(name="gate")
def gate_step(params: Params, root: Path, k: int) -> dict[str, Any]:
    summary = gate_round(params, root, k)
    text = describe(summary)
    get_run_logger().info("round %d: %s", k, text)
    return {"promoted": summary.decision.promoted, "text": text}


def _round_table(k: int, train_m: dict[str, Any], eval_m: dict[str, Any], verdict: str) -> str:
    rows = [
        ("speech Avg-Drop (%)", eval_m["avg_drop_speech"]),
        ("text Avg-Drop (%)", eval_m["avg_drop_text"]),
        ("paralinguistic accuracy", eval_m.get("paralinguistic_accuracy", "–")),
        ("final reverse KL, speech", train_m.get("final_reverse_kl_speech")),
        ("final reverse KL, text", train_m.get("final_reverse_kl_text")),
        ("student tokens trained", train_m["student_tokens"]),
        ("teacher tokens scored", train_m["teacher_tokens"]),
    ]
    body = "\n".join(
        f"| {name} | {value:.3f} |" if isinstance(value, float) else f"| {name} | {value} |"
        for name, value in rows
    )
    return f"# Round {k}\n\n| metric | value |\n|---|---|\n{body}\n\n```\n{verdict}\n```\n"


@flow(name="xopd-round", flow_run_name=run_name)
def xopd_round(
    round: int | None = None,
    train: TrainParams | None = None,
    gate: GateParams | None = None,
    workdir: str = ".",
    params: Params | None = None,
    lock: bool = True,
    check_data: bool = True,
    record: bool = True,
) -> dict[str, Any]:
    """Run one X-OPD round in `workdir`; returns the gate's decision, the round's metrics and
    the stage functions' own seconds.

    Args:
        round: Which round to run: it starts from round − 1's student (round 0 is the
            bootstrapped student). Empty: the one after the newest round on disk. An
            existing round's number retrains and replaces it.
        train: The round's training settings. Empty: the `train` group of params.
        gate: When the round's student replaces the champion. Empty: params' `gate` group.
        workdir: The work folder, laid out like the repository (data/, models/, reports/).
        params: Every other setting. Empty: the work folder's params.yaml.
        lock: Take the work folder's lock. Off only for a caller that already holds it.
        check_data: Validate the data first. Off only for a caller that has just done so.
        record: Afterwards report the rounds and record them in DVC (or log what to run to
            make DVC consistent). Off only for a caller that does so itself.
    """
    root = Path(workdir)
    params = params if params is not None else load_params(root / DEFAULT_PARAMS_FILE)
    overrides = {"train": train, "gate": gate}
    params = params.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    k = next_round(root) if round is None else round
    if k < 1:
        raise ValueError("rounds are numbered from 1 (round 0 is the bootstrapped student)")
    start = round_checkpoint(params, root, k - 1)
    if not any((start / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(
            f"round {k} starts from round {k - 1}'s student, which is not in {start}; "
            f"the next round to run is {next_round(root)}"
        )
    tag_run(f"round-{k}", f"method-{params.train.method}")
    with tags(f"round-{k}"):
        if lock:
            with exclusive(root / LOCK, what="xopd run"):
                return _round_and_record(params, k, root, check_data, record)
        return _round_and_record(params, k, root, check_data, record)


def _round_and_record(
    params: Params, k: int, root: Path, check: bool, record: bool
) -> dict[str, Any]:
    result = _round(params, k, root, check)
    if record:
        result["recorded"] = record_round(params, root, k, bool(result["promoted"]))
    return result


def record_round(params: Params, root: Path, k: int, promoted: bool) -> bool:
    """Report the rounds and record them in DVC (push when owed); True when dvc.lock now
    agrees with the folder. With params.yaml's settings, `campaign.rounds` first becomes the
    rounds on disk, so that `dvc repro` keeps them."""
    log = get_run_logger()
    ran_with = params
    if is_dvc_repo(root) and params_in_sync(root, params, ignore_rounds=True):
        n = max(completed_rounds(root))
        if load_params(root / DEFAULT_PARAMS_FILE).campaign.rounds != n:
            advance_rounds(root, n)
            log.info(
                "round %d: campaign.rounds in params.yaml set to %d, the rounds on disk "
                "(otherwise `dvc repro` would rebuild fewer and delete this one)",
                k,
                n,
            )
        ran_with = params.model_copy(update={"campaign": CampaignParams(rounds=n)})
    recorded = bool(publish(ran_with, root, promoted, one_round=True)["recorded"])
    files = git_to_commit(root) if recorded else None
    if files:
        line = git_commit_line(root, files, f"xopd round {k}: record it ({', '.join(files)})")
        log.info("round %d: recorded in DVC; to keep it in git: %s", k, line)
    return recorded


def _round(params: Params, k: int, root: Path, check: bool) -> dict[str, Any]:
    log = get_run_logger()
    seconds = {}
    if check:
        log.info("round %d: validating the data", k)
        # Into the round's reports: reports/validate belongs to the `validate` stage.
        seconds["validate"] = validate_step(params, root, round_reports(root, k) / "validate")[
            "seconds"
        ]
    if not (root / CHAMPION).is_file():
        log.info("round %d: no champion yet: round %d is evaluated and gated first", k, k - 1)
        if not (round_eval(root, k - 1) / "metrics.json").is_file():
            seconds["eval"] = eval_step(params, root, k - 1)["seconds"]
        gate_step(params, root, k - 1)
    start = "models/student" if k == 1 else f"round {k - 1}"
    log.info(
        "round %d: training from %s: %s, %d steps",
        k,
        start,
        params.train.method,
        params.train.steps,
    )
    train_m = train_step(params, root, k)
    log.info("round %d: evaluating", k)
    eval_m = eval_step(params, root, k)
    log.info(
        "round %d: speech Avg-Drop %.2f %%, text Avg-Drop %.2f %%, paralinguistic accuracy %s",
        k,
        eval_m["avg_drop_speech"],
        eval_m["avg_drop_text"],
        eval_m.get("paralinguistic_accuracy", "– (no such items)"),
    )
    decision = gate_step(params, root, k)
    seconds["train"] = train_m["seconds"]
    seconds["eval"] = seconds.get("eval", 0.0) + eval_m["seconds"]
    create_markdown_artifact(
        key=f"round-{k}",
        markdown=_round_table(k, train_m, eval_m, decision["text"]),
        description=f"xopd round {k}: metrics and gate decision",
    )
    return {
        "round": k,
        "promoted": decision["promoted"],
        "eval": eval_m,
        "train": train_m,
        "seconds": seconds,
    }
