"""Where a response sits in a prompt + response sequence, and the vocabulary both models share.

The student's prompt holds audio placeholders, the teacher's the transcript, so one response
starts at different offsets; both sides read their log-probs through `response_positions`.
Pure functions; the classic bug they guard is the off-by-one at the first response token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase


def response_positions(prompt_len: int, response_len: int) -> slice:
    """Logit positions that predict the response tokens of `prompt + response`: position
    `prompt_len − 1` (the last prompt token) predicts response token 0."""
    if prompt_len < 1:
        raise ValueError("a prompt needs at least one token to predict the response from")
    return slice(prompt_len - 1, prompt_len - 1 + response_len)


def right_padded(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids_B_L` right-padded with `pad_id` and `attention_mask_B_L`."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def response_tokens(rollouts: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens_B_T` of the rollouts' responses (−1 past each one's end) and `mask_B_T`."""
    longest = max((len(r.response_ids) for r in rollouts), default=0)
    tokens = torch.full((len(rollouts), longest), -1, dtype=torch.long)
    for i, r in enumerate(rollouts):
        tokens[i, : len(r.response_ids)] = torch.tensor(r.response_ids, dtype=torch.long)
    return tokens, (tokens >= 0).long()


def gather_response_states(
    states_B_L_E: torch.Tensor, prompt_lens: Sequence[int], response_lens: Sequence[int]
) -> torch.Tensor:
    """`[B, T, E]` rows (hidden states or logits) at the positions predicting each row's
    response tokens (T = longest response; shorter rows padded with zeros), from right-padded
    prompt+response rows whose prompts have different lengths."""
    b, _, e = states_B_L_E.shape
    t = max(response_lens) if response_lens else 0
    out = states_B_L_E.new_zeros(b, t, e)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens, strict=True)):
        out[i, :r] = states_B_L_E[i, response_positions(p, r)]
    return out


def response_logits(
    model: Any,
    prompt_lens: Sequence[int],
    response_lens: Sequence[int],
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """`[B, T, V]` logits predicting the response tokens of a causal LM (or a speech LLM's
    LM): the backbone's hidden states are gathered at the response positions first and only
    those go through the output head — the prompt's (hundreds of audio positions for speech)
    never become [L, V] logits."""
    inner = model.model
    backbone = getattr(inner, "language_model", inner)  # Qwen2-Audio wraps a Qwen2Model
    hidden = backbone(
        input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask
    ).last_hidden_state
    return model.lm_head(gather_response_states(hidden, prompt_lens, response_lens))


def shared_vocab_size(
    student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase
) -> int:
    """Entries both models' logits must be sliced to before any KL. Checkpoints of one
    tokenizer pad their embedding tables to different sizes (Qwen: 151936 vs 152064); the
    padded rows are not tokens. Different tokenizers cannot be distilled token by token."""
    s, t = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s != t:
        only_s = sorted(set(s.items()) - set(t.items()))[:3]
        only_t = sorted(set(t.items()) - set(s.items()))[:3]
        raise ValueError(
            f"student and teacher tokenizers differ ({len(s)} vs {len(t)} entries; "
            f"student-only e.g. {only_s}, teacher-only e.g. {only_t}): token-level "
            "distillation needs one shared tokenizer"
        )
    return len(s)
