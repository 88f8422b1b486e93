"""The gate stage: a planted worse candidate is rejected and the champion file is untouched;
a better one is promoted; one better by δ but not significantly over the paired items is
rejected; re-gating the champion is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tasks.cli import main
from tasks.gate import gate
from xopd_core.config import Params
from xopd_core.gate import GateInputError, read_champion


def checkpoint(folder: Path, value: float) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.full((2,), value)}, str(folder / "model.safetensors"))
    return folder


def eval_metrics(folder: Path, drop: float, para: float, correct: int = 10) -> Path:
    """An eval folder: metrics, and 20 speech items of which the first `correct` are right
    (plus a text item, which the paired test must ignore)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"modality": "speech", "id": f"i{n:02d}", "correct": n < correct} for n in range(20)
    ] + [{"modality": "text", "id": "i00", "correct": False}]
    (folder / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "metrics.json"
    path.write_text(
        json.dumps({"avg_drop_speech": drop, "avg_drop_text": 1.0, "paralinguistic_accuracy": para})
    )
    return path


def test_gate_keeps_the_champion_against_a_worse_candidate(tmp_path: Path) -> None:
    params = Params()
    champ = tmp_path / "champion.json"
    first = gate(
        params,
        eval_metrics(tmp_path / "e0", 50.0, 0.9, correct=10),
        checkpoint(tmp_path / "r0", 0.0),
        champ,
        tmp_path / "g0.json",
        0,
    )
    assert first.decision.promoted
    before = champ.read_bytes()
    worse = gate(
        params,
        eval_metrics(tmp_path / "e1", 52.0, 0.9, correct=9),
        checkpoint(tmp_path / "r1", 1.0),
        champ,
        tmp_path / "g1.json",
        1,
    )
    assert not worse.decision.promoted
    assert champ.read_bytes() == before  # untouched, byte for byte
    record = json.loads((tmp_path / "g1.json").read_text())
    assert record["promoted"] is False and record["champion_round"] == 0
    assert any("REJECT" in r for r in record["reasons"])
    # 5 points better, but only 2 paired wins and no loss: p = 0.25 > α, so rejected.
    lucky = gate(
        params,
        eval_metrics(tmp_path / "e3", 45.0, 0.9, correct=12),
        checkpoint(tmp_path / "r3", 3.0),
        champ,
        tmp_path / "g3.json",
        3,
    )
    assert not lucky.decision.promoted
    assert (lucky.decision.wins, lucky.decision.losses) == (2, 0)
    assert lucky.decision.p_value == pytest.approx(0.25)
    assert champ.read_bytes() == before
    better = gate(
        params,
        eval_metrics(tmp_path / "e2", 45.0, 0.9, correct=16),
        checkpoint(tmp_path / "r2", 2.0),
        champ,
        tmp_path / "g2.json",
        2,
    )
    assert better.decision.promoted
    pointer = read_champion(champ)
    assert pointer is not None and pointer.round == 2 and pointer.checkpoint.endswith("r2")
    assert better.decision.p_value == pytest.approx(0.5**6)  # 6 wins, 0 losses
    assert pointer.speech_correct == {f"i{n:02d}": n < 16 for n in range(20)}
    again = gate(
        params, tmp_path / "e2/metrics.json", tmp_path / "r2", champ, tmp_path / "g2.json", 2
    )
    assert again.decision.promoted and "already the champion" in again.decision.reasons[0]


def test_cli_gate_reports_the_decision_and_bad_input(tmp_path: Path, capsys) -> None:
    ck = checkpoint(tmp_path / "r0", 0.0)
    args = [
        "gate",
        "--candidate",
        str(ck),
        "--round",
        "0",
        "--champion",
        str(tmp_path / "c.json"),
        "--out",
        str(tmp_path / "g.json"),
    ]
    assert main([*args, "--candidate-metrics", str(eval_metrics(tmp_path / "e", 50, 0.9))]) == 0
    assert "PROMOTED" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps({"avg_drop_speech": 1.0}))
    assert main([*args, "--candidate-metrics", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: 'avg_drop_text'" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _isolated_params(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults


def test_gate_refreshes_an_old_pointer_and_refuses_other_items(tmp_path: Path) -> None:
    """A champion pointer from before the paired test gains its per-item results when the
    gate sees the champion again; a candidate evaluated on other items is an input error."""
    params = Params()
    champ = tmp_path / "champion.json"
    ck = checkpoint(tmp_path / "r0", 0.0)
    metrics = eval_metrics(tmp_path / "e0", 50.0, 0.9)
    gate(params, metrics, ck, champ, tmp_path / "g0.json", 0)
    old = json.loads(champ.read_text())
    del old["speech_correct"]
    champ.write_text(json.dumps(old))
    gate(params, metrics, ck, champ, tmp_path / "g0.json", 0)
    pointer = read_champion(champ)
    assert pointer is not None and pointer.speech_correct is not None
    other = eval_metrics(tmp_path / "e1", 40.0, 0.9, correct=18)
    (other.parent / "responses.jsonl").write_text(
        json.dumps({"modality": "speech", "id": "elsewhere", "correct": True}) + "\n"
    )
    with pytest.raises(GateInputError, match="different items"):
        gate(params, other, checkpoint(tmp_path / "r1", 1.0), champ, tmp_path / "g1.json", 1)
