"""The `gate` stage: promote a round's candidate to champion, or keep the champion.

Reads the candidate's eval metrics and per-item responses, decides with
`xopd_core.gate.decide` (δ, α, ε from params), writes the decision and its reasons as DVC
metrics, and — only when promoted — swaps the champion pointer atomically. A rejected
candidate never touches the pointer. Re-running the gate on the current champion is a no-op
that reports it promoted (so a crash between the pointer and the metrics write heals on
retry).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tasks.layout import EVAL_RESPONSES
from xopd_core.atomic import write_json_atomic
from xopd_core.config import Params
from xopd_core.errors import CheckpointError
from xopd_core.gate import (
    Champion,
    GateDecision,
    GateInputError,
    decide,
    gate_metrics,
    read_champion,
    write_champion,
)
from xopd_core.models.checkpoint import require_finite_weights, weights_sha256


@dataclass(frozen=True)
class GateSummary:
    decision: GateDecision
    metrics_path: Path
    champion: Champion | None


def speech_results(responses: Path) -> dict[str, bool]:
    """Item id → answered correctly, for the speech-input items of an eval's responses."""
    out: dict[str, bool] = {}
    try:
        lines = Path(responses).read_text().splitlines()
    except OSError as err:
        raise GateInputError(f"{responses}: cannot read per-item eval results ({err})") from err
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            if row["modality"] == "speech":
                out[str(row["id"])] = bool(row["correct"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise GateInputError(f"{responses}, line {n}: not an eval response ({err!r})") from err
    if not out:
        raise GateInputError(f"{responses}: no speech-input items")
    return out


def gate(
    params: Params,
    candidate_metrics: Path,
    candidate_checkpoint: Path,
    champion_path: Path,
    out_metrics: Path,
    round_: int,
    *,
    label: str | None = None,
) -> GateSummary:
    """`label`: how the pointer names the checkpoint (default its path); flows pass the path
    relative to the work folder so that the pointer is the same wherever the folder lives."""
    floor = params.gate.avg_drop_floor
    try:
        # Bare NaN/Infinity parse here so that the error can name the key that holds one.
        raw: dict[str, Any] = json.loads(Path(candidate_metrics).read_text())
    except (OSError, ValueError) as err:
        raise GateInputError(f"{candidate_metrics}: cannot read eval metrics ({err})") from None
    if not isinstance(raw, dict):
        raise GateInputError(f"{candidate_metrics}: eval metrics must be a JSON object")
    candidate = gate_metrics(raw, str(candidate_metrics), floor)
    correct = speech_results(Path(candidate_metrics).parent / EVAL_RESPONSES)
    try:
        require_finite_weights(candidate_checkpoint)
        digest = weights_sha256(candidate_checkpoint)
    except CheckpointError as err:
        raise GateInputError(f"candidate: {err}") from None
    # The metrics must be the candidate's: eval records the hash of the weights it scored.
    scored = raw.get("weights_sha256")
    if scored != digest:
        raise GateInputError(
            f"{candidate_metrics}: these metrics were measured on weights "
            f"{str(scored)[:12] if scored else '(not recorded)'}, not on the candidate "
            f"{candidate_checkpoint} ({digest[:12]}); evaluate the candidate again"
        )
    champion = read_champion(champion_path, floor)
    if champion is not None and champion.weights_sha256 == digest:
        decision = GateDecision(True, [f"already the champion (round {champion.round})"])
        if champion.speech_correct is None:  # a pointer from before the paired test
            champion = replace(champion, speech_correct=correct)
            write_champion(champion_path, champion)
    else:
        decision = decide(
            candidate,
            champion,
            delta=params.gate.min_improvement,
            epsilon=params.gate.max_paralinguistic_drop,
            alpha=params.gate.alpha,
            candidate_correct=correct,
        )
        if decision.promoted:
            champion = Champion(
                round_, label or str(candidate_checkpoint), digest, candidate, correct
            )
            write_champion(champion_path, champion)
    write_json_atomic(
        out_metrics,
        {
            "round": round_,
            "promoted": decision.promoted,
            "reasons": decision.reasons,
            "improvement": decision.improvement,
            "paralinguistic_drop": decision.paralinguistic_drop,
            "paired_wins": decision.wins,
            "paired_losses": decision.losses,
            "paired_p_value": decision.p_value,
            "checks": decision.checks,
            "candidate_weights_sha256": digest,
            "champion_round": champion.round if champion else None,
            **candidate,
        },
    )
    return GateSummary(decision, out_metrics, champion)


def describe(summary: GateSummary) -> str:
    d = summary.decision
    head = "PROMOTED" if d.promoted else "REJECTED (champion unchanged)"
    return "\n".join([f"gate: {head}", *(f"  - {r}" for r in d.reasons)])
