"""The `xopd-round` flow end to end on the tiny world, through a real Prefect server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect.client.orchestration import get_client

from flows.round import xopd_round
from xopd_core.config import EvalParams, Params, TrainParams
from xopd_core.gate import read_champion


def workdir_for(tmp: Path, world: Path, teacher, student) -> Path:
    (tmp / "data").mkdir()
    (tmp / "data" / "mini").symlink_to(world)
    shutil.copytree(teacher.checkpoint, tmp / "models" / "teacher")
    shutil.copytree(student.summary.checkpoint, tmp / "models" / "student")
    # The 40-step tiny teacher answers nothing right; the Avg-Drop needs a non-zero
    # reference, so the flow reads a stand-in teacher score file.
    (tmp / "reports" / "teacher").mkdir(parents=True)
    scores = {
        f"text_accuracy_{t}": 0.9
        for t in ("navigate", "object_counting", "web_of_lies", "boolean_expressions")
    }
    (tmp / "reports" / "teacher" / "metrics.json").write_text(json.dumps(scores))
    return tmp


def test_round_flow_trains_evaluates_gates_and_publishes_artifacts(
    prefect_server,
    tiny_world: Path,
    tiny_pipeline_params: Params,
    tiny_teacher,
    tiny_student,
    tmp_path: Path,
) -> None:
    work = workdir_for(tmp_path, tiny_world, tiny_teacher, tiny_student)
    params = tiny_pipeline_params.model_copy(
        update={
            "train": TrainParams(
                steps=2, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=8
            ),
            "eval": EvalParams(max_new_tokens=8),
        }
    )
    result = xopd_round(params, round=1, workdir=str(work))
    assert result["round"] == 1 and isinstance(result["promoted"], bool)
    for k in (0, 1):  # the starting student was evaluated and gated first (no champion yet)
        base = work / ("reports" if k == 0 else f"reports/round{k}")
        assert json.loads((base / "gate" / "metrics.json").read_text())["round"] == k
    champion = read_champion(work / "champion.json")
    assert champion is not None
    assert champion.round == (1 if result["promoted"] else 0)
    assert (work / "models" / "round1" / "model.safetensors").is_file()
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"round-1", "validation-report"} <= keys


def test_campaign_runs_rounds_that_chain_and_reports_them(
    prefect_server,
    tiny_world: Path,
    tiny_pipeline_params: Params,
    tiny_teacher,
    tiny_student,
    tmp_path: Path,
) -> None:
    from flows.campaign import xopd_campaign
    from xopd_core.models.checkpoint import RESOLVED_CONFIG, weights_sha256

    work = workdir_for(tmp_path, tiny_world, tiny_teacher, tiny_student)
    params = tiny_pipeline_params.model_copy(
        update={
            "train": TrainParams(
                steps=1, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=8
            ),
            "eval": EvalParams(max_new_tokens=8),
        }
    )
    result = xopd_campaign(params, rounds=2, workdir=str(work))
    assert result["bootstrapped"] == [] and len(result["rounds"]) == 2  # all inputs were there
    # Round 2 started from round 1's weights.
    r2 = json.loads((work / "models" / "round2" / RESOLVED_CONFIG).read_text())
    assert r2["from_weights_sha256"] == weights_sha256(work / "models" / "round1")
    table = (work / "reports" / "campaign.md").read_text()
    assert all(f"| {k} |" in table for k in (0, 1, 2)) and "Champion: round" in table


def test_nightly_never_writes_beside_a_run_in_progress(
    prefect_server,
    tiny_world: Path,
    tiny_pipeline_params: Params,
    tiny_teacher,
    tiny_student,
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    import pytest

    from flows.nightly import next_round, xopd_nightly
    from xopd_core.lock import Busy

    work = workdir_for(tmp_path, tiny_world, tiny_teacher, tiny_student)
    params = tiny_pipeline_params.model_copy(
        update={
            "train": TrainParams(
                steps=1, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=8
            ),
            "eval": EvalParams(max_new_tokens=8),
        }
    )
    holder = subprocess.Popen(  # another run holding the work folder
        [
            sys.executable,
            "-c",
            "import sys, time; from xopd_core.lock import exclusive\n"
            "with exclusive(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)",
            str(work / ".xopd.lock"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match="another xopd run holds"):
            xopd_nightly(params, workdir=str(work), wait_s=1.0)
        assert not (work / "models" / "round1").exists() and not (work / "champion.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert next_round(work) == 1
    result = xopd_nightly(params, workdir=str(work))
    assert result["round"] == 1 and next_round(work) == 2
