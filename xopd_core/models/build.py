"""Builders for the mini world's tiny models (seeded, CPU, float32).

The teacher is a `Qwen2ForCausalLM`; the student (see student.py) is a
`Qwen2AudioForConditionalGeneration` whose language model starts as a copy of the teacher.
Real checkpoints are loaded from their HF folders instead; nothing here downloads.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from xopd_core.config import LMShape
from xopd_core.models.attention import use_gqa_sdpa
from xopd_core.models.tokenizer import IM_END, PAD, token_id


def qwen2_config(shape: LMShape, tokenizer: PreTrainedTokenizerFast) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True,
        pad_token_id=token_id(tokenizer, PAD),
        eos_token_id=token_id(tokenizer, IM_END),
        bos_token_id=None,
    )


def build_teacher(
    shape: LMShape, tokenizer: PreTrainedTokenizerFast, seed: int
) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(qwen2_config(shape, tokenizer))
    model.generation_config.pad_token_id = token_id(tokenizer, PAD)
    model.generation_config.eos_token_id = token_id(tokenizer, IM_END)
    model.generation_config.do_sample = False
    # Training and HF rollouts attend through grouped-query SDPA (models/attention.py).
    return use_gqa_sdpa(model).eval()
