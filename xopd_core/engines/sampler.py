"""A lean sampling loop over a HF causal LM (or a speech LLM's language model): one prefill
from input embeddings, then one backbone step per token on a `DynamicCache`, drawing from
softmax(logits / temperature) with the caller's `torch.Generator`.

What `generate` does for plain multinomial sampling, minus its per-token logits processors,
stopping criteria and bookkeeping, which cost more than the forward for small models
(issue #4). Not a generation API: no top-k/top-p, beams or penalties.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer


@dataclass(frozen=True)
class Samples:
    """`n` samples per prompt, prompt-major (row = prompt · n + sample). `tokens_BG_T`: the
    sampled ids, `pad_id` past each row's end; `logprobs_BG_T`: float32 log-probs of those
    ids under softmax(logits / temperature), 0 past the end; `lengths_BG`: response lengths,
    EOS included; `finished_BG`: the row ended with EOS rather than at the length limit."""

    tokens_BG_T: torch.Tensor
    logprobs_BG_T: torch.Tensor
    lengths_BG: torch.Tensor
    finished_BG: torch.Tensor


class PreallocatedLayer(DynamicLayer):
    """A full-attention cache layer that writes into buffers sized for prompt + response
    once, instead of `DynamicLayer`'s `torch.cat` of the whole cache at every token. `keys`
    and `values` are views of the filled part, so attention reads exactly what a
    `DynamicLayer` would hold."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._key_buffer = key_states.new_empty(b, h, self.capacity, d)
        self._value_buffer = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"cache holds {self.capacity} positions, {end} requested")
        self._key_buffer[:, :, self.length : end] = key_states
        self._value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._key_buffer = self._key_buffer.repeat_interleave(repeats, dim=0)
            self._value_buffer = self._value_buffer.repeat_interleave(repeats, dim=0)
            self.keys = self._key_buffer[:, :, : self.length]
            self.values = self._value_buffer[:, :, : self.length]


def _rollout_cache(backbone: Any, capacity: int) -> Cache:
    """Preallocated layers where every layer attends to the full context; `DynamicCache`
    (which knows sliding windows and other layer kinds) otherwise."""
    config = backbone.config
    kinds = getattr(config, "layer_types", None) or ["full_attention"]
    if set(kinds) != {"full_attention"}:
        return DynamicCache(config=config)
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(config.num_hidden_layers)])


@torch.no_grad()
def sample_from_embeds(
    model: Any,
    embeds_B_L_D: torch.Tensor,
    mask_B_L: torch.Tensor,
    *,
    n: int,
    temperature: float,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    generator: torch.Generator,
) -> Samples:
    """Sample `n` responses of at most `max_new_tokens` tokens for each of the left-padded
    prompts `embeds_B_L_D` (`mask_B_L`: 1 on prompt tokens, 0 on padding). A row stops at
    its first `eos_id`; the loop stops when every row has. Fixed `generator` state ⇒ same
    samples (the global RNG is not used)."""
    if temperature <= 0:
        raise ValueError("sampling needs temperature > 0")
    inner = model.model
    backbone = getattr(inner, "language_model", inner)  # Qwen2-Audio wraps a Qwen2Model
    embed = model.get_input_embeddings()
    b, prompt_len, _ = embeds_B_L_D.shape
    rows, device = b * n, embeds_B_L_D.device
    mask_B_L = mask_B_L.to(device=device, dtype=torch.long)
    # Left padding: a prompt's first real token is position 0 (what `generate` derives from
    # the attention mask; the backbone's default arange would shift padded rows).
    positions_B_L = (mask_B_L.cumsum(-1) - 1).masked_fill(mask_B_L == 0, 0)
    mask_BG_L = torch.ones(rows, prompt_len + max_new_tokens, dtype=torch.long, device=device)
    mask_BG_L[:, :prompt_len] = mask_B_L.repeat_interleave(n, dim=0)
    next_position_BG = positions_B_L[:, -1:].repeat_interleave(n, dim=0) + 1

    # The prompt is read once per prompt, not per sample: its cache is repeated n times.
    cache = _rollout_cache(backbone, prompt_len + max_new_tokens)
    hidden = backbone(
        inputs_embeds=embeds_B_L_D,
        attention_mask=mask_B_L,
        position_ids=positions_B_L,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]
    cache.batch_repeat_interleave(n)
    hidden = hidden.repeat_interleave(n, dim=0)

    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        logp = torch.log_softmax(model.lm_head(hidden).float() / temperature, dim=-1)
        # multinomial draws what `generate` draws from the same generator state, so a seed
        # gives the rollouts it gave before this loop replaced `generate`.
        picked = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
        picked = picked.masked_fill(done, pad_id)  # finished rows only pad
        tokens[:, t] = picked
        logprobs[:, t] = logp.gather(1, picked[:, None]).squeeze(1).masked_fill(done, 0.0)
        ended = ~done & (picked == eos_id)
        lengths[ended] = t + 1
        done |= ended
        steps = t + 1
        if steps == max_new_tokens or bool(done.all()):
            break
        hidden = backbone(
            inputs_embeds=embed(picked[:, None]),
            attention_mask=mask_BG_L[:, : prompt_len + steps],
            position_ids=next_position_BG + t,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
    return Samples(tokens[:, :steps], logprobs[:, :steps], lengths, done)
