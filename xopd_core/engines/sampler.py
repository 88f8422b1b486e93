"""A lean decoding loop over a HF causal LM (or a speech LLM's language model): one prefill
from input embeddings, then one step per token on a preallocated cache (`engines.decode`'s
fused step where it applies, the backbone otherwise), either sampling from
softmax(logits / temperature) with the caller's `torch.Generator` or choosing greedily.

What `generate` does for plain sampling and greedy search, minus its per-token logits
processors, stopping criteria and bookkeeping, which cost more than the forward for small
models (issue #4). Not a generation API: no top-k/top-p, beams or penalties.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from xopd_core.engines.decode import FusedStep, GraphedStep, fused_step


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


def _rollout_cache(backbone: Any, capacity: int) -> tuple[Cache, FusedStep | None]:
    """Preallocated layers where every layer attends to the full context, with the fused
    decode step when `engines.decode` reproduces the backbone; `DynamicCache` (which knows
    sliding windows and other layer kinds) and no fused step otherwise."""
    config = backbone.config
    kinds = getattr(config, "layer_types", None) or ["full_attention"]
    if set(kinds) != {"full_attention"}:
        return DynamicCache(config=config), None
    layers = [PreallocatedLayer(capacity) for _ in range(config.num_hidden_layers)]
    return Cache(layers=list[Any](layers)), fused_step(backbone, layers, capacity)


def draw(probs_B_V: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row with probability `probs_B_V[row, index]` (rows need not sum to 1):
    the first index whose cumulative probability exceeds a uniform draw, `[B]`.

    One uniform per row, where `torch.multinomial` draws an exponential per vocabulary entry
    (0.7 ms per token at [32, 612], ~14 % of a decode step). The cumulative sum is float64, so
    even a ~152k vocabulary's tail keeps its probabilities."""
    cdf_B_V = probs_B_V.to(torch.float64).cumsum(-1)
    u_B_1 = torch.rand(
        probs_B_V.shape[0], 1, generator=generator, dtype=torch.float64, device=probs_B_V.device
    )
    # right=True: an index of probability 0 (cdf equal to its predecessor's) is never drawn.
    picked_B_1 = torch.searchsorted(cdf_B_V, u_B_1 * cdf_B_V[:, -1:], right=True)
    return picked_B_1.clamp_max(probs_B_V.shape[1] - 1).squeeze(1)


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

    def pick(logits_B_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(logits_B_V.float() / temperature, dim=-1)
        picked = draw(logp.exp(), generator)
        return picked, logp.gather(1, picked[:, None]).squeeze(1)

    return _decode(model, embeds_B_L_D, mask_B_L, n, max_new_tokens, eos_id, pad_id, pick)


@torch.no_grad()
def greedy_from_embeds(
    model: Any,
    embeds_B_L_D: torch.Tensor,
    mask_B_L: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
) -> Samples:
    """The greedy response (highest logit at each step, the first on a tie, as `generate`'s
    greedy search) to each left-padded prompt, with the chosen tokens' log-probs at
    temperature 1."""

    def pick(logits_B_V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        picked = logits_B_V.argmax(-1)
        logp = torch.log_softmax(logits_B_V.float(), dim=-1)
        return picked, logp.gather(1, picked[:, None]).squeeze(1)

    return _decode(model, embeds_B_L_D, mask_B_L, 1, max_new_tokens, eos_id, pad_id, pick)


def _decode(
    model: Any,
    embeds_B_L_D: torch.Tensor,
    mask_B_L: torch.Tensor,
    n: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    pick: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> Samples:
    """The loop both entry points share; `pick(logits_B_V)` chooses each row's next token
    and returns it with its log-prob."""
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
    cache, fused = _rollout_cache(backbone, prompt_len + max_new_tokens)
    hidden = backbone(
        inputs_embeds=embeds_B_L_D,
        attention_mask=mask_B_L,
        position_ids=positions_B_L,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]
    cache.batch_repeat_interleave(n)
    hidden = hidden.repeat_interleave(n, dim=0)
    step = fused.step if fused is not None else None
    if fused is not None and device.type == "cuda" and max_new_tokens > 1:
        step = GraphedStep(fused, rows, prompt_len).step  # launch-bound on a GPU

    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    steps = 0
    for t in range(max_new_tokens):
        picked, picked_logp = pick(model.lm_head(hidden))
        picked = picked.masked_fill(done, pad_id)  # finished rows only pad
        tokens[:, t] = picked
        logprobs[:, t] = picked_logp.masked_fill(done, 0.0)
        ended = ~done & (picked == eos_id)
        lengths[ended] = t + 1
        done |= ended
        steps = t + 1
        if steps == max_new_tokens or bool(done.all()):
            break
        if step is not None:
            hidden = step(
                embed(picked), next_position_BG[:, 0] + t, mask_BG_L[:, : prompt_len + steps]
            )
            continue
        hidden = backbone(
            inputs_embeds=embed(picked[:, None]),
            attention_mask=mask_BG_L[:, : prompt_len + steps],
            position_ids=next_position_BG + t,
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
    return Samples(tokens[:, :steps], logprobs[:, :steps], lengths, done)
