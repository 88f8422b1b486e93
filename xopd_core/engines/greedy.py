"""Greedy decoding (evaluation, fixed responses), batched with left padding; deterministic.

Runs `sampler`'s greedy loop (the fused decode step, no `generate` bookkeeping);
tests/xopd_core/engines/test_greedy.py holds it to `generate`'s greedy search, for text
prompts and for speech prompts served through the processor's full 30 s window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from xopd_core.distributed import all_gather_rows, run_ranks
from xopd_core.engines.sampler import greedy_from_embeds
from xopd_core.engines.scoring import padded
from xopd_core.models.audio import merge_audio


@torch.no_grad()
def greedy_generate(
    model: Any,
    prompts: Sequence[list[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    batch_size: int = 64,
    audio: Sequence[torch.Tensor] | None = None,
    processes: int = 1,
) -> list[list[int]]:
    """New token ids for each prompt (without the prompt, cut at and excluding `eos_id`).

    `audio[i]`: prompt i's projected audio embeddings `[audio_tokens, hidden]`, placed at
    its <|AUDIO|> placeholders (speech prompts of a speech LLM). Prompts are batched in
    order of length, so a batch pads little; results come back in the given order.
    `processes > 1` splits the prompts between that many ranks (`xopd_core.distributed`:
    this process and forks): decoding a tiny model is bound by per-step overhead, which a
    second thread does not share but a second process does. The batches then differ, so
    results repeat exactly for a fixed count (padding can move a last float bit)."""
    if audio is not None and len(audio) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(audio)} audio entries")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))

    def run(share: list[int]) -> list[list[int]]:
        done = []
        for start in range(0, len(share), batch_size):
            chunk = share[start : start + batch_size]
            ids, mask = padded([prompts[i] for i in chunk], pad_id, left=True)
            if audio is not None:
                embeds = merge_audio(model, ids, [audio[i] for i in chunk], mask)
            else:
                embeds = model.get_input_embeddings()(ids)
            out = greedy_from_embeds(
                model, embeds, mask, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id
            )
            for row_ids, n, finished in zip(
                out.tokens_BG_T.tolist(),
                out.lengths_BG.tolist(),
                out.finished_BG.tolist(),
                strict=True,
            ):
                done.append(row_ids[: n - 1] if finished else row_ids[:n])
        return done

    # Rank k decodes every k-th prompt of the length order: shares of equal size and mix.
    ranks = min(processes, max(1, len(prompts)))
    shares = run_ranks(lambda k, n: all_gather_rows(run(order[k::n])), ranks)
    out: list[list[int]] = [[] for _ in prompts]
    for k, share in enumerate(shares):
        for i, ids in zip(order[k::ranks], share, strict=True):
            out[i] = ids
    return out
