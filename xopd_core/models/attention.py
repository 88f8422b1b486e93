"""Grouped-query attention through SDPA without copying the key/value heads.

transformers' `sdpa` attention hands grouped-query attention to
`scaled_dot_product_attention(enable_gqa=True)` only on CUDA/NPU without a mask; on CPU, and
whenever a padding mask is given (every batched rollout and teacher pass), it first expands
K and V to one copy per query head (`repeat_kv`), a fresh `[B, H, T, D]` tensor per layer
and per decoded token. PyTorch's CPU kernels accept `enable_gqa` with a mask, so `xopd_sdpa`
(registered with transformers' attention interface) always passes it and never copies.

The result is the same attention (tests/xopd_core/models/test_attention.py compares logits
and gradients with `sdpa`); rollouts, scoring and training use it (issue #4, the throughput
benchmark). `attn_implementation` is not written into saved configs, so checkpoints stay
plain Qwen2 / Qwen2-Audio for other readers and vLLM.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "xopd_sdpa"


def gqa_sdpa_forward(
    module: torch.nn.Module,
    query_B_H_Q_D: torch.Tensor,
    key_B_K_S_D: torch.Tensor,
    value_B_K_S_D: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: H query heads over K ≤ H key/value heads
    (H a multiple of K); returns `[B, Q, H, D]` and no attention weights."""
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"{NAME} does not implement position biases; use 'sdpa'")
    q_len = query_B_H_Q_D.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers does: the causal flag only for a mask-free prefill.
    causal = bool(causal and attention_mask is None and q_len > 1)
    dtype = query_B_H_Q_D.dtype
    on_cpu = query_B_H_Q_D.device.type == "cpu"
    half = (torch.bfloat16, torch.float16)
    if on_cpu and any(t.dtype in half for t in (query_B_H_Q_D, key_B_K_S_D, value_B_K_S_D)):
        # (Under autocast a layer that normalises q and k in float32, as Qwen3's do, hands
        # over float32 queries and keys beside bfloat16 values.)
        # PyTorch's CPU attention kernels are ~4x slower in bf16 than in float32 at these
        # head sizes; attend in float32 (outside autocast, which would cast back) and
        # return the input dtype.
        query_B_H_Q_D, key_B_K_S_D, value_B_K_S_D = (
            t.float() for t in (query_B_H_Q_D, key_B_K_S_D, value_B_K_S_D)
        )
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False) if on_cpu else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(
            query_B_H_Q_D,
            key_B_K_S_D,
            value_B_K_S_D,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=causal,
            enable_gqa=key_B_K_S_D.shape[1] != query_B_H_Q_D.shape[1],
        )
    return out.transpose(1, 2).contiguous().to(dtype), None


def register() -> str:
    """Make `NAME` a valid `attn_implementation` (idempotent); returns it."""
    AttentionInterface.register(NAME, gqa_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_gqa_sdpa(model: Any) -> Any:
    """Switch a loaded model's attention (all sub-models) to `NAME`, in place; returns it."""
    model.set_attn_implementation(register())
    return model
