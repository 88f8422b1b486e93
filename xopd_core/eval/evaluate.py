"""Accuracy per task from greedy generations, for text and for speech prompts.

Deterministic: greedy decoding, fixed batch order. Answers go through the strict extractor,
so a malformed response counts as wrong.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from xopd_core.data.manifest import ManifestRow
from xopd_core.data.world import ANSWER_SETS
from xopd_core.engines.greedy import greedy_generate
from xopd_core.eval.metrics import AnswerSets, extract_answer
from xopd_core.models.audio import extract_features
from xopd_core.models.families import family_of
from xopd_core.models.prompts import TRANSCRIBE, speech_prompt_ids, text_prompt_ids
from xopd_core.models.tokenizer import IM_END, PAD, decode, token_id


@dataclass(frozen=True)
class ItemResult:
    id: str
    task: str
    answer: str
    predicted: str | None
    response: str

    @property
    def correct(self) -> bool:
        return self.predicted == self.answer


def accuracy_by_task(results: Sequence[ItemResult]) -> dict[str, float]:
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        by_task[r.task].append(r.correct)
    return {t: sum(v) / len(v) for t, v in sorted(by_task.items())}


def _graded(
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[ManifestRow],
    outs: Sequence[list[int]],
    answer_sets: AnswerSets,
) -> list[ItemResult]:
    """Each row's response decoded and its answer taken by the strict extractor."""
    results = []
    for r, ids in zip(rows, outs, strict=True):
        text = decode(tokenizer, ids)
        said = extract_answer(text, r.task, answer_sets)
        results.append(ItemResult(r.id, r.task, r.answer, said, text))
    return results


@torch.no_grad()
def evaluate_text(
    model: Any,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[ManifestRow],
    max_new_tokens: int,
    batch_size: int = 64,
    processes: int = 1,
    answer_sets: AnswerSets = ANSWER_SETS,
) -> list[ItemResult]:
    """Greedy answers of a causal LM to each row's transcript (`processes`: see
    `greedy_generate`; `answer_sets`: each task's legal answers, the mini world's by
    default)."""
    family = family_of(model)  # a speech student's text prompts keep its system turn
    system = family.system_prompt if family is not None else None
    outs = greedy_generate(
        model,
        [text_prompt_ids(tokenizer, r.transcript, system=system) for r in rows],
        pad_id=token_id(tokenizer, PAD),
        eos_id=token_id(tokenizer, IM_END),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        processes=processes,
    )
    return _graded(tokenizer, rows, outs, answer_sets)


@torch.no_grad()
def speech_outputs(
    model: Any,
    processor: Any,
    waveforms: Sequence[Any],
    max_new_tokens: int,
    batch_size: int = 64,
    processes: int = 1,
    instruction: str | None = None,
) -> list[list[int]]:
    """Greedy response ids of a speech LLM to each utterance (plus an optional text
    `instruction` after the audio). The audio goes through the cropped encoder pass
    (`models.audio`: equal to the processor's full 30 s window at the valid positions, and
    ~5x cheaper here); tests/xopd_core/eval/test_generate.py compares the answers with
    `generate` on the processor's inputs."""
    tokenizer = processor.tokenizer
    family = family_of(model)
    if family is None:
        raise ValueError(f"{type(model).__name__} is no speech student xopd knows")
    feats = extract_features(processor, list(waveforms))
    counts = family.audio_tokens(model, [f.frames for f in feats])
    order = sorted(range(len(feats)), key=lambda i: feats[i].frames)
    audio: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        for i, a in zip(chunk, family.encode(model, [feats[i] for i in chunk]), strict=True):
            audio[i] = a
    prompts = [
        speech_prompt_ids(
            tokenizer, n, instruction, audio_token=family.audio_token, system=family.system_prompt
        )
        for n in counts
    ]
    return greedy_generate(
        model,
        prompts,
        pad_id=token_id(tokenizer, PAD),
        eos_id=token_id(tokenizer, IM_END),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        audio=[audio[i] for i in range(len(feats))],
        processes=processes,
    )


def evaluate_speech(
    model: Any,
    processor: Any,
    rows: Sequence[ManifestRow],
    waveforms: Sequence[Any],
    max_new_tokens: int,
    batch_size: int = 64,
    processes: int = 1,
    answer_sets: AnswerSets = ANSWER_SETS,
) -> list[ItemResult]:
    """Greedy answers of a speech LLM to each row's audio alone (the spoken question, no
    text)."""
    outs = speech_outputs(model, processor, waveforms, max_new_tokens, batch_size, processes)
    return _graded(processor.tokenizer, rows, outs, answer_sets)


def transcribe(
    model: Any,
    processor: Any,
    waveforms: Sequence[Any],
    max_new_tokens: int,
    batch_size: int = 64,
    processes: int = 1,
) -> list[str]:
    """What the speech LLM hears: its greedy answer to each utterance followed by the
    transcription instruction it was taught (`TRANSCRIBE`)."""
    outs = speech_outputs(
        model, processor, waveforms, max_new_tokens, batch_size, processes, TRANSCRIBE
    )
    return [decode(processor.tokenizer, ids) for ids in outs]
