"""Greedy decoding with HF `generate`, batched with left padding; deterministic."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def greedy_generate(
    model: Any,  # any HF model with `generate` (its stubs need a PreTrainedModel self-type)
    prompts: Sequence[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    batch_size: int = 64,
) -> list[list[int]]:
    """New token ids for each prompt (without the prompt, cut at and excluding `eos_id`)."""
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        longest = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, longest - len(p) :] = torch.tensor(p)
            mask[i, longest - len(p) :] = 1
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )
        for row in out[:, longest:].tolist():
            outputs.append(row[: row.index(eos_id)] if eos_id in row else row)
    return outputs
