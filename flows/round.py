"""Prefect flow `xopd-round`: one distillation round on a work folder laid out like the repo.

validate → train (rollout, teacher scoring and updates, in one on-policy loop) → eval → gate
(promote or keep the champion). Orchestration only: each step is a stage function from
`tasks/`, the same one `dvc repro` and the CLI run. Round k starts from round k−1's student
(`models/student` for k = 1). With no champion yet, the starting student is evaluated and
gated first, as round k−1, so the candidate is always compared with something.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from tasks.eval import evaluate
from tasks.gate import describe, gate
from tasks.train import train
from tasks.validate import validate
from xopd_core.config import Params
from xopd_core.lock import exclusive

DATA = Path("data/mini")
TEACHER = Path("models/teacher")
TEACHER_METRICS = Path("reports/teacher/metrics.json")
CHAMPION = Path("champion.json")
LOCK = Path(".xopd.lock")  # one writer per work folder (xopd_core/lock.py)


def round_checkpoint(workdir: Path, k: int) -> Path:
    return workdir / ("models/student" if k == 0 else f"models/round{k}")


def round_reports(workdir: Path, k: int) -> Path:
    return workdir / ("reports" if k == 0 else f"reports/round{k}")


@task(name="validate")
def validate_step(params: Params, data: Path, out: Path) -> str:
    summary = validate(params, [data], out)
    return str(summary.report_html)


# A retry can help here: a round resumes from its state folder (a vLLM engine that died, an
# OOM-killed step), so the second attempt continues instead of starting over.
@task(name="train", retries=1, retry_delay_seconds=5)
def train_step(params: Params, workdir: Path, k: int, engine: str) -> dict[str, Any]:
    summary = train(
        params,
        workdir / DATA,
        round_checkpoint(workdir, k - 1),
        workdir / TEACHER,
        round_checkpoint(workdir, k),
        round_reports(workdir, k) / "train" / "metrics.json",
        live_dir=round_reports(workdir, k) / "train" / "live",
        engine=engine,  # type: ignore[arg-type]
    )
    return summary.metrics


@task(name="eval")
def eval_step(params: Params, workdir: Path, k: int) -> dict[str, Any]:
    summary = evaluate(
        params,
        workdir / DATA,
        round_checkpoint(workdir, k),
        workdir / TEACHER_METRICS,
        round_reports(workdir, k) / "eval",
    )
    return summary.metrics


@task(name="gate")
def gate_step(params: Params, workdir: Path, k: int) -> dict[str, Any]:
    summary = gate(
        params,
        round_reports(workdir, k) / "eval" / "metrics.json",
        round_checkpoint(workdir, k),
        workdir / CHAMPION,
        round_reports(workdir, k) / "gate" / "metrics.json",
        k,
    )
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
) -> dict[str, Any]:
    """Run round `round` in `workdir`; returns the gate's decision and the round's metrics.
    `lock=False` only for callers that already hold the work folder's lock."""
    if round < 1:
        raise ValueError("rounds are numbered from 1 (round 0 is the bootstrapped student)")
    root = Path(workdir)
    if lock:
        with exclusive(root / LOCK, what="xopd run"):
            return _round(params, round, root, engine)
    return _round(params, round, root, engine)


def _round(params: Params, round: int, root: Path, engine: str) -> dict[str, Any]:
    report = validate_step(params, root / DATA, root / "reports/validate")
    create_markdown_artifact(
        key="validation-report", markdown=f"Validation passed; report: `{report}`"
    )
    if not (root / CHAMPION).is_file():
        if not (round_reports(root, round - 1) / "eval" / "metrics.json").is_file():
            eval_step(params, root, round - 1)
        gate_step(params, root, round - 1)
    train_m = train_step(params, root, round, engine)
    eval_m = eval_step(params, root, round)
    decision = gate_step(params, root, round)
    create_markdown_artifact(
        key=f"round-{round}",
        markdown=_round_table(round, train_m, eval_m, decision["text"]),
        description=f"xopd round {round}: metrics and gate decision",
    )
    return {"round": round, "promoted": decision["promoted"], "eval": eval_m, "train": train_m}
