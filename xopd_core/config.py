"""The one typed mirror of params.yaml, and its one loader.

Every field has a description and a range check; defaults are the paper's where it gives one
(arXiv 2603.24596) and the mini world's (DESIGN.md §4) otherwise. Unknown keys are errors.
This module reads YAML and the environment; nothing else in xopd_core does.
"""

from __future__ import annotations

import json
import os
import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from xopd_core.runtime import launched_rank

PARAMS_ENV_VAR = "XOPD_PARAMS"
DEFAULT_PARAMS_FILE = "params.yaml"


# Training forward precision, and how a supervised loss averages (train/sft.py).
Precision = Literal["float32", "bf16"]
MeanOver = Literal["tokens", "examples"]
# A supervised batch run in length-sorted parts (train/sft.py `micro_batches`).
MicroBatchSize = Annotated[
    int | None,
    Field(
        ge=1,
        le=4096,
        description="Run each batch in length-sorted parts of at most this many sequences "
        "and add their gradients: the same objective as one pass, padded less "
        "(docs/speed.md). null: one pass per batch.",
    ),
]
# Which tasks a phase's replayed text solutions come from (train/bootstrap.py `text_replay`).
ReplayTaskWeights = Annotated[
    dict[str, Annotated[float, Field(gt=0, le=1000)]] | None,
    Field(
        description="Each reasoning task's share of the replayed text solutions, normalised "
        "to sum to 1; a task left out is not replayed. null: drawn from text_train as it "
        "comes (an even mix).",
    ),
]
Processes = Annotated[
    int,
    Field(
        ge=1,
        le=64,
        description="torch.distributed ranks that share each batch's micro-batches (this "
        "process and forks of it, each with its share of the threads; docs/speed.md), also for "
        "the stage's greedy evaluation. A tiny model gains more from a second process than "
        "from a second thread. Results repeat exactly for a fixed count and differ from other "
        "counts in float rounding only.",
    ),
]


