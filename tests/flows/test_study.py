"""The study flow end to end on the tiny world, through a real Prefect server: every method
at the same budget from the same student, per-item tests against real eval responses, the
learning curves, the artifact, and a rerun that reuses what is recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client

from flows.study import xopd_study
from tasks.layout import EVAL_RESPONSES
from tasks.study import StudyPaths, run_folder
from xopd_core.config import EvalParams, Params, StudyParams
from xopd_core.models.checkpoint import RESOLVED_CONFIG, weights_sha256

BUDGET = 40


# ~100 s on 2 cores: in `make test-slow`. The equal budget itself is checked in the fast suite
# (tests/xopd_core/train/test_distill.py, tests/tasks/test_study.py).
@pytest.mark.slow
def test_study_flow_trains_every_method_on_the_same_budget_and_compares_them(
    prefect_server, flow_params: Params, work: Path
) -> None:
    params = flow_params.model_copy(
        update={
            "eval": EvalParams(max_new_tokens=8, processes=1),
            "study": StudyParams(seeds=[0], student_tokens=BUDGET, max_steps=30, curve_points=2),
        }
    )
    result = xopd_study(params, workdir=str(work))
    paths = StudyPaths.of(work)
    data = json.loads((paths.out / "study.json").read_text())
    names = [m.name for m in params.study.methods]
    assert [m["name"] for m in data["methods"]] == names and len(names) == 7

    # Equal budgets: every run trained exactly BUDGET student tokens (none more, none less),
    # from the same round-0 weights, though the methods make different tokens per step.
    runs = {m["name"]: m["runs"][0] for m in data["methods"]}
    assert {name: r["student_tokens"] for name, r in runs.items()} == dict.fromkeys(names, BUDGET)
    assert runs["xopd_l0.5"]["steps"] < runs["xopd_l1"]["steps"]  # two modalities a step
    student = weights_sha256(paths.student)
    for name in names:
        resolved = json.loads((paths.models / name / "seed0" / RESOLVED_CONFIG).read_text())
        assert resolved["from_weights_sha256"] == student
        assert resolved["params"]["student_tokens"] == BUDGET
    gkd = json.loads((paths.models / "gkd" / "seed0" / RESOLVED_CONFIG).read_text())
    assert (gkd["params"]["method"], gkd["params"]["gkd_beta"]) == ("gkd", 0.0)

    # The table: a row per method after round 0; its paired tests read the real responses.
    rows = [line for line in result["table"].splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| round 0", *(
        f"| {m['label']}" for m in data["methods"]
    )]  # fmt: skip

    def speech(folder: Path) -> dict[str, bool]:
        rows = [json.loads(line) for line in (folder / "eval" / EVAL_RESPONSES).open()]
        return {r["id"]: r["correct"] for r in rows if r["modality"] == "speech"}

    sft, base = speech(run_folder(paths.out, "sft", 0)), speech(paths.out / "round0")
    assert set(sft) == set(base) and data["speech_items"] == len(base) > 0
    assert runs["sft"]["vs_round0"] | {"p_value": None} == {
        "wins": sum(sft[i] and not base[i] for i in base),
        "losses": sum(base[i] and not sft[i] for i in base),
        "p_value": None,
    }

    # Curves: a snapshot at half the budget, then the trained model, each scored on dev.
    for r in runs.values():
        (half, end) = r["curve"]
        assert half["student_tokens"] >= BUDGET // 2 and 0 < half["step"] <= end["step"]
        assert (end["student_tokens"], end["step"]) == (BUDGET, r["steps"])
    dev = json.loads(
        (run_folder(paths.out, "sft", 0) / "dev" / "point1" / "metrics.json").read_text()
    )
    assert (
        dev["split"] == "dev"
        and dev["speech_accuracy_mean"] == runs["sft"]["curve"][0]["speech_accuracy"]
    )
    assert [Path(p).name for p in result["plots"]] == ["avg_drop.png", "curve.png"]
    with get_client(sync_client=True) as client:
        assert "study" in {a.key for a in client.read_artifacts()}

    # A rerun reuses every recorded run: nothing retrains, the numbers are the same.
    weights = paths.models / "grpo" / "seed0" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = xopd_study(params, workdir=str(work))
    assert weights.stat().st_mtime_ns == before
    assert again["table"].split("Time:")[0] == result["table"].split("Time:")[0]
