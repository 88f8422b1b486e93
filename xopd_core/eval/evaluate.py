"""Accuracy per task from greedy generations; text prompts here, speech prompts in student.py.

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

from xopd_core.eval.generate import greedy_generate
from xopd_core.eval.metrics import extract_answer
from xopd_core.models.prompts import text_prompt_ids
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


@torch.no_grad()
def evaluate_text(
    model: Any,
    tokenizer: PreTrainedTokenizerFast,
    rows: Sequence[dict[str, Any]],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[ItemResult]:
    """Greedy answers of a causal LM to each row's transcript."""
    outs = greedy_generate(
        model,
        [text_prompt_ids(tokenizer, r["transcript"]) for r in rows],
        pad_id=token_id(tokenizer, PAD),
        eos_id=token_id(tokenizer, IM_END),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    results = []
    for r, ids in zip(rows, outs, strict=True):
        text = decode(tokenizer, ids)
        results.append(
            ItemResult(r["id"], r["task"], r["answer"], extract_answer(text, r["task"]), text)
        )
    return results


@torch.no_grad()
def evaluate_speech(
    model: Any,
    processor: Any,
    rows: Sequence[dict[str, Any]],
    waveforms: Sequence[Any],
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[ItemResult]:
    """Greedy answers of a speech LLM to each row's audio alone (the spoken question, no
    text), through the processor and the model's own forward: the serving path."""
    tokenizer = processor.tokenizer
    pad_id, eos_id = token_id(tokenizer, PAD), token_id(tokenizer, IM_END)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results = []
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            inputs = processor(
                text=[prompt] * len(chunk),
                audio=list(waveforms[start : start + batch_size]),
                sampling_rate=processor.feature_extractor.sampling_rate,
                padding=True,
                return_tensors="pt",
            )
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
            width = inputs["input_ids"].shape[1]
            for r, row_ids in zip(chunk, out[:, width:].tolist(), strict=True):
                ids = row_ids[: row_ids.index(eos_id)] if eos_id in row_ids else row_ids
                text = decode(tokenizer, [t for t in ids if t != pad_id])
                predicted = extract_answer(text, r["task"])
                results.append(ItemResult(r["id"], r["task"], r["answer"], predicted, text))
    finally:
        tokenizer.padding_side = side
    return results