class ConfigError(ValueError):
    """params.yaml is unreadable or does not validate; the message names file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _ordered_range(lo: int | float, hi: int | float, what: str) -> None:
    if lo > hi:
        raise ValueError(f"{what}: min ({lo}) is greater than max ({hi})")


Count = Annotated[int, Field(ge=0, le=200_000)]


class IntRange(_Strict):
    """An inclusive [min, max] integer range."""

    min: int = Field(description="Smallest value (inclusive).", ge=0, le=10_000)
    max: int = Field(description="Largest value (inclusive).", ge=0, le=10_000)

    @model_validator(mode="after")
    def _check_order(self) -> IntRange:
        _ordered_range(self.min, self.max, "range")
        return self


class Difficulty(_Strict):
    """How many reasoning steps each task family needs (sampled uniformly per item)."""

    navigate_moves: IntRange = Field(
        default=IntRange(min=3, max=5),
        description="Number of movement instructions in a navigate item.",
    )
    navigate_max_step: int = Field(
        default=3, ge=1, le=9, description="Largest number of steps in one navigate move."
    )
    counting_items: IntRange = Field(
        default=IntRange(min=3, max=5),
        description="Number of item kinds listed in an object-counting item.",
    )
    counting_max_per_item: int = Field(
        default=3, ge=1, le=5, description="Largest count of one item kind (1 = 'a cat')."
    )
    lies_people: IntRange = Field(
        default=IntRange(min=3, max=5),
        description="Number of people in a web-of-lies chain.",
    )
    boolean_operands: IntRange = Field(
        default=IntRange(min=2, max=4),
        description="Number of truth-value operands in a boolean-expression item.",
    )

    @model_validator(mode="after")
    def _check_minimums(self) -> Difficulty:
        for name in ("navigate_moves", "counting_items", "lies_people", "boolean_operands"):
            rng: IntRange = getattr(self, name)
            if rng.min < 2:
                raise ValueError(f"{name}.min must be at least 2 (got {rng.min})")
        if self.navigate_moves.max * self.navigate_max_step > 20:
            # Coordinates in the worked solution are spelled as number words up to twenty.
            raise ValueError(
                f"navigate_moves.max × navigate_max_step must stay ≤ 20 "
                f"(got {self.navigate_moves.max} × {self.navigate_max_step})"
            )
        if self.lies_people.max > 10:
            raise ValueError(
                f"lies_people.max must be ≤ 10, the number of names (got {self.lies_people.max})"
            )
        cap = 20 // self.counting_max_per_item
        if self.counting_items.max > cap:
            # Answers are spelled as number words up to twenty.
            raise ValueError(
                f"counting_items.max × counting_max_per_item must stay ≤ 20 "
                f"(got {self.counting_items.max} × {self.counting_max_per_item})"
            )
        return self


class Voices(_Strict):
    """espeak-ng speaker settings: ordinary items vary within the 'normal' ranges, and the
    paralinguistic items use the contrasting extremes, so their answer is only in the audio."""

    languages: list[str] = Field(
        default=["en-us", "en-gb"], min_length=1, description="espeak-ng English voices."
    )
    variants: list[str] = Field(
        default=["m1", "m2", "m3", "m4", "f1", "f2", "f3", "f4"],
        min_length=1,
        description="espeak-ng voice variants for ordinary (non-whispered) speech.",
    )
    whisper_variant: str = Field(
        default="whisper", min_length=1, description="Variant used for 'whispered' items."
    )
    normal_rate_wpm: IntRange = Field(
        default=IntRange(min=140, max=190), description="Speaking rate of ordinary items."
    )
    slow_rate_wpm: IntRange = Field(
        default=IntRange(min=95, max=115), description="Rate of items labelled 'slow'."
    )
    fast_rate_wpm: IntRange = Field(
        default=IntRange(min=240, max=280), description="Rate of items labelled 'fast'."
    )
    normal_pitch: IntRange = Field(
        default=IntRange(min=35, max=65), description="espeak-ng pitch (0-99), ordinary items."
    )
    low_pitch: IntRange = Field(
        default=IntRange(min=0, max=15), description="Pitch of items labelled 'low'."
    )
    high_pitch: IntRange = Field(
        default=IntRange(min=85, max=99), description="Pitch of items labelled 'high'."
    )

    @model_validator(mode="after")
    def _check_contrast(self) -> Voices:
        for name in ("normal_pitch", "low_pitch", "high_pitch"):
            if getattr(self, name).max > 99:
                raise ValueError(f"{name}.max must be ≤ 99 (espeak-ng's pitch scale)")
        for name in ("normal_rate_wpm", "slow_rate_wpm", "fast_rate_wpm"):
            rng = getattr(self, name)
            if not 80 <= rng.min <= rng.max <= 450:
                raise ValueError(f"{name} must lie within 80..450 words per minute")
        if not self.slow_rate_wpm.max < self.normal_rate_wpm.min:
            raise ValueError("slow_rate_wpm must lie entirely below normal_rate_wpm")
        if not self.normal_rate_wpm.max < self.fast_rate_wpm.min:
            raise ValueError("fast_rate_wpm must lie entirely above normal_rate_wpm")
        if not self.low_pitch.max < self.normal_pitch.min:
            raise ValueError("low_pitch must lie entirely below normal_pitch")
        if not self.normal_pitch.max < self.high_pitch.min:
            raise ValueError("high_pitch must lie entirely above normal_pitch")
        if self.whisper_variant in self.variants:
            raise ValueError("whisper_variant must not also be an ordinary variant")
        return self


class SynthParams(_Strict):
    """The mini-world generator (DESIGN.md §4): sizes, difficulty, voices."""

    seed: int = Field(default=20260324, ge=0, le=2**32 - 1, description="Generator seed.")
    train_per_task: Count = Field(
        default=500, description="Training items per reasoning task family."
    )
    eval_per_task: Count = Field(default=250, description="Eval items per reasoning task family.")
    text_train_per_task: Count = Field(
        default=10_000,
        description="Text-only training items per reasoning family (the text LLM's corpus; "
        "repeats allowed, never an eval prompt).",
    )
    para_train_per_task: Count = Field(
        default=500,
        description="Training items per paralinguistic task (the whisper voice appears only "
        "in half of the whisper task's items).",
    )
    para_eval_per_task: Count = Field(
        default=100, description="Eval items per paralinguistic task."
    )
    dev_per_task: Count = Field(
        default=100,
        description="Dev items per reasoning task family: held out like eval, for tuning.",
    )
    para_dev_per_task: Count = Field(
        default=50, description="Dev items per paralinguistic task: held out, for tuning."
    )
    sample_rate: int = Field(
        default=16_000, ge=8_000, le=48_000, description="Output audio sample rate (Hz)."
    )
    workers: int = Field(default=2, ge=1, le=64, description="Parallel espeak-ng/sox processes.")
    restate_question: bool = Field(
        default=False,
        description="Begin every reasoning item's worked solution with its question, word "
        "for word (the teacher, the student and the references all answer that way). At the "
        "default difficulty the longest solution is then 152 tokens: set teacher, eval and "
        "train max_new_tokens to 176.",
    )
    difficulty: Difficulty = Field(default=Difficulty(), description="Reasoning depth.")
    voices: Voices = Field(default=Voices(), description="Speaker settings.")


_ANSWER_WORD = re.compile(r"[a-z0-9]+")


class TaskSpec(_Strict):
    """One task of your own dataset."""

    kind: Literal["reasoning", "paralinguistic"] = Field(
        description="reasoning: scored by Avg-Drop against the teacher; paralinguistic: "
        "answered from what only the audio carries (accuracy, kept by the gate)."
    )
    answers: list[str] = Field(
        min_length=1,
        description="The legal answers: lower-case words of letters and digits; a response "
        'ends with "the answer is <word>."',
    )

    @model_validator(mode="after")
    def _check_answers(self) -> TaskSpec:
        bad = [a for a in self.answers if not _ANSWER_WORD.fullmatch(a)]
        if bad:
            raise ValueError(f"answers {bad}: each must be one lower-case word of [a-z0-9]")
        return self


class ValidateParams(_Strict):
    """Rules the `validate` stage enforces on every dataset before it is used."""

    tasks: dict[str, TaskSpec] | None = Field(
        default=None,
        description="Your dataset's tasks, {name: {kind, answers}}; null: the mini world's "
        "seven (navigate, object_counting, web_of_lies, boolean_expressions; speaking_rate, "
        "pitch, whisper).",
    )

    sample_rate: int = Field(
        default=16_000, ge=8_000, le=48_000, description="Required audio sample rate (Hz)."
    )
    channels: int = Field(default=1, ge=1, le=8, description="Required channel count.")
    min_duration_s: float = Field(
        default=0.3, gt=0, le=60, description="Shortest allowed utterance (s)."
    )
    max_duration_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Longest allowed utterance (s); 30 s is one Qwen2-Audio encoder window.",
    )
    duration_tolerance_s: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Allowed gap between the manifest's duration and the decoded audio's.",
    )

    @model_validator(mode="after")
    def _check_durations(self) -> ValidateParams:
        _ordered_range(self.min_duration_s, self.max_duration_s, "min/max_duration_s")
        return self


class LMShape(_Strict):
    """Size of a tiny Qwen2 language model (teacher, and the student's LM that copies it)."""

    hidden_size: int = Field(default=128, ge=32, le=8192, description="Hidden width.")
    num_layers: int = Field(default=2, ge=1, le=64, description="Transformer blocks.")
    num_heads: int = Field(default=4, ge=1, le=64, description="Attention heads.")
    num_kv_heads: int = Field(default=2, ge=1, le=64, description="Key/value heads (GQA).")
    intermediate_size: int = Field(
        default=256, ge=32, le=32768, description="MLP width (default 2x hidden)."
    )
    max_positions: int = Field(default=1024, ge=64, le=32768, description="Longest sequence.")

    @model_validator(mode="after")
    def _check_heads(self) -> LMShape:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        if self.hidden_size // self.num_heads < 32:
            # vLLM's CPU attention backend refuses head_dim < 32 (DESIGN.md §4).
            raise ValueError(
                f"head_dim = hidden_size / num_heads must be ≥ 32 for vLLM's CPU backend "
                f"(got {self.hidden_size // self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        return self


class AudioEncoderShape(_Strict):
    """Size of the student's Whisper-style audio encoder (Qwen2-Audio's audio tower)."""

    d_model: int = Field(default=128, ge=16, le=4096, description="Encoder width.")
    num_layers: int = Field(default=2, ge=1, le=64, description="Encoder blocks.")
    num_heads: int = Field(default=4, ge=1, le=64, description="Encoder attention heads.")
    ffn_dim: int = Field(default=512, ge=16, le=16384, description="Encoder MLP width.")
    num_mel_bins: int = Field(default=80, ge=16, le=256, description="Log-mel features.")
    hop_length: Literal[160, 320] = Field(
        default=160,
        description="Samples between mel frames at 16 kHz: 160 (Whisper's 100 frames/s, 25 "
        "audio positions per second of speech in the LM) or 320 (50 frames/s, 12.5 positions/s).",
    )
    chunk_length_s: int = Field(
        default=30,
        ge=1,
        le=60,
        description="Feature window (s); at most 3000 mel frames. vLLM 0.31 accepts only "
        "3000 frames: 30 s at hop 160, 60 s at hop 320.",
    )

    @model_validator(mode="after")
    def _check_heads(self) -> AudioEncoderShape:
        if self.d_model % self.num_heads:
            raise ValueError("d_model must be a multiple of num_heads")
        frames = self.chunk_length_s * 16_000 // self.hop_length
        if frames > 3000:
            raise ValueError(
                f"chunk_length_s {self.chunk_length_s} at hop_length {self.hop_length} is "
                f"{frames} mel frames; the encoder takes at most 3000"
            )
        return self


class Phase(_Strict):
    """One supervised training phase: AdamW, linear warm-up, cosine decay to 10 %."""

    steps: int = Field(ge=0, le=1_000_000, description="Optimizer steps (0 skips the phase).")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Examples per step.")
    lr: float = Field(gt=0, le=1, description="Peak learning rate.")
    warmup_steps: int = Field(default=20, ge=0, le=100_000, description="Linear warm-up.")
    weight_decay: float = Field(default=0.01, ge=0, le=1, description="AdamW weight decay.")
    precision: Precision = Field(
        default="float32",
        description="Training forward pass: float32, or bfloat16 CPU autocast (matrix "
        "products in bf16; weights, gradients, optimizer state and loss float32). Without "
        "AMX/AVX512-BF16 it is slower (a warning says so; docs/speed.md).",
    )


class BatchedPhase(Phase):
    """A phase whose batches run in micro-batches, dealt out to `processes` ranks."""

    micro_batch_size: MicroBatchSize = 8
    processes: Processes = 2

    @model_validator(mode="after")
    def _check_processes(self) -> BatchedPhase:
        if self.processes > 1 and self.micro_batch_size is None:
            raise ValueError("processes > 1 deals out micro-batches: set micro_batch_size")
        return self


class TeacherParams(BatchedPhase):
    """The `teacher` stage: a tiny text LM trained on the text tasks' worked solutions."""

    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Init and data-order seed.")
    model: LMShape = Field(default=LMShape(), description="Architecture.")
    steps: int = Field(default=1500, ge=1, le=1_000_000, description="Optimizer steps.")
    lr: float = Field(default=3e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(default=50, ge=0, le=100_000, description="Linear warm-up.")
    task_weights: dict[str, Annotated[float, Field(gt=0, le=1000)]] | None = Field(
        default_factory=lambda: {
            "navigate": 0.25,
            "object_counting": 0.30,
            "web_of_lies": 0.15,
            "boolean_expressions": 0.30,
        },
        description="Each reasoning task's share of the training examples, normalised to "
        "sum to 1; every task of the text corpus needs one, and a task whose share exceeds "
        "its items is read more than once per pass (docs/teacher.md). null: the corpus's own mix.",
    )
    max_new_tokens: int = Field(
        default=128, ge=1, le=4096, description="Generation budget when evaluating."
    )


class InstructPhase(BatchedPhase):
    """Speech instruction tuning: the data mix of the LM phase (DESIGN.md §4, README)."""

    speech_solution_fraction: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="Share of spoken reasoning items answered with a worked solution; the "
        "rest are answered directly ('the answer is X.'), as in typical spoken-QA corpora.",
    )
    short_answer_tasks: list[
        Literal["boolean_expressions", "navigate", "object_counting", "web_of_lies"]
    ] = Field(
        default_factory=list,
        description="Reasoning tasks whose spoken items are all answered directly ('the "
        "answer is X.'), whatever speech_solution_fraction says; the fraction applies to the "
        "other tasks' items. []: none.",
    )
    asr_items: int = Field(
        default=500, ge=0, le=1_000_000, description="Transcription examples (audio → text)."
    )
    text_replay_items: int = Field(
        default=2000,
        ge=0,
        le=1_000_000,
        description="Text-only worked solutions replayed from text_train (keeps text ability).",
    )
    text_replay_task_weights: ReplayTaskWeights = None
    corpus_items: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Spoken prompts of the pre-training corpus (the first this many of "
        "student.pretrain_utterances) that join the train split's spoken reasoning items, "
        "answered like them (speech_solution_fraction) from text_train's solutions; they may "
        "also be drawn for transcription. 0: only the train split's.",
    )
    loss_mean_over: MeanOver = Field(
        default="examples",
        description="Average the response NLL over all tokens of a batch, or per example "
        "first (a short paralinguistic answer then weighs as much as a worked solution).",
    )


class ReadPhase(BatchedPhase):
    """Learning to read the audio: projector + LM transcribe every heard utterance."""

    text_replay_items: int = Field(
        default=0,
        ge=0,
        le=1_000_000,
        description="Text-only worked solutions from text_train mixed into the reading "
        "examples, so the LM keeps its text ability while it learns to read.",
    )
    text_replay_task_weights: ReplayTaskWeights = None
    replay_restatement: bool = Field(
        default=False,
        description="With synth.restate_question: keep the restated question at the start of "
        "the replayed solutions. false drops it, so this phase never trains copying a question "
        "from text, which costs the hearing of long spoken questions (docs/rounds.md).",
    )


class StudentParams(_Strict):
    """The `student` stage: a tiny Qwen2-Audio whose language model starts as the teacher,
    bootstrapped in three phases (README: "How the round-0 student is made")."""

    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Init and data-order seed.")
    audio: AudioEncoderShape = Field(default=AudioEncoderShape(), description="Audio encoder.")
    pretrain_utterances: int = Field(
        default=6000,
        ge=0,
        le=10_000_000,
        description="Extra utterances spoken for phases 1, 2 and 2b only: texts of the teacher's "
        "corpus, read by voices drawn like the world's (synth.voices), synthesised in memory "
        "with synth.workers processes and never stored.",
    )
    ctc_units: Literal["phonemes", "characters"] = Field(
        default="phonemes",
        description="Phase 1's CTC targets: espeak-ng's phonemes of each word, or the "
        "transcript's characters.",
    )
    ctc: Phase = Field(
        default=Phase(steps=400, batch_size=16, lr=2e-3, warmup_steps=40),
        description="Phase 1: encoder pre-training, CTC on the transcripts' phonemes.",
    )
    align: Phase = Field(
        default=Phase(steps=0, batch_size=16, lr=2e-3),
        description="Phase 2: encoder + projector learn to feed the frozen LM.",
    )
    align_objective: Literal["embedding_ctc", "lm"] = Field(
        default="embedding_ctc",
        description="Phase 2's loss: CTC of the projected frames against the LM's "
        "token-embedding table (embedding_ctc, the LM not run), or the frozen LM's NLL of "
        "each transcript given the audio (lm, ~1.5x the cost per step).",
    )
    speaker_loss_weight: float = Field(
        default=1.0,
        ge=0,
        le=100,
        description="Phases 1-2: weight of the encoder's speaker-attribute loss (each "
        "training utterance's voice variant, pitch and speaking rate, read from one linear "
        "head on its mean encoder state); 0 turns it off.",
    )
    read: ReadPhase = Field(
        default=ReadPhase(steps=3000, lr=3e-3, text_replay_items=4000),
        description="Phase 2b, after alignment: the projector and the LM learn to read the "
        "audio in order by transcribing every utterance phases 1-2 heard (the train split and "
        "the pre-training corpus; encoder frozen, its outputs cached). 0 steps skips it.",
    )
    instruct: InstructPhase = Field(
        default=InstructPhase(steps=800, lr=1e-3, asr_items=3500),
        description="Phase 3: LM + projector on speech instruction data (encoder frozen).",
    )

    @model_validator(mode="after")
    def _check_corpus_items(self) -> StudentParams:
        if self.instruct.corpus_items > self.pretrain_utterances:
            raise ValueError(
                f"student.instruct.corpus_items ({self.instruct.corpus_items}) "
                f"is more than student.pretrain_utterances ({self.pretrain_utterances}): phase 3 "
                "can answer only utterances the corpus has"
            )
        return self


class EvalParams(_Strict):
    """The `eval` stage: greedy accuracy per task and modality, Avg-Drop vs the teacher."""

    max_new_tokens: int = Field(default=128, ge=1, le=4096, description="Generation budget.")
    batch_size: int = Field(default=64, ge=1, le=4096, description="Prompts per generate call.")
    processes: int = Field(
        default=2,
        ge=1,
        le=64,
        description="torch.distributed ranks that decode (this process and forks of it, each "
        "taking every k-th prompt; docs/speed.md). Greedy decoding of a tiny model is bound by "
        "per-token overhead, which a second process halves and a second thread does not.",
    )


# The trainer's methods (DESIGN.md §1): X-OPD and its baselines.
Method = Literal["xopd", "sft", "offline_kd", "gkd", "grpo"]


class TrainParams(_Strict):
    """The trainer (`train` stage, one round): X-OPD by default, or a baseline through the same
    loop and budget accounting. Defaults are the paper's except where the mini world's 1M-param
    model needs otherwise (said per field)."""

    method: Method = Field(
        default="xopd",
        description="xopd; sft (reference solutions); offline_kd (teacher-written responses); "
        "gkd (generalised JSD on student samples, forward KL by default); grpo (outcome reward).",
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Prompt order and sampling seed.")
    steps: int = Field(
        default=300,
        ge=0,
        le=1_000_000,
        description="Optimizer steps per round; with `student_tokens` set, the most it may take.",
    )
    student_tokens: int | None = Field(
        default=None,
        ge=1,
        le=10**12,
        description="Token budget: stop once this many student response tokens have been "
        "trained on (summed over steps), so methods that make different tokens per step "
        "train on the same number. The step that would pass it trains on the first tokens "
        "of its batch only (rollout order, response prefixes), so the total is exact. "
        "`steps` stays a hard cap (a run may end under budget: the result says so). "
        "null: no budget, run `steps` steps.",
    )
    prompts_per_step: int = Field(
        default=8, ge=1, le=4096, description="Prompt pairs (S, T) per step (paper: 256)."
    )
    rollouts_per_prompt: int = Field(
        default=4, ge=1, le=64, description="m: responses sampled per prompt and modality."
    )
    lmbda: float = Field(
        default=0.5, ge=0, le=1, description="λ: weight of the in-modal term (text rollouts)."
    )
    temperature: float = Field(default=1.0, gt=0, le=10, description="Sampling temperature.")
    max_new_tokens: int = Field(default=128, ge=1, le=32768, description="Response length cap.")
    loss: Literal["sampled", "full", "topk"] = Field(
        default="full",
        description="X-OPD divergence: sampled-token log-ratio (the paper's), exact "
        "full-vocabulary reverse KL (the mini world's default: it learns faster at this scale, "
        "docs/rounds.md), or reverse KL over the teacher's top-k (+ a rest bucket).",
    )
    top_k: int = Field(default=20, ge=1, le=1024, description="k for loss: topk.")
    clip_eps: float | None = Field(
        default=None, gt=0, le=1, description="PPO-style ratio clip ε (off: null)."
    )
    gkd_beta: float = Field(
        default=0.0, ge=0, le=1, description="GKD's β: 0 forward KL, 1 reverse KL."
    )
    lr: float = Field(
        default=2e-4,
        gt=0,
        le=1,
        description="Adam learning rate (paper 2e-6 at 256 prompts on 7B; the mini world's "
        "1M-param LM: 2e-4, docs/rounds.md).",
    )
    warmup_steps: int = Field(default=0, ge=0, le=100_000, description="Linear warm-up.")
    weight_decay: float = Field(default=0.0, ge=0, le=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=1.0, gt=0, le=1e6, description="Gradient clip norm.")
    micro_batch_size: int = Field(
        default=16, ge=1, le=4096, description="Rollouts per forward (gradient accumulation)."
    )
    train_audio_encoder: bool = Field(default=False, description="Paper: frozen.")
    train_projector: bool = Field(default=False, description="Paper: frozen (the adapter).")
    precision: Precision = Field(
        default="float32",
        description="The student's training forward: float32, or bfloat16 autocast on its "
        "device (matrix products in bf16; weights, gradients, optimizer state and loss "
        "float32: a bf16 weight would round away updates at the paper's lr 2e-6).",
    )
    teacher_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="The HF teacher's weights: bfloat16 halves its memory (it never trains).",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute the student's layer activations in the backward pass instead "
        "of keeping them (far less activation memory, about one more forward of compute); "
        "each rollout then reads its prompt itself.",
    )
    anchor_items: int = Field(
        default=8,
        ge=0,
        le=100_000,
        description="Anchor (not in the paper): each step also trains on this many "
        "train-split speech items that only the audio can answer (paralinguistic questions and "
        "transcription) with their gold responses, by cross-entropy, so what the teacher cannot "
        "see is kept. 0 = off. Anchor tokens are not counted in student_tokens.",
    )
    anchor_weight: float = Field(
        default=1.0,
        gt=0.0,
        le=100.0,
        description="Weight of the anchor's token-mean cross-entropy beside the method's loss.",
    )
    checkpoint_every: int = Field(
        default=20, ge=1, le=1_000_000, description="Steps between resumable checkpoints."
    )
    device: Literal["cpu", "cuda"] = Field(
        default="cpu",
        description="Where the HF student and teacher train and score (cuda: the first GPU). "
        "vLLM engines choose their own device; evaluation stays on the CPU.",
    )
    engine: Literal["hf", "vllm"] = Field(
        default="hf",
        description="Where rollouts are sampled and the teacher scores them: hf (transformers, "
        "in the training process) or vllm (a student engine started from the round's starting "
        "weights, and a teacher engine unless `loss` is full); vllm applies to xopd and grpo, "
        "the other methods use hf.",
    )
    sync_every: int = Field(
        default=1,
        ge=0,
        le=1_000_000,
        description="engine vllm: the student engine serves the trainer's weights again "
        "after every this many steps (vLLM's weight reload), so rollouts stay on-policy; 0 "
        "keeps the round's starting weights (off-policy by the steps taken, r corrects).",
    )
    mismatch_warn: float = Field(
        default=0.05,
        gt=0,
        le=100,
        description="Warn when a step's mean |log π_engine − log π_trainer| over the sampled "
        "tokens (logged as logprob_gap_mean) exceeds this: the rollouts are not the "
        "trainer's policy (stale or wrongly loaded weights).",
    )
    vllm_gpu_memory: float = Field(
        default=0.3,
        gt=0,
        le=0.95,
        description="engine vllm on a GPU: the share of the GPU's memory each engine takes "
        "(weights and KV cache); the student engine, the teacher engine and the trainer share "
        "one GPU, so keep their sum under 1.",
    )
    teacher_tensor_parallel: int = Field(
        default=1,
        ge=1,
        le=64,
        description="engine vllm: GPUs the teacher engine spans (vLLM's tensor_parallel_size), "
        "for a teacher larger than one GPU; train.processes 1 only.",
    )
    processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="torch.distributed ranks of a step (this process and forks of it, or the "
        "ranks torchrun starts; with engine vllm torchrun's only, each rank with its own "
        "engines): each samples, scores and trains on its share of the step's prompts; "
        "the loss keeps the whole step's weights and the gradients are summed, so the update "
        "is the one of a single process on the same rollouts. Must divide prompts_per_step.",
    )
    launcher: Literal["inline", "torchrun"] = Field(
        default="inline",
        description="Who starts the ranks. inline: the stage itself (forks of its process, "
        "one machine, CPU). torchrun: the stage runs `torchrun --standalone --nproc-per-node "
        "<processes> xopd train` on this machine (one process a rank; a GPU each with "
        "device cuda) and waits for it; a retry resumes from the round's last checkpoint.",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description="How the ranks hold the student. ddp: each rank the whole model, "
        "gradients summed. fsdp: the trainable transformer layers sharded over the ranks "
        "(FSDP2: weights, gradients and AdamW moments 1/ranks each, a layer gathered while it "
        "runs), for students that do not fit one device; rollouts are sampled by the whole "
        "model, updated after each step. Same update as ddp up to float rounding.",
    )

    @model_validator(mode="after")
    def _check_processes(self) -> TrainParams:
        if self.prompts_per_step % self.processes:
            raise ValueError(
                f"train.processes ({self.processes}) must divide train.prompts_per_step "
                f"({self.prompts_per_step}): each rank takes an equal share of the prompts"
            )
        forked = self.launcher == "inline" and launched_rank() is None
        if self.processes > 1 and self.engine == "vllm" and forked:
            raise ValueError(
                "train.processes > 1 with train.engine vllm needs a process a rank, each "
                "with its own engines (forks of the trainer do not survive a vLLM engine): "
                "set train.launcher: torchrun, or start xopd train under torchrun"
            )
        if self.teacher_tensor_parallel > 1 and (self.engine != "vllm" or self.processes > 1):
            raise ValueError(
                f"train.teacher_tensor_parallel {self.teacher_tensor_parallel} spreads one vLLM "
                "teacher engine over GPUs: it needs train.engine: vllm and train.processes: 1 "
                "(with several ranks each rank has its own engines, one GPU each)"
            )
        return self


class GateParams(_Strict):
    """The `gate` stage: when a round's candidate becomes the champion."""

    min_improvement: float = Field(
        default=0.5,
        ge=0,
        le=100,
        description="δ: speech Avg-Drop must fall by at least this many percentage points.",
    )
    max_paralinguistic_drop: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="ε: paralinguistic accuracy may fall by at most this much (absolute).",
    )
    alpha: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description=(
            "α: the speech improvement must also be significant over the paired eval items "
            "(one-sided exact McNemar p ≤ α); 1 turns the paired test off."
        ),
    )
    avg_drop_floor: float = Field(
        default=-100.0,
        ge=-10_000,
        le=0,
        description="The lowest Avg-Drop (percent) the gate believes: below it, a model "
        "would beat the teacher by more than this much, which points at broken metrics. "
        "Avg-Drops above 100 are impossible (the score would be negative).",
    )


