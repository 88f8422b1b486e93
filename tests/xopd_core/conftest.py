"""Tiny tokenizer + teacher + student + processor, built once per module that asks."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch

from xopd_core.config import AudioEncoderShape, LMShape
from xopd_core.data.manifest import manifest_path, read_manifest
from xopd_core.models.build import build_teacher
from xopd_core.models.student import build_processor, build_student
from xopd_core.models.tokenizer import train_tokenizer

TINY_LM = LMShape(
    hidden_size=64,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=128,
    max_positions=2048,
)
TINY_AUDIO = AudioEncoderShape(d_model=64, num_layers=1, num_heads=2, ffn_dim=128)


@pytest.fixture(scope="session")
def parts(tiny_world: Path):
    rows = read_manifest(manifest_path(tiny_world, "train"))
    rows += read_manifest(manifest_path(tiny_world, "text_train"))
    tok = train_tokenizer(t for r in rows for t in (r["transcript"], r["solution"]))
    teacher = build_teacher(TINY_LM, tok, seed=1)
    student = build_student(teacher, tok, TINY_AUDIO, seed=2)
    return tok, teacher, student, build_processor(tok, TINY_AUDIO)


def speech_inputs(processor, tiny_world: Path, row: dict) -> dict[str, torch.Tensor]:
    audio, rate = sf.read(str(tiny_world / row["audio_path"]), dtype="float32")
    messages = [{"role": "user", "content": [{"type": "audio"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=text, audio=[audio], sampling_rate=rate, return_tensors="pt")
