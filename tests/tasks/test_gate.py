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
from xopd_core.models.checkpoint import weights_sha256


def checkpoint(folder: Path, value: float) -> Path:
    folder.mkdir(parents=True)
    save_file({"w": torch.full((2,), value)}, str(folder / "model.safetensors"))
    return folder


def eval_metrics(
    folder: Path, drop: float, para: float, correct: int = 10, *, of: Path | None = None
) -> Path:
    """An eval folder: metrics of the checkpoint `of` (its weights hash recorded, as the eval
    stage does), and 20 speech items of which the first `correct` are right (plus a text
    item, which the paired test must ignore)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"modality": "speech", "id": f"i{n:02d}", "correct": n < correct} for n in range(20)
    ] + [{"modality": "text", "id": "i00", "correct": False}]
    (folder / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = folder / "metrics.json"
    metrics = {"avg_drop_speech": drop, "avg_drop_text": 1.0, "paralinguistic_accuracy": para}
    if of is not None:
        metrics["weights_sha256"] = weights_sha256(of)
    path.write_text(json.dumps(metrics))
    return path


def candidate(
    root: Path, k: int, value: float, drop: float, para: float, correct: int = 10
) -> tuple[Path, Path]:
    """Round k's eval metrics and checkpoint (weights all `value`), bound by hash."""
    ck = checkpoint(root / f"r{k}", value)
    return eval_metrics(root / f"e{k}", drop, para, correct, of=ck), ck


def test_gate_keeps_the_champion_against_a_worse_candidate(tmp_path: Path) -> None:
    params = Params()
    champ = tmp_path / "champion.json"
    first = gate(
        params,
        *candidate(tmp_path, 0, 0.0, 50.0, 0.9, correct=10),
        champ,
        tmp_path / "g0.json",
        0,
    )
    assert first.decision.promoted
    before = champ.read_bytes()
    worse = gate(
        params,
        *candidate(tmp_path, 1, 1.0, 52.0, 0.9, correct=9),
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
        *candidate(tmp_path, 3, 3.0, 45.0, 0.9, correct=12),
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
        *candidate(tmp_path, 2, 2.0, 45.0, 0.9, correct=16),
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


@pytest.mark.usefixtures("in_tmp_path")
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
    bound = eval_metrics(tmp_path / "e", 50, 0.9, of=ck)
    assert main([*args, "--candidate-metrics", str(bound)]) == 0
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
    metrics = eval_metrics(tmp_path / "e0", 50.0, 0.9, of=ck)
    gate(params, metrics, ck, champ, tmp_path / "g0.json", 0)
    old = json.loads(champ.read_text())
    del old["speech_correct"]
    champ.write_text(json.dumps(old))
    gate(params, metrics, ck, champ, tmp_path / "g0.json", 0)
    pointer = read_champion(champ)
    assert pointer is not None and pointer.speech_correct is not None
    ck1 = checkpoint(tmp_path / "r1", 1.0)
    other = eval_metrics(tmp_path / "e1", 40.0, 0.9, correct=18, of=ck1)
    (other.parent / "responses.jsonl").write_text(
        json.dumps({"modality": "speech", "id": "elsewhere", "correct": True}) + "\n"
    )
    with pytest.raises(GateInputError, match="different items"):
        gate(params, other, ck1, champ, tmp_path / "g1.json", 1)


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("avg_drop_speech", "-Infinity", "'avg_drop_speech'"),
        ("avg_drop_speech", "Infinity", "'avg_drop_speech'"),
        ("avg_drop_speech", "NaN", "'avg_drop_speech'"),
        ("paralinguistic_accuracy", 7.0, "'paralinguistic_accuracy' must be within [0, 1]"),
        ("avg_drop_speech", -500.0, "'avg_drop_speech' must be within [-100, 100]"),
        ("avg_drop_text", 150.0, "'avg_drop_text' must be within [-100, 100]"),
    ],
)
def test_gate_refuses_non_finite_or_out_of_range_metrics_and_keeps_the_champion(
    tmp_path: Path, capsys, key: str, value: object, needle: str
) -> None:
    params = Params()
    champ = tmp_path / "champion.json"
    gate(params, *candidate(tmp_path, 0, 0.0, 50.0, 0.9), champ, tmp_path / "g0.json", 0)
    before = champ.read_bytes()
    metrics, ck = candidate(tmp_path, 1, 1.0, 40.0, 0.9, correct=18)
    text = metrics.read_text()
    bad = json.loads(text)
    bad[key] = 0.0
    # Python writes bare NaN/Infinity (not JSON) exactly as a broken eval would.
    metrics.write_text(json.dumps(bad).replace(f'"{key}": 0.0', f'"{key}": {value}'))
    args = ["gate", "--candidate", str(ck), "--candidate-metrics", str(metrics)]
    args += ["--round", "1", "--champion", str(champ), "--out", str(tmp_path / "g1.json")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "metrics.json" in err and len(err.strip().splitlines()) == 1
    assert champ.read_bytes() == before
    json.loads(champ.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in pointer"))


def test_gate_floor_is_configurable(tmp_path: Path) -> None:
    metrics, ck = candidate(tmp_path, 0, 0.0, -300.0, 0.9)
    with pytest.raises(GateInputError, match=r"within \[-100, 100\]"):
        gate(Params(), metrics, ck, tmp_path / "c.json", tmp_path / "g.json", 0)
    lenient = Params.model_validate({"gate": {"avg_drop_floor": -1000.0}})
    assert gate(lenient, metrics, ck, tmp_path / "c.json", tmp_path / "g.json", 0).decision.promoted


def test_gate_refuses_metrics_of_other_weights_or_none(tmp_path: Path) -> None:
    metrics, _ = candidate(tmp_path, 0, 0.0, 50.0, 0.9)
    other = checkpoint(tmp_path / "other", 5.0)
    with pytest.raises(GateInputError, match=r"measured on weights .* not on the candidate"):
        gate(Params(), metrics, other, tmp_path / "c.json", tmp_path / "g.json", 0)
    unbound = eval_metrics(tmp_path / "e9", 50.0, 0.9)
    with pytest.raises(GateInputError, match=r"\(not recorded\)"):
        gate(Params(), unbound, other, tmp_path / "c.json", tmp_path / "g.json", 0)
    assert not (tmp_path / "c.json").exists()


def test_gate_refuses_non_finite_weights_even_with_no_champion(tmp_path: Path) -> None:
    ck = tmp_path / "nan"
    ck.mkdir()
    save_file({"w": torch.tensor([0.0, float("nan")])}, str(ck / "model.safetensors"))
    metrics = eval_metrics(tmp_path / "e", 50.0, 0.9, of=ck)
    with pytest.raises(GateInputError, match=r"nan/model\.safetensors: 1 weight tensor\(s\) hold"):
        gate(Params(), metrics, ck, tmp_path / "c.json", tmp_path / "g.json", 0)
    assert not (tmp_path / "c.json").exists()


def test_champion_pointer_with_non_standard_json_is_refused(tmp_path: Path) -> None:
    params = Params()
    champ = tmp_path / "champion.json"
    gate(params, *candidate(tmp_path, 0, 0.0, 50.0, 0.9), champ, tmp_path / "g0.json", 0)
    champ.write_text(champ.read_text().replace("50.0", "-Infinity"))
    with pytest.raises(GateInputError, match=r"champion\.json: not a champion pointer"):
        gate(params, *candidate(tmp_path, 1, 1.0, 40.0, 0.9), champ, tmp_path / "g1.json", 1)
