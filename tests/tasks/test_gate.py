"""The gate stage: a planted worse candidate is rejected and the champion file is untouched;
a better one is promoted; re-gating the champion is a no-op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tasks.cli import main
from tasks.gate import gate
from xopd_core.config import Params
from xopd_core.gate import read_champion


def checkpoint(folder: Path, value: float) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.full((2,), value)}, str(folder / "model.safetensors"))
    return folder


def eval_metrics(path: Path, drop: float, para: float) -> Path:
    path.write_text(
        json.dumps({"avg_drop_speech": drop, "avg_drop_text": 1.0, "paralinguistic_accuracy": para})
    )
    return path


def test_gate_keeps_the_champion_against_a_worse_candidate(tmp_path: Path) -> None:
    params = Params()
    champ = tmp_path / "champion.json"
    first = gate(
        params,
        eval_metrics(tmp_path / "e0.json", 50.0, 0.9),
        checkpoint(tmp_path / "r0", 0.0),
        champ,
        tmp_path / "g0.json",
        0,
    )
    assert first.decision.promoted
    before = champ.read_bytes()
    worse = gate(
        params,
        eval_metrics(tmp_path / "e1.json", 52.0, 0.9),
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
    better = gate(
        params,
        eval_metrics(tmp_path / "e2.json", 45.0, 0.9),
        checkpoint(tmp_path / "r2", 2.0),
        champ,
        tmp_path / "g2.json",
        2,
    )
    assert better.decision.promoted
    pointer = read_champion(champ)
    assert pointer is not None and pointer.round == 2 and pointer.checkpoint.endswith("r2")
    again = gate(params, tmp_path / "e2.json", tmp_path / "r2", champ, tmp_path / "g2.json", 2)
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
    assert (
        main([*args, "--candidate-metrics", str(eval_metrics(tmp_path / "e.json", 50, 0.9))]) == 0
    )
    assert "PROMOTED" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text(json.dumps({"avg_drop_speech": 1.0}))
    assert main([*args, "--candidate-metrics", str(tmp_path / "bad.json")]) == 2
    assert "bad.json: 'avg_drop_text'" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _isolated_params(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no params.yaml here: the defaults
