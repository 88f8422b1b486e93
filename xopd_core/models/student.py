"""The mini world's speech student: a tiny `Qwen2AudioForConditionalGeneration` whose
language model (and LM head) start as an exact copy of the text teacher, plus its processor.

Only the audio encoder and projector are new. The LM head is untied from the embeddings
(HF's Qwen2-Audio never ties them; vLLM ties when the text config says so, so we say no).
Bootstrapping (alignment, speech instruction data) is a separate step.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2AudioProcessor,
    Qwen2ForCausalLM,
    WhisperFeatureExtractor,
)

from xopd_core.config import AudioEncoderShape
from xopd_core.models.attention import use_gqa_sdpa
from xopd_core.models.audio import pooled_length
from xopd_core.models.tokenizer import AUDIO, token_id

SAMPLE_RATE = 16_000


def build_processor(
    tokenizer: PreTrainedTokenizerFast, shape: AudioEncoderShape
) -> Qwen2AudioProcessor:
    features = WhisperFeatureExtractor(
        feature_size=shape.num_mel_bins,
        sampling_rate=SAMPLE_RATE,
        hop_length=shape.hop_length,
        chunk_length=shape.chunk_length_s,
        n_fft=400,
        padding_value=0.0,
        return_attention_mask=True,
    )
    return Qwen2AudioProcessor(
        feature_extractor=features, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def audio_tokens_for(n_samples: int, hop_length: int) -> int:
    """Placeholder tokens one utterance expands to: conv stride 2, then avg-pool 2 (25/s at
    hop 160, 12.5/s at hop 320)."""
    return int(pooled_length(math.ceil(n_samples / hop_length)))


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed sinusoidal positions. HF initialises Qwen2-Audio's position table at
    random and frozen, which trains badly from scratch (DESIGN.md §4)."""
    half = channels // 2
    inv = torch.exp(-math.log(10_000) / (half - 1) * torch.arange(half, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def build_student(
    teacher: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    shape: AudioEncoderShape,
    seed: int,
) -> Qwen2AudioForConditionalGeneration:
    text_config = teacher.config.to_dict()
    text_config["tie_word_embeddings"] = False
    audio_config = Qwen2AudioEncoderConfig(
        d_model=shape.d_model,
        encoder_layers=shape.num_layers,
        encoder_attention_heads=shape.num_heads,
        encoder_ffn_dim=shape.ffn_dim,
        num_mel_bins=shape.num_mel_bins,
        # The encoder insists on exactly 2 × max_source_positions input frames.
        max_source_positions=shape.chunk_length_s * SAMPLE_RATE // shape.hop_length // 2,
    )
    config = Qwen2AudioConfig(
        audio_config=audio_config,
        text_config=text_config,
        audio_token_index=token_id(tokenizer, AUDIO),
    )
    torch.manual_seed(seed)
    student = Qwen2AudioForConditionalGeneration(config)
    with torch.no_grad():
        student.model.language_model.load_state_dict(teacher.model.state_dict())
        student.lm_head.weight.copy_(teacher.lm_head.weight)
        tower = student.model.audio_tower
        tower.embed_positions.weight.copy_(sinusoids(*tower.embed_positions.weight.shape))
        # HF draws the convolutions from N(0, 0.02): their output is then ~100x smaller than
        # the positions added to it and the encoder cannot learn (CTC stalls on blanks).
        for conv in (tower.conv1, tower.conv2):
            torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            torch.nn.init.zeros_(conv.bias)
    student.generation_config.pad_token_id = teacher.generation_config.pad_token_id
    student.generation_config.eos_token_id = teacher.generation_config.eos_token_id
    student.generation_config.do_sample = False
    # Training and HF rollouts attend through grouped-query SDPA (models/attention.py).
    return use_gqa_sdpa(student).eval()
