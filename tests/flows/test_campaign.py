"""The campaign's own bookkeeping (its runs are tested in test_round.py and test_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

from flows.campaign import _clear_rounds
from tasks.layout import CHAMPION, ROUND_REPORTS, ROUNDS, ROUNDS_METRICS


def test_clearing_the_rounds_keeps_a_stopped_rounds_resume_state(tmp_path: Path) -> None:
    """`make run` after a crash continues the round it stopped in: the rounds stage starts
    by clearing earlier rounds, but not the resume state the crash left."""
    rounds = tmp_path / ROUNDS
    (rounds / "round1").mkdir(parents=True)
    (rounds / "round1" / "model.safetensors").write_text("old round")
    (rounds / "round2.state").mkdir()
    (rounds / "round2.state" / "trainer.json").write_text('{"step": 7}')
    (tmp_path / ROUND_REPORTS / "round1").mkdir(parents=True)
    (tmp_path / CHAMPION).write_text("{}")
    (tmp_path / ROUNDS_METRICS).write_text("{}")
    _clear_rounds(tmp_path)
    assert [p.name for p in rounds.iterdir()] == ["round2.state"]
    assert (rounds / "round2.state" / "trainer.json").read_text() == '{"step": 7}'
    assert not (tmp_path / ROUND_REPORTS).exists()
    assert not (tmp_path / CHAMPION).exists() and not (tmp_path / ROUNDS_METRICS).exists()
