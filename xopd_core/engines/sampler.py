"""A lean decoding loop over a HF causal LM (or a speech LLM's language model): one prefill
from input embeddings, then one step per token on a preallocated cache (`engines.decode`'s
fused step where it applies, the backbone otherwise), either sampling from
softmax(logits / temperature) with the caller's `torch.Generator` or choosing greedily.

What `generate` does for plain sampling and greedy search, minus its per-token logits
processors, stopping criteria and bookkeeping, which cost more than the forward for small
models (issue #4). Not a generation API: no top-k/top-p, beams or penalties.

Rows that have ended leave the batch: when a quarter of the rows still in it have emitted
EOS, the cache and the per-row state keep only the others (`PreallocatedLayer.keep_rows`).
A batch runs as many steps as its longest response, ~2.3x the mean one in an X-OPD round.
At the mini world's size a step costs mostly per-operation overhead, so fewer rows save
less than their share: measured on 2 cores, 32 speech rollouts 0.53 → 0.50 s, 64 text
rollouts 0.50 → 0.42 s, a round-0 evaluation's decoding 13.5–14.1 → 12.8 s. Each row's
draws do not depend on which rows are still decoding (one uniform per row of the batch per
step), so the samples are those of the fixed batch up to float rounding (tested). The CUDA
graph keeps every row (its shapes are fixed).
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

    def keep_rows(self, index_R: torch.Tensor) -> None:
        """Keep only the batch rows `index_R` (in that order)."""
        self._rows(lambda t: t.index_select(0, index_R))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def _rows(self, op: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.is_initialized:
            self._key_buffer, self._value_buffer = op(self._key_buffer), op(self._value_buffer)
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


def draw(probs_B_V: torch.Tensor, uniform_B: torch.Tensor) -> torch.Tensor:
    """One index per row with probability `probs_B_V[row, index]` (rows need not sum to 1),
    from one uniform in [0, 1) per row (`uniform_B`, float64): the first index whose
    cumulative probability exceeds it, `[B]`.

    One uniform per row, where `torch.multinomial` draws an exponential per vocabulary entry
    (0.7 ms per token at [32, 612], ~14 % of a decode step). The cumulative sum is float64, so
    even a ~152k vocabulary's tail keeps its probabilities."""
    cdf_B_V = probs_B_V.to(torch.float64).cumsum(-1)
    u_B_1 = uniform_B.to(device=cdf_B_V.device, dtype=torch.float64)[:, None]
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
    vocab_size: int | None = None,
) -> Samples:
    """Sample `n` responses of at most `max_new_tokens` tokens for each of the left-padded
    prompts `embeds_B_L_D` (`mask_B_L`: 1 on prompt tokens, 0 on padding). A row stops at
    its first `eos_id`; the loop stops when every row has. Fixed `generator` state ⇒ same
    samples (the global RNG is not used). `vocab_size`: only ids below it are drawn, from
    the softmax over those logits alone (the shared vocabulary; None: every output row)."""
    if temperature <= 0:
        raise ValueError("sampling needs temperature > 0")

    rows = embeds_B_L_D.shape[0] * n

    def pick(logits_A_V: torch.Tensor, rows_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp = torch.log_softmax(logits_A_V.float() / temperature, dim=-1)
        # A uniform for every row, used or not: a row's draws do not depend on which rows
        # are still in the batch.
        uniform_R = torch.rand(rows, generator=generator, dtype=torch.float64, device=rows_A.device)
        picked = draw(logp.exp(), uniform_R[rows_A])
        return picked, logp.gather(1, picked[:, None]).squeeze(1)

    return _decode(
        model, embeds_B_L_D, mask_B_L, n, max_new_tokens, eos_id, pad_id, pick, vocab_size
    )


@torch.no_grad()
def greedy_from_embeds(
    model: Any,
    embeds_B_L_D: torch.Tensor,
    mask_B_L: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    vocab_size: int | None = None,
) -> Samples:
    """The greedy response (highest logit at each step, the first on a tie, as `generate`'s
    greedy search) to each left-padded prompt, with the chosen tokens' log-probs at
    temperature 1; `vocab_size` as in `sample_from_embeds`."""

    def pick(logits_A_V: torch.Tensor, rows_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        picked = logits_A_V.argmax(-1)
        logp = torch.log_softmax(logits_A_V.float(), dim=-1)
        return picked, logp.gather(1, picked[:, None]).squeeze(1)

    return _decode(
        model, embeds_B_L_D, mask_B_L, 1, max_new_tokens, eos_id, pad_id, pick, vocab_size
    )


# Rows leave the batch when at least this share of those in it have ended: each leave
# copies the cache, so not at every single EOS.
LEAVE_SHARE = 0.25


def _decode(
    model: Any,
    embeds_B_L_D: torch.Tensor,
    mask_B_L: torch.Tensor,
    n: int,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int,
    pick: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    vocab_size: int | None,
) -> Samples:
    """The loop both entry points share; `pick(logits_A_V, rows_A)` chooses the next token
    of each of the batch's rows (`rows_A`: their indices among all rows) and returns it with
    its log-prob. Logits are cut to `vocab_size` first: a checkpoint's padded rows and a
    speech model's own markers are no tokens of a response (`scoring.shared_vocab_size`)."""
    inner = model.model
    backbone = getattr(inner, "language_model", inner)  # Qwen2-Audio wraps a Qwen2Model
    embed = model.get_input_embeddings()
    b, prompt_len, _ = embeds_B_L_D.shape
    rows, device = b * n, embeds_B_L_D.device
    mask_B_L = mask_B_L.to(device=device, dtype=torch.long)
    # Left padding: a prompt's first real token is position 0 (what `generate` derives from
    # the attention mask; the backbone's default arange would shift padded rows).
    positions_B_L = (mask_B_L.cumsum(-1) - 1).masked_fill(mask_B_L == 0, 0)
    mask_A_S = torch.ones(rows, prompt_len + max_new_tokens, dtype=torch.long, device=device)
    mask_A_S[:, :prompt_len] = mask_B_L.repeat_interleave(n, dim=0)
    next_position_A = positions_B_L[:, -1].repeat_interleave(n, dim=0) + 1

    # The prompt is read once per prompt, not per sample: its cache is repeated n times.
    cache, fused = _rollout_cache(backbone, prompt_len + max_new_tokens)
    hidden_A_D = backbone(
        inputs_embeds=embeds_B_L_D,
        attention_mask=mask_B_L,
        position_ids=positions_B_L,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state[:, -1]
    cache.batch_repeat_interleave(n)
    hidden_A_D = hidden_A_D.repeat_interleave(n, dim=0)
    step = fused.step if fused is not None else None
    ours = [layer for layer in cache.layers if isinstance(layer, PreallocatedLayer)]
    shrinks = len(ours) == len(cache.layers)
    if fused is not None and device.type == "cuda" and max_new_tokens > 1:
        step = GraphedStep(fused, rows, prompt_len).step  # launch-bound on a GPU
        shrinks = False  # a graph's shapes are fixed

    tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(rows, max_new_tokens, dtype=torch.float32, device=device)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    rows_A = torch.arange(rows, device=device)  # the rows in the batch, in batch order
    steps = 0
    for t in range(max_new_tokens):
        picked_A, logp_A = pick(model.lm_head(hidden_A_D)[:, :vocab_size], rows_A)
        live_A = ~done[rows_A]  # an ended row still in the batch: its picks are dropped
        live_rows = rows_A[live_A]
        tokens[live_rows, t] = picked_A[live_A]
        logprobs[live_rows, t] = logp_A[live_A]
        ended_rows = rows_A[live_A & (picked_A == eos_id)]
        lengths[ended_rows] = t + 1
        done[ended_rows] = True
        steps = t + 1
        if steps == max_new_tokens or bool(done.all()):
            break
        live_A &= picked_A != eos_id
        if shrinks and int(live_A.sum()) <= (1 - LEAVE_SHARE) * len(rows_A):
            keep_A = live_A.nonzero().squeeze(1)
            for layer in ours:
                layer.keep_rows(keep_A)
            rows_A, picked_A = rows_A[keep_A], picked_A[keep_A]
            mask_A_S, next_position_A = mask_A_S[keep_A], next_position_A[keep_A]
        if step is not None:
            hidden_A_D = step(
                embed(picked_A), next_position_A + t, mask_A_S[:, : prompt_len + steps]
            )
            continue
        hidden_A_D = backbone(
            inputs_embeds=embed(picked_A[:, None]),
            attention_mask=mask_A_S[:, : prompt_len + steps],
            position_ids=(next_position_A + t)[:, None],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
    return Samples(tokens[:, :steps], logprobs[:, :steps], lengths, done)
