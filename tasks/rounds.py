"""The `rounds` stage: X-OPD rounds 1..N after the bootstrap, each trained, evaluated and gated.

Round k starts from round k−1's student (round 0 = the bootstrapped `models/student`) and
uses the train seed `train.seed + k − 1`, so rounds see different prompt orders. Before
round 1, the round-0 student is gated against nothing (it becomes the first champion). The
same three functions (`train_round`, `eval_round` of tasks/eval.py, `gate_round`) are the
Prefect round flow's tasks, so `dvc repro` and a Prefect run write identical files (tested by hash).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.eval import eval_round
from tasks.gate import GateSummary, gate
from tasks.layout import (
    CHAMPION,
    ROUND_REPORTS,
    ROUNDS_METRICS,
    data_root,
    round_checkpoint,
    round_eval,
    round_gate,
    round_reports,
    teacher_dir,
)
from tasks.train import TrainSummary, train
from xopd_core.atomic import write_json_atomic
from xopd_core.config import Params
from xopd_core.data.validation import read_validated_manifests


def round_params(params: Params, k: int) -> Params:
    seed = params.train.seed + k - 1
    return params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})


def train_round(
    params: Params,
    root: Path,
    k: int,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainSummary:
    """Round k's training; `on_step(step, metrics)` after each step (the flow's progress log)."""
    reports = round_reports(root, k) / "train"
    return train(
        round_params(params, k),
        data_root(params, root),
        round_checkpoint(params, root, k - 1),
        teacher_dir(params, root),
        round_checkpoint(params, root, k),
        reports / "metrics.json",
        live_dir=reports / "live",
        on_step=on_step,
    )


def gate_round(params: Params, root: Path, k: int) -> GateSummary:
    return gate(
        params,
        round_eval(root, k) / "metrics.json",
        round_checkpoint(params, root, k),
        root / CHAMPION,
        round_gate(root, k),
        k,
        label=str(round_checkpoint(params, Path(), k)),
    )


ROUND_KEYS = ("avg_drop_speech", "avg_drop_text", "paralinguistic_accuracy", "promoted")


def write_rounds_metrics(root: Path) -> dict[str, Any]:
    """`reports/rounds.json`: each gated round's Avg-Drops, paralinguistic accuracy and gate
    decision with its reasons (the DVC metrics of the output contract)."""
    table: dict[str, Any] = {}
    for path in sorted(
        (root / ROUND_REPORTS).glob("round*/gate/metrics.json"),
        key=lambda p: int(p.parent.parent.name.removeprefix("round")),
    ):
        g = json.loads(path.read_text())
        table[f"round{g['round']}"] = {
            **{key: g.get(key) for key in ROUND_KEYS},
            "reasons": g["reasons"],
        }
    write_json_atomic(root / ROUNDS_METRICS, table)
    return table


@dataclass(frozen=True)
class RoundsSummary:
    rounds: int
    promoted: list[bool]
    metrics_path: Path
    seconds: float


def run_rounds(params: Params, root: Path, *, rounds: int | None = None) -> RoundsSummary:
    """Gate round 0, then train → eval → gate rounds 1..N (N = `campaign.rounds`)."""
    start = time.perf_counter()
    n = params.campaign.rounds if rounds is None else rounds
    # The splits the rounds read, checked before round 0 is gated (each stage checks again).
    read_validated_manifests(
        data_root(params, root), ["train", "eval"], params.validate_, optional=["para_eval"]
    )
    gate_round(params, root, 0)
    promoted = []
    for k in range(1, n + 1):
        train_round(params, root, k)
        eval_round(params, root, k)
        promoted.append(gate_round(params, root, k).decision.promoted)
    write_rounds_metrics(root)
    return RoundsSummary(n, promoted, root / ROUNDS_METRICS, time.perf_counter() - start)


def run(params: Params, root: Path, progress: bool = False) -> str:
    """The stage on the work folder `root`: rounds 1..`campaign.rounds`, each gated."""
    s = run_rounds(params, root)
    verdicts = ", ".join(
        f"round {k}: {'promoted' if p else 'rejected'}" for k, p in enumerate(s.promoted, 1)
    )
    return f"{s.rounds} in {s.seconds:.0f} s ({verdicts}); metrics → {s.metrics_path}"


def built(params: Params, root: Path) -> bool:
    """Without DVC: is every round of `campaign.rounds` on disk and gated?"""
    return all(
        (round_checkpoint(params, root, k) / "model.safetensors").is_file()
        and round_gate(root, k).is_file()
        for k in range(1, params.campaign.rounds + 1)
    )
