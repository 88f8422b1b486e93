"""The `student` stage (mini world only): the round-0 speech student.

A tiny Qwen2-Audio whose language model starts as the teacher, bootstrapped in three phases
on the speech train split (xopd_core/train/bootstrap.py): CTC encoder pre-training, audio
alignment through the frozen LM, speech instruction tuning. Saves a checkpoint folder
(safetensors, tokenizer, processor, resolved config) plus training metrics for DVC; the
`eval` stage measures it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import Qwen2ForCausalLM

from tasks.layout import DATA, STUDENT, STUDENT_METRICS, TEACHER
from tasks.progress import phase_bar
from xopd_core.atomic import write_json_atomic
from xopd_core.config import Params
from xopd_core.data.manifest import manifest_path
from xopd_core.data.validation import read_validated_manifests
from xopd_core.data.waveform import read_waveform, require_audio_fits
from xopd_core.data.world import HeardUtterance, speak_corpus
from xopd_core.models.audio import extract_features
from xopd_core.models.checkpoint import (
    require_safetensors_checkpoint,
    save_checkpoint,
    weights_sha256,
)
from xopd_core.models.prompts import text_prompt_ids
from xopd_core.models.student import build_processor, build_student
from xopd_core.models.tokenizer import PAD, load_tokenizer, token_id
from xopd_core.train.bootstrap import (
    SpeakerHead,
    SpeakerTargets,
    SpeechExample,
    align_through_lm,
    align_to_embeddings,
    cache_encoder_states,
    character_targets,
    instruct,
    instruction_mix,
    learn_to_read,
    phoneme_targets,
    pretrain_encoder_ctc,
    text_replay,
    transcription_examples,
)

CORPUS_PART = 1000  # pre-training utterances spoken at a time


@dataclass(frozen=True)
class StudentSummary:
    checkpoint: Path
    metrics_path: Path
    metrics: dict[str, Any]
    weights_sha256: str


def _mean_tail(losses: list[float], n: int = 20) -> float | None:
    return sum(losses[-n:]) / len(losses[-n:]) if losses else None


def student(
    params: Params,
    data_root: Path,
    teacher_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    on_step: Callable[[str, int, float], None] | None = None,
) -> StudentSummary:
    p = params.student
    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 1)
        clock = now

    def reporter(phase: str) -> Callable[[int, float], None] | None:
        if on_step is None:
            return None
        report = on_step
        return lambda step, loss: report(phase, step, loss)

    require_safetensors_checkpoint(Path(teacher_dir))
    manifests = read_validated_manifests(data_root, ["train", "text_train"], params.validate_)
    rows, text_rows = manifests["train"], manifests["text_train"]
    tokenizer = load_tokenizer(Path(teacher_dir))
    teacher = Qwen2ForCausalLM.from_pretrained(str(teacher_dir)).eval()
    processor = build_processor(tokenizer, p.audio)
    rate, window = processor.feature_extractor.sampling_rate, p.audio.chunk_length_s
    require_audio_fits(rows, manifest_path(data_root, "train"), window_s=window, sample_rate=rate)
    waves = [read_waveform(data_root / str(r.audio_path), rate, window) for r in rows]
    feats = extract_features(processor, waves)
    lap("features")
    # Phases 1-2 hear the train split plus a pre-training corpus spoken from the text corpus,
    # spoken in parts so only one part's waveforms are held (features are a third their size).
    texts = sorted({r.transcript for r in text_rows})
    heard_rows, heard_feats = [HeardUtterance.of(r) for r in rows], list(feats)
    for start in range(0, p.pretrain_utterances, CORPUS_PART):
        n = min(CORPUS_PART, p.pretrain_utterances - start)
        part = speak_corpus(params.synth, texts, n, p.seed, params.synth.workers, start)
        heard_rows += [c.heard() for c in part]
        heard_feats += extract_features(processor, [c.waveform for c in part])
    lap("pretrain_speech")

    # Phase 3's spoken items: the train split, then the first corpus utterances as the
    # text_train reasoning rows they speak (their states follow the split's).
    text_row_of = {r.transcript: r for r in reversed(text_rows)}
    spoken = rows + [
        text_row_of[c.transcript]
        for c in heard_rows[len(rows) : len(rows) + p.instruct.corpus_items]
    ]
    model = build_student(teacher, tokenizer, p.audio, seed=p.seed)
    pad = token_id(tokenizer, PAD)
    transcripts = [r.transcript for r in heard_rows]
    if p.ctc_units == "phonemes":
        languages = [r.voice.split("+")[0] for r in heard_rows]
        inventory, unit_ids = phoneme_targets(transcripts, languages)
    else:
        alphabet, unit_ids = character_targets(transcripts)
        inventory = list(alphabet)
    speaker_targets = SpeakerTargets.from_rows(heard_rows)
    speaker = SpeakerHead(p.audio.d_model, speaker_targets, seed=p.seed)
    ctc_losses = pretrain_encoder_ctc(
        model,
        heard_feats,
        unit_ids,
        len(inventory),
        p.ctc,
        seed=p.seed,
        on_step=reporter("ctc"),
        speaker=speaker,
        speaker_weight=p.speaker_loss_weight,
    )
    lap("ctc")
    if p.align_objective == "lm":
        align_losses = align_through_lm(
            model,
            heard_feats,
            transcription_examples(tokenizer, transcripts, [f.audio_tokens for f in heard_feats]),
            pad,
            p.align,
            seed=p.seed,
            on_step=reporter("align"),
            speaker=speaker,
            speaker_weight=p.speaker_loss_weight,
        )
    else:
        align_losses = align_to_embeddings(
            model,
            heard_feats,
            [list(tokenizer(t)["input_ids"]) for t in transcripts],
            p.align,
            seed=p.seed,
            on_step=reporter("align"),
            speaker=speaker,
            speaker_weight=p.speaker_loss_weight,
        )
    lap("align")
    read_losses: list[float] = []
    replay: list[SpeechExample] = []
    if p.read.steps > 0:
        # The train split's utterances come first among those heard, then the corpus: the
        # states of `spoken` serve phase 3 too.
        heard_states = cache_encoder_states(model, heard_feats)
        del heard_feats
        reading = transcription_examples(tokenizer, transcripts, [len(s) for s in heard_states])
        replay = text_replay(
            tokenizer,
            text_rows,
            lambda text: text_prompt_ids(tokenizer, text),
            p.read.text_replay_items,
            random.Random(p.seed),
            restatement=p.read.replay_restatement,
            task_weights=p.read.text_replay_task_weights,
        )
        read_losses = learn_to_read(
            model,
            heard_states,
            [*reading, *replay],
            pad,
            p.read,
            seed=p.seed,
            on_step=reporter("read"),
        )
        states = heard_states[: len(spoken)]
        del heard_states
    else:
        states = cache_encoder_states(model, heard_feats[: len(spoken)])
        del heard_feats
    lap("read")
    examples, mix = instruction_mix(
        tokenizer,
        spoken,
        [len(s) for s in states],
        text_rows,
        lambda text: text_prompt_ids(tokenizer, text),
        p.instruct,
        seed=p.seed,
    )
    instruct_losses = instruct(
        model, states, examples, pad, p.instruct, seed=p.seed, on_step=reporter("instruct")
    )
    lap("instruct")

    digest = save_checkpoint(
        model,
        out_dir,
        savers=[processor],
        resolved_config={
            "stage": "student",
            "teacher_weights_sha256": weights_sha256(Path(teacher_dir)),
            "params": p.model_dump(mode="json"),
        },
    )
    lap("save")
    metrics: dict[str, Any] = {
        "ctc_final_loss": _mean_tail(ctc_losses),
        "align_final_loss": _mean_tail(align_losses),
        "read_final_loss": _mean_tail(read_losses),
        "instruct_final_loss": _mean_tail(instruct_losses),
        "parameters": sum(t.numel() for t in model.parameters()),
        "audio_parameters": sum(
            t.numel()
            for part in (model.model.audio_tower, model.model.multi_modal_projector)
            for t in part.parameters()
        ),
        "train_utterances": len(rows),
        "pretrain_utterances": p.pretrain_utterances,
        "ctc_units": len(inventory),
        "read_text_replay": len(replay),
        **{f"mix_{k}": v for k, v in mix.items()},
        **{f"seconds_{k}": v for k, v in seconds.items()},
        "total_seconds": round(sum(seconds.values()), 1),
        "weights_sha256": digest,
    }
    write_json_atomic(Path(metrics_path), metrics)
    return StudentSummary(Path(out_dir), Path(metrics_path), metrics, digest)


def run(params: Params, root: Path, progress: bool = False) -> str:
    """The stage on the work folder `root` (dvc.yaml's paths)."""
    paths = (root / DATA, root / TEACHER, root / STUDENT, root / STUDENT_METRICS)
    bars = phase_bar(params) if progress else None
    summary = student(params, *paths, on_step=bars)
    return f"bootstrapped in {summary.metrics['total_seconds']:.0f} s → {STUDENT}"
