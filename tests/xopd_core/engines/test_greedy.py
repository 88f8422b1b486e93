"""Evaluation's greedy loop answers what `generate`'s greedy search answers: for text prompts
of different lengths (left padding, rows ending at EOS at different steps), and for speech
prompts served the HF way (processor features over the full 30 s window)."""

from __future__ import annotations

import copy
from pathlib import Path

import soundfile as sf
import torch

from xopd_core.data.manifest import manifest_path, read_rows
from xopd_core.engines.greedy import greedy_generate
from xopd_core.eval.evaluate import evaluate_speech
from xopd_core.models.prompts import text_prompt_ids
from xopd_core.models.tokenizer import IM_END, PAD, decode, token_id


def _cut(row: list[int], eos_id: int) -> list[int]:
    return row[: row.index(eos_id)] if eos_id in row else row


def test_text_answers_equal_generate(parts, tiny_world: Path) -> None:
    tok, teacher, _, _ = parts
    pad_id, eos_id = token_id(tok, PAD), token_id(tok, IM_END)
    # An output bias that makes EOS likely but not certain: rows end at different steps.
    model = copy.deepcopy(teacher).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.copy_(
            0.3 * torch.randn(head.bias.shape, generator=torch.Generator().manual_seed(0))
        )
        head.bias[eos_id] = 1.2
    model.lm_head = head
    rows = read_rows(manifest_path(tiny_world, "eval"))[:8]
    prompts = [text_prompt_ids(tok, r.transcript) for r in rows]
    ours = greedy_generate(
        model, prompts, pad_id=pad_id, eos_id=eos_id, max_new_tokens=16, batch_size=5
    )
    theirs = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([p]),
                max_new_tokens=16,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
        theirs.append(_cut(out[0, len(p) :].tolist(), eos_id))
    assert ours == theirs, [len(t) for t in theirs]
    assert len({len(t) for t in theirs}) > 1 and min(len(t) for t in theirs) < 16
    # Shared by 2 or 3 ranks (other batches, other thread counts): the same answers.
    for processes in (2, 3):
        shared = greedy_generate(
            model,
            prompts,
            pad_id=pad_id,
            eos_id=eos_id,
            max_new_tokens=16,
            batch_size=2,
            processes=processes,
        )
        assert shared == theirs, processes


def test_speech_answers_equal_generate_on_the_full_window(parts, tiny_world: Path) -> None:
    tok, _, student, processor = parts
    model = student.eval()
    pad_id, eos_id = token_id(tok, PAD), token_id(tok, IM_END)
    rows = read_rows(manifest_path(tiny_world, "eval"))[:6]
    waves = [sf.read(str(tiny_world / r.audio_path), dtype="float32")[0] for r in rows]
    ours = evaluate_speech(model, processor, rows, waves, max_new_tokens=12, batch_size=4)
    shared = evaluate_speech(
        model, processor, rows, waves, max_new_tokens=12, batch_size=4, processes=2
    )
    assert shared == ours
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    for r, wave, result in zip(rows, waves, ours, strict=True):
        inputs = processor(text=prompt, audio=[wave], sampling_rate=16_000, return_tensors="pt")
        assert inputs["input_features"].shape[-1] == 3000  # the 30 s window
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
        ids = _cut(out[0, inputs["input_ids"].shape[1] :].tolist(), eos_id)
        assert result.response == decode(tok, ids), r.id
        assert result.id == r.id
