"""The `train` stage: one round of X-OPD (or a baseline) from a student checkpoint.

Prompts are the speech train split's reasoning items, each a parallel pair (audio S,
transcript T); paralinguistic items are not parallel (the transcript lacks the answer), so
the teacher cannot score them. Engines are HF (default) or vLLM (`train.engine: vllm`: the
student samples in vLLM with the round's starting weights, the teacher scores in vLLM). Per-step
metrics go to dvclive; a resumable state lives in `state_dir` until the round completes.
Optional snapshots (loadable checkpoints at given student-token counts) trace a learning curve.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from tasks.layout import LOCK_HELD_ENV
from xopd_core.atomic import write_json_atomic
from xopd_core.config import ConfigError, Params, TrainParams
from xopd_core.data.manifest import ManifestRow, manifest_path, read_rows
from xopd_core.data.tasks import answer_sets
from xopd_core.data.validation import read_validated_manifests
from xopd_core.data.waveform import require_audio_fits
from xopd_core.engines.base import Prompt
from xopd_core.engines.hf import HfStudent
from xopd_core.engines.scoring import shared_vocab_size
from xopd_core.models.checkpoint import (
    RESOLVED_CONFIG,
    causal_lm_config,
    save_checkpoint,
    weights_sha256,
)
from xopd_core.models.families import load_student
from xopd_core.models.prompts import TRANSCRIBE
from xopd_core.models.tokenizer import IM_END, load_tokenizer, token_id
from xopd_core.runtime import launched_rank, without_launcher
from xopd_core.train.distill import AnchorItem
from xopd_core.train.distill import train as run_trainer
from xopd_core.train.methods import method_engines


@dataclass(frozen=True)
class Snapshot:
    """A checkpoint saved during training, at the end of `step` (1-based: steps done)."""

    checkpoint: Path
    step: int
    student_tokens: int


@dataclass(frozen=True)
class TrainSummary:
    checkpoint: Path
    metrics_path: Path
    metrics: dict[str, Any]
    weights_sha256: str
    snapshots: list[Snapshot] = field(default_factory=list)


def read_snapshot(path: Path) -> Snapshot:
    meta = json.loads((path / RESOLVED_CONFIG).read_text())
    return Snapshot(path, int(meta["step"]), int(meta["student_tokens"]))


def saved_snapshots(snapshot_dir: Path, points: int) -> list[Snapshot]:
    """The snapshots a run saved, `snapshot_dir/point<i>` for i < points, in order."""
    paths = (snapshot_dir / f"point{i}" for i in range(points))
    return [read_snapshot(path) for path in paths if path.is_dir()]


def anchor_items(data_root: Path, rows: list[ManifestRow], tokenizer: Any) -> list[AnchorItem]:
    """The anchor's items (`train.anchor_items`): every paralinguistic train item with its gold
    answer, and every reasoning item's transcription."""
    eos = token_id(tokenizer, IM_END)

    def said(text: str) -> list[int]:
        return [*tokenizer(text)["input_ids"], eos]

    items = []
    for r in rows:
        prompt = Prompt(r.id, r.transcript, data_root / str(r.audio_path), r.task)
        if r.kind == "reasoning":
            items.append(AnchorItem(prompt, TRANSCRIBE, said(r.transcript)))
        else:
            items.append(AnchorItem(prompt, None, said(r.solution)))
    return items


def distillation_prompts(data_root: Path, rows: list[ManifestRow] | None = None) -> list[Prompt]:
    """The train split's reasoning items (`rows`: that split, already read and validated)."""
    if rows is None:
        rows = read_rows(manifest_path(data_root, "train"))
    return [
        Prompt(r.id, r.transcript, data_root / str(r.audio_path), r.task, r.answer)
        for r in rows
        if r.kind == "reasoning"
    ]


class _DvcLiveLog:
    """Per-step metrics as a dvclive series (plots for `dvc plots show`)."""

    def __init__(self, folder: Path) -> None:
        from dvclive import Live

        self.live = Live(str(folder), dvcyaml=False, save_dvc_exp=False)

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.live.step = step
        for k, v in metrics.items():
            self.live.log_metric(k, v)
        self.live.next_step()

    def close(self) -> None:
        self.live.end()


