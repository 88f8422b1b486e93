"""params.yaml edits by the nightly flow keep the file's comments and never write a file
that would not load."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.record import RecordError, advance_rounds, params_in_sync
from xopd_core.config import load_params

REPO = Path(__file__).resolve().parents[2]


def test_advance_rounds_keeps_comments_and_other_values(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    original = load_params(tmp_path / "params.yaml")
    advance_rounds(tmp_path, 7)
    after = (tmp_path / "params.yaml").read_text()
    assert load_params(tmp_path / "params.yaml").campaign.rounds == 7
    changed = [
        (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 1 and "rounds: 7" in changed[0][1] and "#" in changed[0][1]
    assert params_in_sync(tmp_path, original, ignore_rounds=True)
    assert not params_in_sync(tmp_path, original)


def test_advance_rounds_refuses_a_value_the_params_reject(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_bytes()
    with pytest.raises(RecordError, match=r"params\.yaml: the updated params would not load"):
        advance_rounds(tmp_path, -1)
    assert (tmp_path / "params.yaml").read_bytes() == before
