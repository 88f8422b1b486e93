"""The benchmark gate: does a candidate checkpoint replace the champion?

Promote only if the candidate's speech Avg-Drop improves on the champion's by at least δ
(percentage points) and its paralinguistic accuracy falls by no more than ε (absolute);
otherwise the champion stays, with the reasons recorded. The champion is a small pointer
(round, checkpoint path, weights hash, metrics) written atomically. Pure decisions + one
atomic write; no I/O beyond the pointer file.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xopd_core.atomic import write_json_atomic

REQUIRED = ("avg_drop_speech", "avg_drop_text", "paralinguistic_accuracy")
_SLACK = 1e-9


class GateInputError(ValueError):
    """Metrics or pointer unusable for a decision; the message names the file and key."""


@dataclass(frozen=True)
class Champion:
    round: int
    checkpoint: str
    weights_sha256: str
    metrics: dict[str, float]


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reasons: list[str]
    improvement: float | None = None  # champion's speech Avg-Drop − candidate's (points)
    paralinguistic_drop: float | None = None  # champion's para accuracy − candidate's
    checks: dict[str, bool] = field(default_factory=dict)


def gate_metrics(metrics: dict[str, Any], source: str) -> dict[str, float]:
    """The keys the gate reads, validated as finite numbers."""
    out = {}
    for key in REQUIRED:
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            raise GateInputError(f"{source}: '{key}' must be a number, got {value!r}")
        out[key] = float(value)
    return out


def decide(
    candidate: dict[str, float], champion: Champion | None, *, delta: float, epsilon: float
) -> GateDecision:
    """Promote iff Avg-Drop(speech) falls by ≥ δ and paralinguistic accuracy by ≤ ε."""
    if champion is None:
        return GateDecision(True, ["no champion yet: the first evaluated checkpoint becomes it"])
    improvement = champion.metrics["avg_drop_speech"] - candidate["avg_drop_speech"]
    para_drop = champion.metrics["paralinguistic_accuracy"] - candidate["paralinguistic_accuracy"]
    # Both bounds inclusive; the slack keeps 0.90 − 0.88 (= 0.0200…02 in floats) within ε = 0.02.
    better = improvement >= delta - _SLACK
    kept = para_drop <= epsilon + _SLACK
    reasons = [
        f"speech Avg-Drop {candidate['avg_drop_speech']:.2f} vs champion "
        f"{champion.metrics['avg_drop_speech']:.2f} (round {champion.round}): improvement "
        f"{improvement:+.2f} points, needs ≥ {delta:.2f} → {'ok' if better else 'REJECT'}",
        f"paralinguistic accuracy {candidate['paralinguistic_accuracy']:.3f} vs champion "
        f"{champion.metrics['paralinguistic_accuracy']:.3f}: drop {para_drop:+.3f}, allowed "
        f"≤ {epsilon:.3f} → {'ok' if kept else 'REJECT'}",
    ]
    return GateDecision(
        better and kept,
        reasons,
        improvement,
        para_drop,
        {"speech_avg_drop_improved": better, "paralinguistics_kept": kept},
    )


def read_champion(path: Path) -> Champion | None:
    """The champion pointer, or None when there is none yet."""
    if not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text())
        return Champion(
            round=int(data["round"]),
            checkpoint=str(data["checkpoint"]),
            weights_sha256=str(data["weights_sha256"]),
            metrics=gate_metrics(data["metrics"], f"{path}: metrics"),
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, GateInputError):
            raise
        raise GateInputError(f"{path}: not a champion pointer ({err!r})") from err


def write_champion(path: Path, champion: Champion) -> None:
    write_json_atomic(Path(path), asdict(champion))
