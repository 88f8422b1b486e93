"""The stage table is dvc.yaml: its stages, order, params groups and outputs, read by DVC."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tasks.remote import dvc
from tasks.stages import PIPELINE_FILE, pipeline, stage_names, stage_params


def test_the_pipeline_is_dvc_yamls_in_its_order_with_its_params() -> None:
    declared = yaml.safe_load(PIPELINE_FILE.read_text())["stages"]
    assert stage_names() == tuple(declared)
    assert stage_params("rounds") == ("train", "eval", "gate", "campaign")
    assert stage_params("validate") == ("validate_",)  # the Params field behind `validate:`
    assert stage_params("report") == () and stage_params("no-such-stage") == ()
    teacher = next(s for s in pipeline() if s.name == "teacher")
    assert teacher.outs == ("models/teacher", "reports/teacher/metrics.json")


def test_a_stage_added_to_dvc_yaml_is_in_the_table(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc(tmp_path, "init", "-q").returncode == 0
    spec = yaml.safe_load(PIPELINE_FILE.read_text())
    spec["stages"]["distill_more"] = {
        "cmd": "xopd train --out models/more",
        "params": ["train", "gate"],
        "outs": ["models/more"],
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "params.yaml").write_text((PIPELINE_FILE.parent / "params.yaml").read_text())
    added = pipeline(tmp_path / "dvc.yaml")
    assert [s.name for s in added][-1] == "distill_more"
    assert added[-1].params == ("train", "gate") and added[-1].outs == ("models/more",)