def training_device(p: TrainParams) -> torch.device:
    """`train.device` as a torch device, refused when no such device is visible; under a
    launcher, this rank's GPU (LOCAL_RANK). Several ranks on CUDA must be launched: forks
    of one process cannot share a GPU."""
    if p.device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            "params train.device is 'cuda' but torch sees no CUDA device "
            f"(torch {torch.__version__}); set train.device: cpu or install a CUDA build"
        )
    if launched_rank() is None:
        if p.processes > 1:
            raise ConfigError(
                f"params train.processes is {p.processes} with train.device cuda: start one "
                f"process per GPU with torchrun --nproc-per-node {p.processes} (README: "
                "Scaling out), or set train.processes: 1"
            )
        return torch.device("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def launch_torchrun(
    params: Params,
    data_root: Path,
    student_dir: Path,
    teacher_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    live_dir: Path | None,
    snapshot_tokens: Sequence[int],
    snapshot_dir: Path,
) -> TrainSummary:
    """`train.launcher: torchrun`: the same training as `xopd train` under `torchrun
    --standalone --nproc-per-node train.processes` on this machine; its output streams to
    this process's. Raises when torchrun fails (the state folder keeps the last checkpoint
    and the snapshots saved, so running again resumes)."""
    bin_dir = Path(sys.executable).parent
    torchrun, xopd = bin_dir / "torchrun", bin_dir / "xopd"
    with tempfile.TemporaryDirectory(prefix="xopd-launch-") as folder:
        params_file = Path(folder) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params.to_yaml_dict(), sort_keys=False))
        cmd = [str(torchrun), "--standalone", "--nproc-per-node", str(params.train.processes)]
        cmd += ["--no-python", str(xopd), "train", "--params", str(params_file)]
        cmd += ["--data", str(data_root), "--student", str(student_dir)]
        cmd += ["--teacher", str(teacher_dir), "--out", str(out_dir)]
        cmd += ["--metrics", str(metrics_path)]
        cmd += ["--live", str(live_dir)] if live_dir is not None else []
        if snapshot_tokens:
            cmd += ["--snapshot-tokens", ",".join(map(str, snapshot_tokens))]
            cmd += ["--snapshot-dir", str(snapshot_dir)]
        # torchrun sets its own rank variables; the stage that launches holds the lock
        env = without_launcher(os.environ) | {LOCK_HELD_ENV: "1"}
        done = subprocess.run(cmd, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"train.launcher torchrun: `{' '.join(cmd[:5])} … xopd train` exited with "
            f"{done.returncode} (its ranks' errors are above); the round resumes from "
            f"{out_dir.name}.state when run again"
        )
    metrics = json.loads(metrics_path.read_text())
    snapshots = saved_snapshots(snapshot_dir, len(snapshot_tokens))
    return TrainSummary(out_dir, metrics_path, metrics, weights_sha256(out_dir), snapshots)


