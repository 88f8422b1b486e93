"""The fused decode step computes what transformers' backbone computes for the same token,
on the same cache, and declines configurations it does not reproduce."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import Cache, Qwen2Config, Qwen2ForCausalLM

from xopd_core.config import LMShape
from xopd_core.engines.decode import fused_step
from xopd_core.engines.sampler import PreallocatedLayer
from xopd_core.models.build import build_teacher


def _prefilled(backbone: Any, ids_B_L: torch.Tensor, mask_B_L: torch.Tensor, capacity: int):
    layers = [PreallocatedLayer(capacity) for _ in range(backbone.config.num_hidden_layers)]
    cache = Cache(layers=layers)
    positions = (mask_B_L.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        backbone(
            input_ids=ids_B_L,
            attention_mask=mask_B_L,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
    return cache, layers, positions[:, -1] + 1


def backbone_step(
    backbone: Any, cache: Any, tokens_B: torch.Tensor, seen_B_S: torch.Tensor, positions_B
) -> torch.Tensor:
    """transformers' own step for one token per row: the reference for the fused ones."""
    with torch.no_grad():
        return backbone(
            input_ids=tokens_B[:, None],
            attention_mask=seen_B_S,
            position_ids=positions_B[:, None],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]


@pytest.mark.parametrize("which", ["teacher", "student", "two_groups"])
def test_steps_equal_the_backbone_on_left_padded_rows(parts, which: str) -> None:
    """Three tokens decoded after a left-padded prefill: the fused step's hidden states and
    cache contents equal the backbone's own steps on a twin cache. `two_groups`: two layers,
    four query heads over two key/value heads, so a wrong head grouping would show."""
    tok, teacher, student, _ = parts
    if which == "two_groups":
        shape = LMShape(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=128)
        model = build_teacher(shape, tok, seed=3).eval()
    else:
        model = (teacher if which == "teacher" else student).eval()
    inner = model.model
    backbone = getattr(inner, "language_model", inner)
    assert_steps_equal_the_backbone(backbone, 60, lambda fused: fused.step)


def assert_steps_equal_the_backbone(
    backbone: Any, vocab: int, make_step: Callable[[Any], Callable[..., torch.Tensor]]
) -> None:
    """Three tokens decoded after a left-padded prefill, on the backbone's device, by
    `make_step(fused_step)` and by the backbone on a twin cache: equal hidden states and
    cache contents."""
    device = backbone.norm.weight.device
    ids = torch.randint(5, vocab, (3, 9), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    capacity = 9 + 3
    theirs, _, position = _prefilled(backbone, ids, mask, capacity)
    _, ours_layers, _ = _prefilled(backbone, ids, mask, capacity)
    fused = fused_step(backbone, ours_layers, capacity)
    assert fused is not None
    step = make_step(fused)
    full_mask = torch.cat([mask, torch.ones_like(mask[:, :3])], dim=1)
    for t, token in enumerate([11, 12, 13]):
        tokens = torch.full((3,), token, device=device)
        seen = full_mask[:, : 9 + t + 1]
        expected = backbone_step(backbone, theirs, tokens, seen, position + t)
        got = step(backbone.embed_tokens(tokens), position + t, seen)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for a, b in zip(theirs.layers, ours_layers, strict=True):  # every slot written: 9 + 3
        torch.testing.assert_close(b._key_buffer[:, :, :capacity], a.keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(b._value_buffer[:, :, :capacity], a.values, atol=1e-5, rtol=0)


def test_reads_the_weights_at_each_step(parts) -> None:
    """A model updated between steps (the trainer's case) is decoded with its new weights."""
    _, teacher, _, _ = parts
    model = copy.deepcopy(teacher).eval()
    backbone = model.model
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    _, layers, position = _prefilled(backbone, ids, mask, 5)
    step = fused_step(backbone, layers, 5)
    assert step is not None
    token = backbone.embed_tokens(torch.tensor([9]))
    before = step.step(token, position, torch.ones(1, 4, dtype=torch.long))
    with torch.no_grad():
        backbone.layers[0].mlp.down_proj.weight.mul_(2.0)
    for layer in layers:
        layer.length = 3  # the second step overwrites the first one's cache slot
    after = step.step(token, position, torch.ones(1, 4, dtype=torch.long))
    assert not torch.allclose(before, after, atol=1e-4)


def test_declines_what_it_does_not_reproduce(parts) -> None:
    _, teacher, _, _ = parts
    layers = [PreallocatedLayer(4) for _ in range(teacher.config.num_hidden_layers)]
    assert fused_step(teacher.model, layers, 4) is not None
    config = copy.deepcopy(teacher.config)
    config.layer_types = ["sliding_attention", *config.layer_types[1:]]
    config.use_sliding_window = True
    assert fused_step(Qwen2ForCausalLM(config).model, layers, 4) is None
    gelu = Qwen2Config(**{**teacher.config.to_dict(), "hidden_act": "gelu"})
    assert fused_step(Qwen2ForCausalLM(gelu).model, layers, 4) is None
    scaled = Qwen2Config(
        **{**teacher.config.to_dict(), "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
    )
    assert fused_step(Qwen2ForCausalLM(scaled).model, layers, 4) is None
    half = Qwen2ForCausalLM(teacher.config).to(torch.bfloat16)
    assert fused_step(half.model, layers, 4) is None
    deeper = [*layers, PreallocatedLayer(4)]
    assert fused_step(teacher.model, deeper, 4) is None  # a cache of another depth
    assert fused_step(teacher, layers, 4) is None  # the causal LM, not its backbone
