"""Grouped-query SDPA (`models.attention`): the same attention as transformers' `sdpa`, for
a padded text batch (values and gradients), cached decoding and the speech model, computed
without expanded K/V, and never written into a saved config."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from transformers import Qwen2AudioForConditionalGeneration, Qwen2ForCausalLM

from tests.xopd_core.conftest import TINY_LM, speech_inputs
from xopd_core.data.manifest import manifest_path, read_manifest
from xopd_core.engines.sampler import sample_from_embeds
from xopd_core.models.attention import NAME, use_gqa_sdpa
from xopd_core.models.build import build_teacher


@pytest.fixture(scope="module")
def pair(parts):
    """The same tiny GQA teacher (2 query heads per K/V head) with each attention."""
    tok = parts[0]
    assert TINY_LM.num_heads > TINY_LM.num_kv_heads
    reference = build_teacher(TINY_LM, tok, seed=3).eval()
    reference.set_attn_implementation("sdpa")
    ours = use_gqa_sdpa(copy.deepcopy(reference))
    return reference, ours


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    mask[2, :1] = 0
    return ids, mask


def test_logits_and_gradients_equal_sdpa(pair) -> None:
    reference, ours = pair
    assert ours.config._attn_implementation == NAME
    ids, mask = _left_padded_batch()
    out = {}
    for name, model in (("reference", reference), ("ours", ours)):
        model.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits
        (logits[mask.bool()].float().logsumexp(-1).sum()).backward()
        out[name] = (logits.detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(out["ours"][0], out["reference"][0], rtol=0, atol=1e-6)
    for a, b in zip(out["ours"][1], out["reference"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_cached_sampling_equal_sdpa(pair) -> None:
    """Prefill + one query per decoded token through the KV cache: same draws, same
    log-probs."""
    ids, mask = _left_padded_batch()
    samples = []
    for model in pair:
        embeds = model.get_input_embeddings()(ids).detach()
        samples.append(
            sample_from_embeds(
                model,
                embeds,
                mask,
                n=2,
                temperature=1.0,
                max_new_tokens=12,
                eos_id=-1,
                pad_id=0,
                generator=torch.Generator().manual_seed(5),
            )
        )
    assert torch.equal(samples[0].tokens_BG_T, samples[1].tokens_BG_T)
    torch.testing.assert_close(
        samples[0].logprobs_BG_T, samples[1].logprobs_BG_T, atol=1e-6, rtol=0
    )


def test_kv_heads_are_not_expanded(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `sdpa` does on CPU with a mask (one K/V copy per query head) is what this
    module removes: SDPA must receive the model's K/V heads and `enable_gqa`."""
    seen: list[tuple[int, int, bool]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((q.shape[1], k.shape[1], bool(kwargs.get("enable_gqa", False))))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        pair[1](input_ids=ids, attention_mask=mask)
    assert seen == [(TINY_LM.num_heads, TINY_LM.num_kv_heads, True)] * TINY_LM.num_layers


def test_speech_model_equal_sdpa(parts, tiny_world: Path) -> None:
    _, _, student, processor = parts
    reference = copy.deepcopy(student).eval()
    reference.set_attn_implementation("sdpa")
    ours = use_gqa_sdpa(copy.deepcopy(reference))
    row = read_manifest(manifest_path(tiny_world, "eval"))[0]
    inputs = speech_inputs(processor, tiny_world, row)
    with torch.no_grad():
        a = reference(**inputs).logits
        b = ours(**inputs).logits
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_saved_checkpoint_does_not_name_it(pair, parts, tmp_path: Path) -> None:
    """Checkpoints stay plain for other readers (vLLM, a fresh transformers process)."""
    _, ours = pair
    ours.save_pretrained(str(tmp_path / "lm"))
    student = use_gqa_sdpa(copy.deepcopy(parts[2]))
    student.save_pretrained(str(tmp_path / "speech"))
    for folder in ("lm", "speech"):
        assert NAME not in json.dumps(json.loads((tmp_path / folder / "config.json").read_text()))
    assert (
        Qwen2ForCausalLM.from_pretrained(str(tmp_path / "lm")).config._attn_implementation != NAME
    )
    reloaded = Qwen2AudioForConditionalGeneration.from_pretrained(str(tmp_path / "speech"))
    assert reloaded.config._attn_implementation != NAME


def test_bf16_autocast_attends_in_float32(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CPU bf16 autocast (training's `precision: bf16`) SDPA gets float32 inputs
    (its bf16 CPU kernels are ~4x slower), and the logits stay close to float32's."""
    reference, ours = pair
    dtypes: list[torch.dtype] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(q, k, v, *args, **kwargs)
        dtypes.extend([q.dtype, k.dtype, v.dtype, out.dtype])
        return out

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    ids, mask = _left_padded_batch()
    with torch.no_grad():
        exact = reference(input_ids=ids, attention_mask=mask).logits
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = ours(input_ids=ids, attention_mask=mask).logits
    assert dtypes and set(dtypes) == {torch.float32}
    valid = mask.bool()
    torch.testing.assert_close(mixed[valid].float(), exact[valid], rtol=0, atol=0.1)
    assert not torch.equal(mixed[valid].float(), exact[valid])  # bf16 really was used
