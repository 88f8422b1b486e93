"""The gate's rule: promote iff speech Avg-Drop improves by ≥ δ and paralinguistics fall ≤ ε."""

from __future__ import annotations

from pathlib import Path

import pytest

from xopd_core.gate import (
    Champion,
    GateInputError,
    decide,
    gate_metrics,
    read_champion,
    write_champion,
)

CHAMP = Champion(
    1,
    "models/round1",
    "ab" * 32,
    {
        "avg_drop_speech": 40.0,
        "avg_drop_text": 1.0,
        "paralinguistic_accuracy": 0.90,
    },
)


def cand(drop: float, para: float) -> dict[str, float]:
    return {"avg_drop_speech": drop, "avg_drop_text": 1.0, "paralinguistic_accuracy": para}


@pytest.mark.parametrize(
    ("drop", "para", "promoted"),
    [
        (38.0, 0.90, True),  # 2 points better, paralinguistics kept
        (39.5, 0.88, True),  # exactly δ better and exactly ε lower: both bounds inclusive
        (39.6, 0.90, False),  # better, but by less than δ
        (41.0, 0.95, False),  # worse
        (30.0, 0.85, False),  # much better speech, but paralinguistics fell by 0.05 > ε
    ],
)
def test_decide(drop: float, para: float, promoted: bool) -> None:
    d = decide(cand(drop, para), CHAMP, delta=0.5, epsilon=0.02)
    assert d.promoted is promoted
    assert len(d.reasons) == 2 and ("REJECT" in " ".join(d.reasons)) is (not promoted)
    assert d.improvement == pytest.approx(40.0 - drop)


def test_first_candidate_becomes_the_champion() -> None:
    d = decide(cand(50.0, 0.5), None, delta=0.5, epsilon=0.02)
    assert d.promoted and "no champion" in d.reasons[0]


@pytest.mark.parametrize(
    ("metrics", "key"),
    [
        ({"avg_drop_text": 1.0, "paralinguistic_accuracy": 0.9}, "avg_drop_speech"),
        ({**cand(1.0, 0.9), "paralinguistic_accuracy": float("nan")}, "paralinguistic_accuracy"),
        ({**cand(1.0, 0.9), "avg_drop_text": True}, "avg_drop_text"),
    ],
)
def test_unusable_metrics_name_file_and_key(metrics: dict, key: str) -> None:
    with pytest.raises(GateInputError, match=f"eval.json: '{key}'"):
        gate_metrics(metrics, "eval.json")


def test_champion_pointer_round_trips_and_bad_pointers_are_named(tmp_path: Path) -> None:
    path = tmp_path / "champion.json"
    assert read_champion(path) is None
    write_champion(path, CHAMP)
    assert read_champion(path) == CHAMP
    path.write_text('{"round": 1}')
    with pytest.raises(GateInputError, match=r"champion\.json: not a champion pointer"):
        read_champion(path)


def champion_with(correct: dict[str, bool]) -> Champion:
    return Champion(1, "models/round1", "ab" * 32, CHAMP.metrics, correct)


@pytest.mark.parametrize(
    ("wins", "losses", "promoted"),
    [
        (5, 0, True),  # p = 1/32 ≤ 0.05
        (4, 0, False),  # p = 1/16: better by far more than δ, but not significant
        (9, 1, True),  # p = 11/1024
        (8, 2, False),  # p = 56/1024 = 0.0547, just over α
    ],
)
def test_decide_needs_a_significant_paired_improvement(
    wins: int, losses: int, promoted: bool
) -> None:
    # 40 items: `wins` only the candidate answers, `losses` only the champion, the rest tied.
    ids = [f"i{n}" for n in range(40)]
    champ = {i: wins <= n < wins + losses or n >= 30 for n, i in enumerate(ids)}
    candidate = {i: n < wins or n >= 30 for n, i in enumerate(ids)}
    d = decide(
        cand(30.0, 0.90),
        champion_with(champ),
        delta=0.5,
        epsilon=0.02,
        alpha=0.05,
        candidate_correct=candidate,
    )
    assert (d.wins, d.losses) == (wins, losses)
    assert d.improvement == pytest.approx(10.0)
    assert d.promoted is promoted
    assert d.checks["speech_improvement_significant"] is promoted
    assert len(d.reasons) == 3


def test_decide_refuses_a_paired_test_without_per_item_results() -> None:
    with pytest.raises(GateInputError, match="per-item"):
        decide(cand(30.0, 0.9), CHAMP, delta=0.5, epsilon=0.02, alpha=0.05)
    with pytest.raises(GateInputError, match="different items"):
        decide(
            cand(30.0, 0.9),
            champion_with({"a": True}),
            delta=0.5,
            epsilon=0.02,
            alpha=0.05,
            candidate_correct={"b": True},
        )


def test_data_without_paralinguistic_items_has_nothing_to_keep() -> None:
    """Your own eval data may have no paralinguistic items: neither side has the metric,
    the speech rule alone decides, and the reason says so. Only one side having it means the
    two were evaluated on different data: refused."""
    no_para = {k: v for k, v in CHAMP.metrics.items() if k != "paralinguistic_accuracy"}
    champion = Champion(1, "models/round1", "ab" * 32, no_para)
    better = {"avg_drop_speech": 38.0, "avg_drop_text": 1.0}
    assert gate_metrics(better, "eval.json") == better
    d = decide(better, champion, delta=0.5, epsilon=0.02)
    assert d.promoted and d.paralinguistic_drop is None
    assert d.reasons[-1] == "no paralinguistic items in the eval data: nothing to keep"
    small = {**better, "avg_drop_speech": 39.9}
    assert not decide(small, champion, delta=0.5, epsilon=0.02).promoted
    with pytest.raises(GateInputError, match="only the candidate has a paralinguistic_accuracy"):
        decide(cand(38.0, 0.9), champion, delta=0.5, epsilon=0.02)
    with pytest.raises(GateInputError, match="only the champion has"):
        decide(better, CHAMP, delta=0.5, epsilon=0.02)
