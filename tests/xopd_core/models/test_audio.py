from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
import torch

from tests.xopd_core.conftest import speech_inputs
from xopd_core.data.manifest import manifest_path, read_manifest
from xopd_core.models.audio import encode_audio, extract_features, merge_audio


def test_cropped_encoder_pass_equals_the_full_window_forward(parts, tiny_world: Path) -> None:
    """Training encodes features cropped to the batch's longest utterance; serving pads to
    the 30 s window. At every valid position the two must agree."""
    _, _, student, processor = parts
    rows = read_manifest(manifest_path(tiny_world, "eval"))[:3]
    waves = [sf.read(str(tiny_world / r["audio_path"]), dtype="float32")[0] for r in rows]
    assert len({len(w) for w in waves}) == 3  # different lengths in one cropped batch
    feats = extract_features(processor, waves)
    with torch.no_grad():
        embeds = encode_audio(student, feats)
        for row, f, e in zip(rows, feats, embeds, strict=True):
            inputs = speech_inputs(processor, tiny_world, row)
            assert f.mel_F_M.shape[-1] < inputs["input_features"].shape[-1]
            full = student(**inputs).logits
            ids = inputs["input_ids"]
            merged = merge_audio(student, ids, [e])
            cropped = student(inputs_embeds=merged, attention_mask=inputs["attention_mask"]).logits
            assert e.shape[0] == f.audio_tokens
            torch.testing.assert_close(cropped, full, rtol=0, atol=1e-5)


def test_merge_audio_refuses_a_count_mismatch(parts, tiny_world: Path) -> None:
    _, _, student, processor = parts
    row = read_manifest(manifest_path(tiny_world, "eval"))[0]
    inputs = speech_inputs(processor, tiny_world, row)
    wave = sf.read(str(tiny_world / row["audio_path"]), dtype="float32")[0]
    with torch.no_grad():
        (embeds,) = encode_audio(student, extract_features(processor, [wave]))
        with pytest.raises(ValueError, match="placeholders but"):
            merge_audio(student, inputs["input_ids"], [embeds[:-1]])
        with pytest.raises(ValueError, match="no audio"):
            merge_audio(student, inputs["input_ids"], [])


def test_tightly_padded_features_equal_the_full_window_ones(parts, tiny_world: Path) -> None:
    _, _, _, processor = parts
    rows = read_manifest(manifest_path(tiny_world, "eval"))[:4]
    waves = [sf.read(str(tiny_world / r["audio_path"]), dtype="float32")[0] for r in rows]
    feats = extract_features(processor, waves, batch_size=3)  # a batch with mixed lengths
    for row, wave, f in zip(rows, waves, feats, strict=True):
        full = processor.feature_extractor(
            [wave], sampling_rate=16000, return_attention_mask=True, return_tensors="pt"
        )
        assert f.frames == int(full["attention_mask"].sum()), row["id"]
        kept = f.mel_F_M.shape[-1]
        assert kept == f.frames + 4
        expected = full["input_features"][0, :, :kept]
        torch.testing.assert_close(f.mel_F_M, expected, rtol=0, atol=1e-5)
