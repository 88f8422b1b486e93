"""One decoded token through a Qwen2 language model in plain tensor ops, on the sampling
loop's preallocated cache: transformers' decoder-layer arithmetic (attention as two matmuls,
not SDPA) without its per-call module, mask and cache bookkeeping.

At the mini world's size (~1 M parameters) that bookkeeping is most of a backbone call's
~7 ms per token (issue #4). Prefill and every teacher-forced pass stay transformers' own;
`fused_step` returns None for any configuration it does not reproduce, and the caller then
calls the backbone. tests/xopd_core/engines/test_decode.py compares the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.nn import functional as F


def _rms_norm(norm: Any, hidden_B_D: torch.Tensor) -> torch.Tensor:
    # One kernel, equal to Qwen2RMSNorm's float32 statistics for float32 input (the fused
    # path's dtype; tests/xopd_core/engines/test_decode.py).
    return F.rms_norm(hidden_B_D, norm.weight.shape, norm.weight, norm.variance_epsilon)


def half_rotation(head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """`[d, d]` signed permutation R with x @ R == cat(−x[d/2:], x[:d/2]) (transformers'
    `rotate_half`) exactly: every output is one input, negated or not, plus zeros."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim, dtype=like.dtype, device=like.device)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


# A layer's joined query/key/value weight and bias, then its joined gate/up weight and bias.
LayerWeights = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]
# Puts a decoded token's keys and values `[B, K, 1, D]` into a layer's cache; returns the
# keys and values `[B, K, S, D]` the token attends to.
Store = Callable[[Any, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _joined(linears: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linear maps of the same input: their outputs
    side by side, in one matrix product instead of one each."""
    weight = torch.cat([m.weight for m in linears])
    if all(m.bias is None for m in linears):
        return weight, None
    return weight, torch.cat(
        [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in linears]
    )


class _JoinedWeights:
    """A layer's query/key/value and gate/up projections joined (`_joined`), rebuilt when a
    source tensor changed since (an optimizer step updates weights in place, which bumps
    their version counters)."""

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        self.gate_up = [mlp.gate_proj, mlp.up_proj]
        self._stamp: tuple[tuple[int, int], ...] = ()

    def get(self) -> LayerWeights:
        sources = [t for m in self.qkv + self.gate_up for t in (m.weight, m.bias) if t is not None]
        stamp = tuple((id(t), t._version) for t in sources)
        if stamp != self._stamp:
            self._joined = (*_joined(self.qkv), *_joined(self.gate_up))
            self._stamp = stamp
        return self._joined


class FusedStep:
    """`step(embeds_B_D, positions_B, mask_B_S)`: the backbone's last hidden state for one
    new token per row at `positions_B` (rotary positions), attending to the cached keys
    plus itself where `mask_B_S` is true. Appends the token's keys/values to `layers` (the
    loop's `PreallocatedLayer`s, filled by the prefill). Each layer's query/key/value and
    gate/up projections run as one matrix product each; the joined weights are rebuilt
    whenever the model's change, so a model trained in between is decoded with its current
    weights."""

    def __init__(self, backbone: Any, layers: Sequence[Any], capacity: int) -> None:
        self.backbone = backbone
        self.layers = list(layers)
        # cos/sin per position from the model's own rotary module, as a table: each entry
        # is computed exactly as for a lone position (an outer product, no reduction).
        table = torch.arange(capacity, device=backbone.norm.weight.device)[None]
        probe = torch.zeros((), dtype=backbone.norm.weight.dtype, device=table.device)
        cos, sin = backbone.rotary_emb(probe, table)
        self.cos_P_D, self.sin_P_D = cos[0], sin[0]
        self.rotate_D_D = half_rotation(self.cos_P_D.shape[-1], self.cos_P_D)
        self.joined = [_JoinedWeights(layer) for layer in backbone.layers]

    @torch.no_grad()
    def step(
        self, embeds_B_D: torch.Tensor, positions_B: torch.Tensor, mask_B_S: torch.Tensor
    ) -> torch.Tensor:
        b, s = mask_B_S.shape
        bias_B_1_1_S = torch.zeros(b, 1, 1, s, dtype=embeds_B_D.dtype, device=embeds_B_D.device)
        bias_B_1_1_S.masked_fill_(~mask_B_S.bool()[:, None, None, :], float("-inf"))
        weights = [joined.get() for joined in self.joined]
        return self.forward(
            embeds_B_D, positions_B, bias_B_1_1_S, weights, lambda c, k, v: c.update(k, v)
        )

    def forward(
        self,
        embeds_B_D: torch.Tensor,
        positions_B: torch.Tensor,
        bias_B_1_1_S: torch.Tensor,
        weights: Sequence[LayerWeights],
        store: Store,
    ) -> torch.Tensor:
        """The step's arithmetic; `store` fills each layer's cache, and `bias_B_1_1_S`
        (0 or −inf) says which of the keys it returns the token attends to."""
        cos_B_1_D = self.cos_P_D[positions_B][:, None]
        sin_B_1_D = self.sin_P_D[positions_B][:, None]
        b = embeds_B_D.shape[0]
        hidden = embeds_B_D
        for layer, cache, (w_qkv, b_qkv, w_gate_up, b_gate_up) in zip(
            self.backbone.layers, self.layers, weights, strict=True
        ):
            attn = layer.self_attn
            d = attn.head_dim
            heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
            x = _rms_norm(layer.input_layernorm, hidden)
            qkv = F.linear(x, w_qkv, b_qkv).view(b, heads + 2 * kv_heads, d)
            # Queries and keys rotated together: x·cos + rotate_half(x)·sin.
            qk = qkv[:, : heads + kv_heads]
            qk = torch.addcmul(qk * cos_B_1_D, qk @ self.rotate_D_D, sin_B_1_D)
            q, k = qk[:, :heads], qk[:, heads:]
            keys_B_K_S_D, values_B_K_S_D = store(
                cache, k[:, :, None], qkv[:, heads + kv_heads :, None]
            )
            # One query per row: two small matmuls beat SDPA's CPU kernel here (~110 vs
            # ~170 µs per layer at [32, 4, 1, 32] × 110 keys). Query head h reads key/value
            # head h // G, as transformers' `repeat_kv` arranges them.
            q_B_K_G_D = q.view(b, keys_B_K_S_D.shape[1], -1, d)
            scores = torch.matmul(q_B_K_G_D, keys_B_K_S_D.transpose(-1, -2)) * attn.scaling
            probs = torch.softmax(scores + bias_B_1_1_S, dim=-1)
            out = torch.matmul(probs, values_B_K_S_D)
            hidden = hidden + attn.o_proj(out.reshape(b, -1))
            mlp = layer.mlp
            x = _rms_norm(layer.post_attention_layernorm, hidden)
            gate, up = F.linear(x, w_gate_up, b_gate_up).chunk(2, dim=-1)
            hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
        return _rms_norm(self.backbone.norm, hidden)


class GraphedStep:
    """CUDA only: `FusedStep.step` recorded once as a CUDA graph and replayed per token.

    On a GPU a small model's decode step is bound by kernel launches, not arithmetic: at a
    Qwen2-0.5B shape an H200 ran ~18 launches per layer per token, and sampling took 0.73 s
    of a 1.08 s X-OPD step while the GPU computed for a quarter of it. A replay launches the
    whole step at once. To keep every shape fixed, the token attends over the cache's full
    capacity, the slots not written yet masked out (−inf) and zeroed; the token's keys and
    values go to slot `S − 1` (the mask's length) through `index_copy_`. The weights are read
    from where they are when the graph is recorded: record a new one after an optimizer step
    (the sampling loop records one per call)."""

    def __init__(self, fused: FusedStep, rows: int, filled: int) -> None:
        self.fused = fused
        caches = fused.layers
        first = caches[0]._key_buffer
        device, dtype, capacity = first.device, first.dtype, first.shape[2]
        for cache in caches:  # unwritten slots hold whatever `new_empty` left there
            cache._key_buffer[:, :, filled:].zero_()
            cache._value_buffer[:, :, filled:].zero_()
        hidden_size = fused.backbone.config.hidden_size
        self.embeds_B_D = torch.zeros(rows, hidden_size, dtype=dtype, device=device)
        self.positions_B = torch.zeros(rows, dtype=torch.long, device=device)
        self.slot = torch.full((1,), filled, dtype=torch.long, device=device)
        self.bias_B_1_1_C = torch.full(
            (rows, 1, 1, capacity), float("-inf"), dtype=dtype, device=device
        )
        self.weights = [joined.get() for joined in fused.joined]  # kept alive for the graph
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):
            self._record()  # a warm-up run off the graph: kernels chosen, workspaces made
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):  # no autograd record in the graph
            self.hidden_B_D = self._record()

    def _write(
        self, cache: Any, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cache._key_buffer.index_copy_(2, self.slot, k)
        cache._value_buffer.index_copy_(2, self.slot, v)
        return cache._key_buffer, cache._value_buffer

    def _record(self) -> torch.Tensor:
        return self.fused.forward(
            self.embeds_B_D, self.positions_B, self.bias_B_1_1_C, self.weights, self._write
        )

    @torch.no_grad()
    def step(
        self, embeds_B_D: torch.Tensor, positions_B: torch.Tensor, mask_B_S: torch.Tensor
    ) -> torch.Tensor:
        s = mask_B_S.shape[1]
        self.bias_B_1_1_C[:, 0, 0, :s] = torch.where(mask_B_S.bool(), 0.0, float("-inf"))
        self.embeds_B_D.copy_(embeds_B_D)
        self.positions_B.copy_(positions_B)
        self.slot.fill_(s - 1)
        self.graph.replay()
        return self.hidden_B_D.clone()


def fused_step(backbone: Any, layers: Sequence[Any], capacity: int) -> FusedStep | None:
    """A `FusedStep` over `backbone` when it is a Qwen2 model this module reproduces
    (float32 weights, full attention in every layer, SiLU MLP, position-only rotary
    embedding, no attention dropout in use), else None."""
    config = getattr(backbone, "config", None)
    if type(backbone).__name__ != "Qwen2Model" or config is None:
        return None
    if backbone.training and config.attention_dropout > 0:
        return None
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    rotary = getattr(backbone, "rotary_emb", None)
    if (
        kinds != {"full_attention"}
        or config.hidden_act != "silu"
        or getattr(rotary, "rope_type", None) != "default"
        or len(layers) != len(backbone.layers)
        or backbone.norm.weight.dtype != torch.float32  # its norms' float32 statistics
    ):
        return None
    return FusedStep(backbone, layers, capacity)