class CampaignParams(_Strict):
    """The campaign: how many X-OPD rounds follow the bootstrap."""

    rounds: int = Field(
        default=1, ge=0, le=1000, description="Rounds per campaign; round k starts from k−1."
    )


class StudyMethod(_Strict):
    """One arm of the study: a trainer method and the settings that tell it apart; every
    other train setting comes from the `train` group."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_.-]{1,40}$",
        description="The arm's name in the table, plots and folders (letters, digits, _.-).",
    )
    method: Method = Field(description="train.method for this arm.")
    lmbda: float = Field(default=0.5, ge=0, le=1, description="λ, for method xopd.")
    gkd_beta: float = Field(
        default=0.0, ge=0, le=1, description="GKD's β, for method gkd: 0 forward KL."
    )


def _default_study_methods() -> list[StudyMethod]:
    return [
        StudyMethod(name="xopd_l0", method="xopd", lmbda=0.0),
        StudyMethod(name="xopd_l0.5", method="xopd", lmbda=0.5),
        StudyMethod(name="xopd_l1", method="xopd", lmbda=1.0),
        StudyMethod(name="sft", method="sft"),
        StudyMethod(name="offline_kd", method="offline_kd"),
        StudyMethod(name="gkd", method="gkd", gkd_beta=0.0),
        StudyMethod(name="grpo", method="grpo"),
    ]


class StudyParams(_Strict):
    """The `study` stage: X-OPD's ablation and baselines from the same round-0 student, each
    at the same budget of student tokens trained, over several seeds (README: "Study")."""

    methods: list[StudyMethod] = Field(
        default_factory=_default_study_methods,
        min_length=1,
        description="The arms: X-OPD at λ 0, 0.5 and 1, SFT, offline KD, GKD (forward KL), "
        "GRPO by default.",
    )
    reference: str = Field(
        default="xopd_l0.5",
        description="The arm every other is also paired against (per-item McNemar test).",
    )
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(
        default=[0, 1],
        min_length=1,
        max_length=100,
        description="train.seed of each repeat of every arm (prompt order, sampling).",
    )
    student_tokens: int = Field(
        default=950_000,
        ge=1,
        le=10**12,
        description="Each run's budget of student response tokens trained (train."
        "student_tokens), met exactly. Default: about one default X-OPD round (300 steps of "
        "64 rollouts of ~50 tokens).",
    )
    max_steps: int = Field(
        default=1200,
        ge=1,
        le=1_000_000,
        description="train.steps of each run: a cap. A run that reaches it under budget "
        "stops the study (its budget would not be equal); raise it then.",
    )
    curve_points: int = Field(
        default=4,
        ge=1,
        le=50,
        description="Points of each run's learning curve, evenly spaced in the budget "
        "(the last is the trained model): each is scored on the dev split.",
    )

    @model_validator(mode="after")
    def _check_names(self) -> StudyParams:
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"study.methods names must be unique (got {names})")
        if self.reference not in names:
            raise ValueError(f"study.reference {self.reference!r} is not one of {names}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"study.seeds must be distinct (got {self.seeds})")
        return self


class NightlyParams(_Strict):
    """The nightly deployment of the round flow."""

    cron: str = Field(
        default="0 2 * * *",
        pattern=r"^\S+( \S+){4}$",
        description="When the nightly round runs: a 5-field cron expression, read in `timezone`.",
    )
    timezone: str = Field(
        default="UTC",
        min_length=1,
        description="The IANA time zone the cron is read in (e.g. Europe/Berlin); UTC unless "
        "set. Daylight-saving changes follow the zone.",
    )
    wait_s: float = Field(
        default=0.0,
        ge=0,
        le=86_400,
        description="How long a nightly run waits for a run holding the work folder.",
    )
    lineage_branch: str = Field(
        default="xopd/lineage",
        pattern=r"^[A-Za-z0-9._/-]+$",
        description="Git branch that gets one commit (params.yaml, dvc.lock, champion.json "
        "on the code that ran) per promoted nightly round.",
    )

    @model_validator(mode="after")
    def _check_timezone(self) -> NightlyParams:
        # The same check Prefect applies to a schedule's time zone: an IANA tzdata name.
        if self.timezone not in zoneinfo.available_timezones():
            raise ValueError(
                f"timezone must be an IANA time zone name such as UTC or Europe/Berlin "
                f"(got {self.timezone!r})"
            )
        return self


class InputsParams(_Strict):
    """What the rounds start from. The defaults are the mini world's, built by the synth,
    teacher and student stages; point them at your own and those stages are not run."""

    data: str = Field(
        default="data/mini",
        min_length=1,
        description="Data root: manifests/<split>.jsonl, audio paths relative to it "
        "(relative to the work folder).",
    )
    teacher: str = Field(
        default="models/teacher",
        min_length=1,
        description="The text teacher's folder (AutoModelForCausalLM, safetensors).",
    )
    student: str = Field(
        default="models/student",
        min_length=1,
        description="The round-0 student's folder (Qwen2-Audio, Qwen2.5-Omni thinker or "
        "Qwen3-Omni thinker, safetensors).",
    )
    teacher_scores: str | None = Field(
        default=None,
        description="A JSON file of the teacher's text_accuracy_<task> on the eval items, "
        "used instead of measuring them; null: each evaluation measures the teacher (once "
        "per campaign: the rounds reuse round 0's).",
    )


class Params(_Strict):
    """Everything in params.yaml. One group per pipeline stage (DESIGN.md §2)."""

    synth: SynthParams = Field(default=SynthParams(), description="The `synth` stage.")
    validate_: ValidateParams = Field(
        default=ValidateParams(), alias="validate", description="The `validate` stage."
    )
    inputs: InputsParams = Field(
        default=InputsParams(), description="The data and models the rounds start from."
    )
    teacher: TeacherParams = Field(default=TeacherParams(), description="The `teacher` stage.")
    student: StudentParams = Field(default=StudentParams(), description="The `student` stage.")
    eval: EvalParams = Field(default=EvalParams(), description="The `eval` stage.")
    train: TrainParams = Field(default=TrainParams(), description="The `train` stage (a round).")
    gate: GateParams = Field(default=GateParams(), description="The `gate` stage.")
    campaign: CampaignParams = Field(
        default=CampaignParams(), description="The campaign flow (bootstrap, then rounds)."
    )
    nightly: NightlyParams = Field(default=NightlyParams(), description="The nightly round.")
    study: StudyParams = Field(
        default=StudyParams(), description="The study: methods at an equal token budget."
    )

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, populate_by_name=True
    )

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not a setting; check the spelling)"
        got = e.get("input")
        scalar = not isinstance(got, (dict, list))
        shown = (
            f" (got {got!r})" if scalar and e["type"] not in ("extra_forbidden", "missing") else ""
        )
        lines.append(f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def parse_params(data: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate an already-loaded mapping; errors name `source` and each offending key.

    Strictly typed, as JSON reads it: `steps: true`, `steps: "40"` or `flag: "yes"` are
    refused rather than coerced to 1, 40 and True (a typo must not change a run silently).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(data).__name__}")
    try:
        # JSON mode keeps what YAML cannot spell natively (tuples as lists, paths as
        # strings) while strict mode refuses every cross-type coercion.
        text = json.dumps(data, default=str, allow_nan=True)
        return Params.model_validate_json(text, strict=True)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key given twice in one mapping is an error (PyYAML keeps
    the last value silently)."""


def _construct_unique_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise ConfigError(
                f"key {key!r} is given twice (lines {seen[key]} and {line}); keep one"
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_unique_mapping,
)


def resolve_params_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Explicit path, else $XOPD_PARAMS, else ./params.yaml."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(PARAMS_ENV_VAR, DEFAULT_PARAMS_FILE))


def load_params(path: str | os.PathLike[str] | None = None) -> Params:
    """Read and validate params.yaml (the only YAML reader of the project).

    With no explicit path and no $XOPD_PARAMS, a missing ./params.yaml means the defaults
    (so `xopd validate` works on a user's data from any folder); a path that was asked for
    must exist.
    """
    p = resolve_params_path(path)
    if path is None and PARAMS_ENV_VAR not in os.environ and not p.exists():
        return Params()
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{p}: cannot read params file ({err.strerror})") from None
    if not text.strip() or all(
        not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()
    ):
        # A file asked for that says nothing is more likely a truncated or wrong file than
        # a wish for every default (no file at all means that).
        raise ConfigError(f"{p}: params file is empty; write the settings or remove the file")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"{p}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    return parse_params(data, source=str(p))
