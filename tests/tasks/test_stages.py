"""The stage table is dvc.yaml: its stages, order, params groups and outputs, read by DVC."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tasks.cli import main
from tasks.remote import dvc
from tasks.stages import PIPELINE_FILE, needed, pipeline, runner, stage_names
from xopd_core.config import InputsParams, Params


def test_the_pipeline_is_dvc_yamls_in_its_order_with_its_params() -> None:
    declared = yaml.safe_load(PIPELINE_FILE.read_text())["stages"]
    assert stage_names() == tuple(declared)
    stage = {s.name: s for s in pipeline()}
    assert stage["rounds"].params == ("train", "eval", "gate", "campaign", "validate_", "inputs")
    assert stage["validate"].params == ("validate_", "inputs")  # `validate:` is `validate_`
    assert stage["report"].params == ()
    assert stage["teacher"].outs == ("models/teacher", "reports/teacher/metrics.json")


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


def test_each_stage_has_its_runner_and_an_unknown_stage_is_named(tmp_path: Path) -> None:
    """dvc.yaml's `xopd stage NAME` calls tasks/NAME.py's `run`: every stage has one."""
    for name in stage_names():
        assert callable(runner(name))
    with pytest.raises(ValueError, match=r"stage 'no_such': no module tasks/no_such\.py"):
        runner("no_such")
    assert main(["stage", "no_such", "--workdir", str(tmp_path)]) == 2


def test_your_own_inputs_leave_the_mini_worlds_builders_out(tmp_path: Path) -> None:
    """`inputs` interpolated into dvc.yaml's paths (DVC's resolver): each builder drops out
    once nothing reads what it writes; a stage added after the report stays in."""
    everything = needed(Params(), PIPELINE_FILE.parent)
    assert everything == stage_names()

    def own(**inputs: str) -> tuple[str, ...]:
        return needed(Params(inputs=InputsParams(**inputs)), PIPELINE_FILE.parent)

    assert own(data="my/data", teacher="my/teacher", student="my/student") == (
        "validate",
        "eval",
        "rounds",
        "report",
    )
    # Your own student on the mini world: its data and teacher are still built.
    assert own(student="my/student") == tuple(s for s in everything if s != "student")
    # Your own teacher: the student stage still reads models/teacher to build its LM.
    assert own(teacher="my/teacher") == everything

    spec = yaml.safe_load(PIPELINE_FILE.read_text())
    spec["stages"]["distill_more"] = {"cmd": "xopd stage distill_more", "outs": ["models/more"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    assert needed(Params(), tmp_path)[-1] == "distill_more"