def train(
    params: Params,
    data_root: Path,
    student_dir: Path,
    teacher_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    *,
    state_dir: Path | None = None,
    live_dir: Path | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    snapshot_tokens: Sequence[int] = (),
    snapshot_dir: Path | None = None,
) -> TrainSummary:
    """`snapshot_tokens`: save a loadable checkpoint, `snapshot_dir/point<i>`, at the end of
    the first step whose cumulative student tokens reach the i-th count. One already on disk
    (a resumed run) is kept: each records the step and tokens it was saved at."""
    p = params.train
    snapshot_dir = snapshot_dir or out_dir.with_name(out_dir.name + ".snapshots")
    if p.launcher == "torchrun" and launched_rank() is None:
        return launch_torchrun(
            params,
            data_root,
            student_dir,
            teacher_dir,
            out_dir,
            metrics_path,
            live_dir,
            snapshot_tokens,
            snapshot_dir,
        )
    clock = time.perf_counter()
    device = training_device(p)
    launched = launched_rank()
    rank0 = launched is None or launched[0] == 0  # the rank that logs and writes
    # Everything a step needs is checked before the first step: the checkpoints (safetensors,
    # whole; the teacher a text causal LM) and the train manifest with the validate stage's
    # suite (audio included).
    teacher_config = causal_lm_config(teacher_dir)
    base_hash = weights_sha256(student_dir)
    rows = read_validated_manifests(data_root, ["train"], params.validate_)["train"]
    prompts = distillation_prompts(data_root, rows)
    model, processor = load_student(student_dir)  # refuses a class xopd has no adapter for
    model.to(device)
    if p.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    extractor = processor.feature_extractor
    require_audio_fits(
        rows,
        manifest_path(data_root, "train"),
        window_s=extractor.chunk_length,
        sample_rate=extractor.sampling_rate,
    )
    teacher_tok = load_tokenizer(teacher_dir)
    vocab = shared_vocab_size(  # the vocabulary contract: refuses a mismatched pair
        processor.tokenizer,
        teacher_tok,
        student_rows=model.get_output_embeddings().weight.shape[0],
        teacher_rows=teacher_config.vocab_size,
    )
    student = HfStudent(model, processor, vocab_size=vocab)
    state_dir = state_dir or out_dir.with_name(out_dir.name + ".state")
    solutions = {r.id: r.solution for r in rows}

    def save_snapshots(step: int, metrics: dict[str, float]) -> None:
        tokens = int(metrics["student_tokens"])
        for i, wanted in enumerate(snapshot_tokens):
            out = snapshot_dir / f"point{i}"
            if tokens >= wanted and not out.is_dir():
                save_checkpoint(
                    model,
                    out,
                    savers=[processor],
                    resolved_config={"step": step + 1, "student_tokens": tokens},
                )

    def after_step(step: int, metrics: dict[str, float]) -> None:
        if snapshot_tokens:
            save_snapshots(step, metrics)
        if on_step is not None:
            on_step(step, metrics)

    # A fresh series each time: on resume the trainer replays the steps it restored.
    log = _DvcLiveLog(live_dir) if live_dir and rank0 else None
    with (
        method_engines(
            p,
            student,
            student_dir,
            teacher_dir,
            teacher_tok,
            vocab,
            prompts,
            solutions,
            device,
            answer_sets(params.validate_),
        ) as engines,
        contextlib.closing(log) if log is not None else contextlib.nullcontext(),
    ):
        result = run_trainer(
            student,
            engines.rollout,
            engines.scorer,
            prompts,
            p,
            vocab_size=vocab,
            state_dir=state_dir,
            reward=engines.reward,
            teacher_tokens_spent=engines.teacher_tokens_spent,
            log=log,
            on_step=after_step if on_step or snapshot_tokens else None,
            start_weights_sha256=base_hash,
            anchors=anchor_items(data_root, rows, processor.tokenizer) if p.anchor_items else (),
        )
    digest = save_checkpoint(
        model,
        out_dir,
        savers=[processor],
        resolved_config={"params": p.model_dump(mode="json"), "from_weights_sha256": base_hash},
    )
    last = result.history[-1] if result.history else {}
    metrics = {
        "method": p.method,
        "engine": p.engine,
        "steps": result.steps,
        "student_tokens": result.student_tokens,
        "student_tokens_budget": p.student_tokens,
        "teacher_tokens": result.teacher_tokens,
        "resumed_from_step": result.resumed_from,
        "final_loss": last.get("loss"),
        "final_reverse_kl_speech": last.get("reverse_kl_speech"),
        "final_reverse_kl_text": last.get("reverse_kl_text"),
        "seconds": round(time.perf_counter() - clock, 1),
    }
    write_json_atomic(metrics_path, metrics)
    shutil.rmtree(state_dir, ignore_errors=True)  # the round is complete: its checkpoint is out
    snapshots = saved_snapshots(snapshot_dir, len(snapshot_tokens))
    return TrainSummary(out_dir, metrics_path, metrics, digest, snapshots)
