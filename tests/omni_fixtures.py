"""Tiny random Qwen2.5-Omni and Qwen3-Omni thinkers (the real classes) with processors whose
tokenizers carry each family's special tokens and chat template, built locally from the
mini world's tokenizer: no download. The thinkers' vision towers are there (the class builds
one) but never used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen3OmniMoeThinkerConfig,
    Qwen3OmniMoeThinkerForConditionalGeneration,
    WhisperFeatureExtractor,
)

from tests.xopd_core.engines.test_teachers import tiny_lm_config
from xopd_core.models.checkpoint import save_checkpoint
from xopd_core.models.tokenizer import load_tokenizer, token_id

MEL_BINS = 16

# Each family's named special tokens (as its tokenizer_config.json names them).
SPECIALS = {
    "qwen2_5_omni": {
        "audio_bos_token": "<|audio_bos|>",
        "audio_token": "<|AUDIO|>",
        "audio_eos_token": "<|audio_eos|>",
        "image_token": "<|IMAGE|>",
        "video_token": "<|VIDEO|>",
        "vision_bos_token": "<|vision_bos|>",
        "vision_eos_token": "<|vision_eos|>",
    },
    "qwen3_omni": {
        "audio_bos_token": "<|audio_start|>",
        "audio_token": "<|audio_pad|>",
        "audio_eos_token": "<|audio_end|>",
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_bos_token": "<|vision_start|>",
        "vision_eos_token": "<|vision_end|>",
    },
}


def chat_template(family: str) -> str:
    """The family's message layout: system/user/assistant turns, an audio part rendered as
    its begin, placeholder and end markers (as the real templates do)."""
    s = SPECIALS[family]
    audio = s["audio_bos_token"] + s["audio_token"] + s["audio_eos_token"]
    return (
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'audio' %}}{audio}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def omni_tokenizer(tok: Any, family: str, where: Path) -> Any:
    """The mini tokenizer plus the family's special tokens (new ones get ids past the
    shared vocabulary, as in the real families) and its chat template, reloaded."""
    tok.save_pretrained(str(where))
    out = load_tokenizer(where)
    specials = SPECIALS[family]
    new = [t for t in specials.values() if t not in out.get_vocab()]
    out.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    out._set_model_specific_special_tokens(specials)  # saved as named special tokens
    out.chat_template = chat_template(family)
    return out


def _text_config(tok: Any, rows: int) -> dict[str, Any]:
    return {**tiny_lm_config(tok, rows), "tie_word_embeddings": False}


def _audio_config() -> dict[str, Any]:
    return dict(
        num_mel_bins=MEL_BINS,
        d_model=32,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=64,
        output_dim=64,
        max_source_positions=1500,
    )


def tiny_omni(family: str, tok: Any, seed: int = 5) -> Any:
    """A random tiny thinker of `family` over `tok` (an `omni_tokenizer`), embedding rows
    padded to a multiple of 64 as real checkpoints pad theirs."""
    rows = -(-len(tok) // 64) * 64
    audio_id = token_id(tok, SPECIALS[family]["audio_token"])
    torch.manual_seed(seed)
    if family == "qwen2_5_omni":
        config = Qwen2_5OmniThinkerConfig(
            audio_config={**_audio_config(), "n_window": 100},
            vision_config=dict(
                depth=1,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                fullatt_block_indexes=[0],
            ),
            text_config={
                **_text_config(tok, rows),
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [4, 6, 6],
                },
            },
            audio_token_id=audio_id,
            audio_token_index=audio_id,
        )
        return Qwen2_5OmniThinkerForConditionalGeneration(config).eval()
    config = Qwen3OmniMoeThinkerConfig(
        audio_config={
            **_audio_config(),
            "n_window": 50,
            "n_window_infer": 400,
            "downsample_hidden_size": 8,
            "conv_chunksize": 500,
        },
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            deepstack_visual_indexes=[],
        ),
        text_config={
            **_text_config(tok, rows),
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [4, 6, 6],
                "mrope_interleaved": True,
            },
        },
        audio_token_id=audio_id,
    )
    return Qwen3OmniMoeThinkerForConditionalGeneration(config).eval()


def omni_feature_extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(
        feature_size=MEL_BINS,
        sampling_rate=16_000,
        hop_length=160,
        chunk_length=30,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=True,
    )


def save_omni_student(family: str, tok: Any, out: Path, seed: int = 5) -> Path:
    """A tiny thinker of `family` saved as a student checkpoint folder."""
    otok = omni_tokenizer(tok, family, out.with_name(out.name + ".tok"))
    model = tiny_omni(family, otok, seed)
    # The real folders also hold the processor's image/video configs; those need
    # torchvision and an audio student never reads them (the tokenizer and the feature
    # extractor are what xopd loads).
    save_checkpoint(model, out, savers=[otok, omni_feature_extractor()], resolved_config={})
    return out
