"""The `train` stage on the tiny world: checkpoint, metrics, dvclive series, baselines."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from tasks.cli import main
from tasks.train import distillation_prompts, train, training_device
from xopd_core.config import Params, TrainParams
from xopd_core.models.checkpoint import weights_sha256

TINY_TRAIN = TrainParams(
    steps=3, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=10, checkpoint_every=1
)


def params_with(tiny_pipeline_params: Params, **train_overrides) -> Params:
    return tiny_pipeline_params.model_copy(
        update={"train": TINY_TRAIN.model_copy(update=train_overrides)}
    )


def test_train_stage_writes_a_loadable_round_with_metrics_and_live_logs(
    tiny_world: Path, tiny_pipeline_params, tiny_teacher, tiny_student, tmp_path: Path
) -> None:
    start = tiny_student.summary.checkpoint
    out = tmp_path / "round1"
    summary = train(
        params_with(tiny_pipeline_params),
        tiny_world,
        start,
        tiny_teacher.checkpoint,
        out,
        tmp_path / "metrics.json",
        live_dir=tmp_path / "live",
    )
    assert summary.weights_sha256 == weights_sha256(out) != weights_sha256(start)
    resolved = json.loads((out / "xopd.json").read_text())
    assert resolved["from_weights_sha256"] == weights_sha256(start)
    assert resolved["params"]["steps"] == 3
    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(out))
    AutoProcessor.from_pretrained(str(out))
    assert isinstance(model, torch.nn.Module)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["student_tokens"] == metrics["teacher_tokens"] > 0
    with open(tmp_path / "live" / "plots" / "metrics" / "reverse_kl_speech.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert not (tmp_path / "round1.state").exists()  # the round completed
    # Only reasoning items are distilled: their transcripts carry the whole question.
    assert {p.task for p in distillation_prompts(tiny_world)} == {
        "navigate",
        "object_counting",
        "web_of_lies",
        "boolean_expressions",
    }


@pytest.mark.parametrize("method", ["sft", "offline_kd", "grpo"])
def test_baselines_run_as_the_train_stage(
    tiny_world: Path, tiny_pipeline_params, tiny_teacher, tiny_student, tmp_path: Path, method
) -> None:
    summary = train(
        params_with(tiny_pipeline_params, method=method, steps=2),
        tiny_world,
        tiny_student.summary.checkpoint,
        tiny_teacher.checkpoint,
        tmp_path / "out",
        tmp_path / "m.json",
    )
    assert summary.metrics["method"] == method and summary.metrics["student_tokens"] > 0
    assert (summary.metrics["teacher_tokens"] > 0) == (method == "offline_kd")


def test_cli_train_runs_a_round(
    tiny_world: Path, tiny_pipeline_params, tiny_teacher, tiny_student, tmp_path: Path, capsys
) -> None:
    params_file = tmp_path / "params.yaml"
    import yaml

    params_file.write_text(
        yaml.safe_dump(params_with(tiny_pipeline_params, steps=1).to_yaml_dict())
    )
    rc = main(
        [
            "train",
            "--params",
            str(params_file),
            "--data",
            str(tiny_world),
            "--student",
            str(tiny_student.summary.checkpoint),
            "--teacher",
            str(tiny_teacher.checkpoint),
            "--out",
            str(tmp_path / "r1"),
            "--metrics",
            str(tmp_path / "m.json"),
            "--live",
            str(tmp_path / "live"),
        ]
    )
    assert rc == 0 and (tmp_path / "r1" / "model.safetensors").is_file()
    assert "train: xopd 1 steps" in capsys.readouterr().out
    # The engine is a parameter (`train.engine`), recorded with the round, never a flag, so
    # the `rounds` stage's params in dvc.lock say which engine made the weights.
    assert json.loads((tmp_path / "m.json").read_text())["engine"] == "hf"
    for command in ("train", "rounds"):
        with pytest.raises(SystemExit) as refused:
            main([command, "--engine", "vllm"])
        assert refused.value.code == 2


def test_train_device_cuda_is_refused_clearly_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert training_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"train\.device is 'cuda' but torch sees no CUDA"):
        training_device("cuda")
    with pytest.raises(ValueError, match="device"):
        TrainParams.model_validate({"device": "tpu"})
