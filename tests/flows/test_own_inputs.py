"""#23 item 4: your own data (your task names, no paralinguistic items) and your own model
folders, named in params.yaml's `inputs` and `validate.tasks`: the campaign validates them,
evaluates round 0, trains, evaluates and gates a round, and reports, without building the
mini world."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from flows.campaign import xopd_campaign
from xopd_core.config import CampaignParams, InputsParams, Params, TaskSpec, ValidateParams
from xopd_core.data.validation import DataValidationError, read_validated_manifests

RENAMED = {"navigate": "homing"}  # a task of "yours": the same items under another name
REASONING = ("homing", "object_counting", "web_of_lies", "boolean_expressions")


def own_data(tiny_world: Path, out: Path) -> Path:
    """The tiny world as a user's dataset: navigate renamed, no paralinguistic items."""
    shutil.copytree(tiny_world, out, ignore=shutil.ignore_patterns("manifests"))
    (out / "manifests").mkdir()
    for path in (tiny_world / "manifests").glob("*.jsonl"):
        if path.name.startswith("para_"):
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        kept = [
            {**r, "task": RENAMED.get(r["task"], r["task"])}
            for r in rows
            if r["kind"] == "reasoning"
        ]
        (out / "manifests" / path.name).write_text("".join(json.dumps(r) + "\n" for r in kept))
    return out


def own_tasks() -> dict[str, TaskSpec]:
    numbers = (  # noqa: SIM905 (a line of words reads better than 21 quoted ones)
        "zero one two three four five six seven eight nine ten eleven twelve thirteen "
        "fourteen fifteen sixteen seventeen eighteen nineteen twenty"
    ).split()
    answers = {
        "homing": ["yes", "no"],
        "web_of_lies": ["yes", "no"],
        "boolean_expressions": ["true", "false"],
        "object_counting": numbers,
    }
    return {t: TaskSpec(kind="reasoning", answers=a) for t, a in answers.items()}


def test_the_suite_reads_your_tasks(tiny_world: Path, tmp_path: Path) -> None:
    data = own_data(tiny_world, tmp_path / "data")
    mine = ValidateParams(tasks=own_tasks())
    rows = read_validated_manifests(data, ["train", "eval"], mine, optional=["para_eval"])
    assert {r.task for r in rows["eval"]} == set(REASONING)
    assert "para_eval" not in rows  # optional, and this dataset has none
    # The mini world's table does not know "homing": the suite names the rule and the row.
    with pytest.raises(DataValidationError, match=r"task_known.*train\.jsonl"):
        read_validated_manifests(data, ["train"], ValidateParams())


@pytest.mark.usefixtures("prefect_server")
def test_a_campaign_on_your_own_data_and_models(
    tiny_world: Path, tiny_teacher, tiny_student, flow_params: Params, tmp_path: Path
) -> None:
    root = tmp_path / "work"
    own_data(tiny_world, root / "my" / "data")
    shutil.copytree(tiny_teacher.checkpoint, root / "my" / "teacher")
    shutil.copytree(tiny_student.summary.checkpoint, root / "my" / "student")
    # 8 new tokens answer nothing right: a stand-in for the teacher's measured scores.
    scores = {f"text_accuracy_{t}": 0.9 for t in REASONING}
    (root / "my" / "scores.json").write_text(json.dumps(scores))
    params = flow_params.model_copy(
        update={
            "inputs": InputsParams(
                data="my/data",
                teacher="my/teacher",
                student="my/student",
                teacher_scores="my/scores.json",
            ),
            "validate_": ValidateParams(tasks=own_tasks()),
            "campaign": CampaignParams(rounds=1),
        }
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params.to_yaml_dict(), sort_keys=False))
    result = xopd_campaign(params, workdir=str(root))

    assert result["ran"] == ["validate", "eval", "rounds", "report"]
    assert not (root / "data").exists() and not (root / "models" / "teacher").exists()
    assert not (root / "models" / "student").exists()
    eval0 = json.loads((root / "reports" / "eval" / "metrics.json").read_text())
    assert {k for k in eval0 if k.startswith("speech_accuracy_")} == {
        f"speech_accuracy_{t}" for t in (*REASONING, "mean")
    }
    assert "paralinguistic_accuracy" not in eval0
    assert eval0["avg_drop_tasks"] == 4
    rounds = json.loads((root / "reports" / "rounds.json").read_text())
    assert set(rounds) == {"round0", "round1"}
    assert rounds["round1"]["paralinguistic_accuracy"] is None
    assert any("no paralinguistic items" in r for r in rounds["round1"]["reasons"])
    assert (root / "models" / "rounds" / "round1" / "model.safetensors").is_file()
    table = (root / "reports" / "campaign.md").read_text()
    assert "| 1 |" in table and "| – |" in table
