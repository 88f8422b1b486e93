"""Prefect flow `xopd-round`: one distillation round on a work folder laid out like the repo.

validate → train (rollout, teacher scoring and updates, in one on-policy loop) → eval → gate
(promote or keep the champion). Orchestration only: each step is a function of
`tasks/rounds.py`, the same ones the `rounds` stage of `dvc.yaml` runs. Round k starts from
round k−1's student (`models/student` for k = 1). With no champion yet, the starting student
is evaluated and gated first, as round k−1, so the candidate is always compared with something.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tasks.gate import describe
from tasks.layout import CHAMPION, DATA, LOCK, round_eval, round_reports
from tasks.rounds import eval_round, gate_round, train_round
from tasks.validate import validate
from xopd_core.config import Params
from xopd_core.lock import exclusive


@task(name="validate")
def validate_step(params: Params, root: Path, out: Path) -> dict[str, Any]:
    summary = validate(params, [root / DATA], out)
    create_markdown_artifact(
        key="validation-report",
        markdown=f"Validation passed: {summary.n_rows} rows; report `{summary.report_html}`",
    )
    return {"report": str(summary.report_html), "seconds": summary.seconds}


# A retry can help here: a round resumes from its state folder (a vLLM engine that died, an
# OOM-killed step), so the second attempt continues instead of starting over.
@task(name="train", retries=1, retry_delay_seconds=5)
def train_step(params: Params, root: Path, k: int, engine: str) -> dict[str, Any]:
    return train_round(params, root, k, engine).metrics  # type: ignore[arg-type]


@task(name="eval")
def eval_step(params: Params, root: Path, k: int) -> dict[str, Any]:
    return eval_round(params, root, k)


@task(name="gate")
def gate_step(params: Params, root: Path, k: int) -> dict[str, Any]:
    summary = gate_round(params, root, k)
    return {"promoted": summary.decision.promoted, "text": describe(summary)}


def _round_table(k: int, train_m: dict[str, Any], eval_m: dict[str, Any], verdict: str) -> str:
    rows = [
        ("speech Avg-Drop (%)", eval_m["avg_drop_speech"]),
        ("text Avg-Drop (%)", eval_m["avg_drop_text"]),
        ("paralinguistic accuracy", eval_m["paralinguistic_accuracy"]),
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


@flow(name="xopd-round")
def xopd_round(
    params: Params,
    round: int = 1,
    workdir: str = ".",
    engine: Literal["hf", "vllm"] = "hf",
    lock: bool = True,
    check_data: bool = True,
) -> dict[str, Any]:
    """Run round `round` in `workdir`; returns the gate's decision, the round's metrics and
    the stage functions' own seconds. `lock=False` only for callers that already hold the
    work folder's lock; `check_data=False` for callers that have just validated the data."""
    if round < 1:
        raise ValueError("rounds are numbered from 1 (round 0 is the bootstrapped student)")
    root = Path(workdir)
    if lock:
        with exclusive(root / LOCK, what="xopd run"):
            return _round(params, round, root, engine, check_data)
    return _round(params, round, root, engine, check_data)


def _round(params: Params, k: int, root: Path, engine: str, check: bool) -> dict[str, Any]:
    seconds = {}
    if check:
        # Into the round's reports: reports/validate belongs to the `validate` stage.
        seconds["validate"] = validate_step(params, root, round_reports(root, k) / "validate")[
            "seconds"
        ]
    if not (root / CHAMPION).is_file():
        if not (round_eval(root, k - 1) / "metrics.json").is_file():
            seconds["eval"] = eval_step(params, root, k - 1)["seconds"]
        gate_step(params, root, k - 1)
    train_m = train_step(params, root, k, engine)
    eval_m = eval_step(params, root, k)
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
