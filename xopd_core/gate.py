"""The benchmark gate: does a candidate checkpoint replace the champion?

Promote only if the candidate's speech Avg-Drop improves on the champion's by at least δ
(percentage points), the improvement is significant over the paired eval items (one-sided
exact McNemar test, p ≤ α), and its paralinguistic accuracy falls by no more than ε
(absolute); otherwise the champion stays, with the reasons recorded. The champion is a
small pointer (round, checkpoint path, weights hash, metrics, per-item speech results)
written atomically. Pure decisions + one atomic write; no I/O beyond the pointer file.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xopd_core.atomic import write_json_atomic
from xopd_core.eval.metrics import mcnemar_exact_p

REQUIRED = ("avg_drop_speech", "avg_drop_text")
PARA = "paralinguistic_accuracy"  # present where the eval data has paralinguistic items
_SLACK = 1e-9
AVG_DROP_CEILING = 100.0  # a score of 0: the most a model can drop
DEFAULT_AVG_DROP_FLOOR = -100.0


class GateInputError(ValueError):
    """Metrics or pointer unusable for a decision; the message names the file and key."""


@dataclass(frozen=True)
class Champion:
    round: int
    checkpoint: str
    weights_sha256: str
    metrics: dict[str, float]
    # Item id → answered correctly from speech; None in pointers written before the paired
    # test existed (the gate then refreshes the pointer when it sees the champion again).
    speech_correct: dict[str, bool] | None = None


@dataclass(frozen=True)
class GateDecision:
    promoted: bool
    reasons: list[str]
    improvement: float | None = None  # champion's speech Avg-Drop − candidate's (points)
    paralinguistic_drop: float | None = None  # champion's para accuracy − candidate's
    # Paired speech items only the candidate / only the champion answers correctly, and the
    # one-sided exact McNemar p-value of the candidate being better.
    wins: int | None = None
    losses: int | None = None
    p_value: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)


def gate_metrics(
    metrics: dict[str, Any], source: str, avg_drop_floor: float = DEFAULT_AVG_DROP_FLOOR
) -> dict[str, float]:
    """The keys the gate reads, validated as finite numbers in their ranges: accuracies in
    [0, 1], Avg-Drops in [`avg_drop_floor`, 100] (a percentage drop from the teacher's score).
    An infinity or a NaN would otherwise win or poison every later comparison."""
    out = {}
    for key in (*REQUIRED, *([PARA] if PARA in metrics else [])):
        value = metrics.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise GateInputError(f"{source}: '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise GateInputError(f"{source}: '{key}' must be finite, got {value!r}")
        lo, hi = (0.0, 1.0) if "accuracy" in key else (avg_drop_floor, AVG_DROP_CEILING)
        if not lo <= value <= hi:
            raise GateInputError(
                f"{source}: '{key}' must be within [{lo:g}, {hi:g}], got {value!r}"
            )
        out[key] = float(value)
    return out


def paired_counts(
    candidate: dict[str, bool], champion: dict[str, bool], source: str
) -> tuple[int, int]:
    """Items only the candidate gets right (wins) and only the champion gets right (losses);
    both must have been evaluated on the same items."""
    if set(candidate) != set(champion):
        only = sorted(set(candidate) ^ set(champion))
        raise GateInputError(
            f"{source}: candidate and champion were evaluated on different items "
            f"({len(only)} differ, e.g. {only[:3]}): the paired test needs the same eval split"
        )
    wins = sum(candidate[i] and not champion[i] for i in candidate)
    losses = sum(champion[i] and not candidate[i] for i in candidate)
    return wins, losses


def decide(
    candidate: dict[str, float],
    champion: Champion | None,
    *,
    delta: float,
    epsilon: float,
    alpha: float = 1.0,
    candidate_correct: dict[str, bool] | None = None,
) -> GateDecision:
    """Promote iff Avg-Drop(speech) falls by ≥ δ, the paired exact McNemar test of the
    per-item speech results gives p ≤ α, and paralinguistic accuracy falls by ≤ ε.
    `alpha = 1` skips the paired test (and needs no per-item results)."""
    if champion is None:
        return GateDecision(True, ["no champion yet: the first evaluated checkpoint becomes it"])
    improvement = champion.metrics["avg_drop_speech"] - candidate["avg_drop_speech"]
    if (PARA in candidate) != (PARA in champion.metrics):
        raise GateInputError(
            f"only the {'candidate' if PARA in candidate else 'champion'} has a {PARA}: "
            "the two were evaluated on different data"
        )
    para_drop = champion.metrics[PARA] - candidate[PARA] if PARA in candidate else None
    # Both bounds inclusive; the slack keeps 0.90 − 0.88 (= 0.0200…02 in floats) within ε = 0.02.
    better = improvement >= delta - _SLACK
    kept = para_drop is None or para_drop <= epsilon + _SLACK
    reasons = [
        f"speech Avg-Drop {candidate['avg_drop_speech']:.2f} vs champion "
        f"{champion.metrics['avg_drop_speech']:.2f} (round {champion.round}): improvement "
        f"{improvement:+.2f} points, needs ≥ {delta:.2f} → {'ok' if better else 'REJECT'}",
    ]
    checks = {"speech_avg_drop_improved": better}
    wins = losses = p_value = None
    if alpha < 1:
        if candidate_correct is None or champion.speech_correct is None:
            raise GateInputError(
                "the paired test (gate.alpha < 1) needs per-item speech results of both the "
                "candidate and the champion"
            )
        wins, losses = paired_counts(candidate_correct, champion.speech_correct, "gate")
        p_value = mcnemar_exact_p(wins, losses)
        significant = p_value <= alpha
        checks["speech_improvement_significant"] = significant
        reasons.append(
            f"paired speech items: {wins} only the candidate answers, {losses} only the "
            f"champion: one-sided exact McNemar p = {p_value:.4g}, needs ≤ {alpha:g} → "
            f"{'ok' if significant else 'REJECT'}"
        )
    reasons.append(
        "no paralinguistic items in the eval data: nothing to keep"
        if para_drop is None
        else f"paralinguistic accuracy {candidate[PARA]:.3f} vs champion "
        f"{champion.metrics[PARA]:.3f}: drop {para_drop:+.3f}, allowed "
        f"≤ {epsilon:.3f} → {'ok' if kept else 'REJECT'}"
    )
    checks["paralinguistics_kept"] = kept
    return GateDecision(
        all(checks.values()),
        reasons,
        improvement,
        para_drop,
        checks=checks,
        wins=wins,
        losses=losses,
        p_value=p_value,
    )


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_champion(path: Path, avg_drop_floor: float = DEFAULT_AVG_DROP_FLOOR) -> Champion | None:
    """The champion pointer, or None when there is none yet. Standard JSON only, its metrics
    validated as a candidate's are."""
    if not Path(path).is_file():
        return None
    try:
        data = json.loads(Path(path).read_text(), parse_constant=_refuse_constant)
        return Champion(
            round=int(data["round"]),
            checkpoint=str(data["checkpoint"]),
            weights_sha256=str(data["weights_sha256"]),
            metrics=gate_metrics(data["metrics"], f"{path}: metrics", avg_drop_floor),
            speech_correct=_per_item(data.get("speech_correct"), path),
        )
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        if isinstance(err, GateInputError):
            raise
        raise GateInputError(f"{path}: not a champion pointer ({err!r})") from err


def _per_item(value: Any, path: Path) -> dict[str, bool] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, bool) for k, v in value.items()
    ):
        raise GateInputError(f"{path}: 'speech_correct' must map item ids to true/false")
    return dict(value)


def write_champion(path: Path, champion: Champion) -> None:
    """Atomically, as standard JSON (a non-finite metric is refused, never written)."""
    write_json_atomic(Path(path), asdict(champion))
