from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tasks.teacher import teacher
from tests.pipeline_fixtures import TINY_TEACHER
from xopd_core.config import Params
from xopd_core.engines.greedy import greedy_generate
from xopd_core.models.checkpoint import RESOLVED_CONFIG, weights_sha256
from xopd_core.models.prompts import text_prompt_ids
from xopd_core.models.tokenizer import IM_END, PAD, load_tokenizer, token_id

TINY = TINY_TEACHER


def test_teacher_stage_trains_saves_and_reloads(tiny_world: Path, tmp_path: Path) -> None:
    losses: list[float] = []
    out = tmp_path / "teacher"
    summary = teacher(
        Params(teacher=TINY),
        tiny_world,
        out,
        tmp_path / "m.json",
        on_step=lambda step, loss: losses.append(loss),
    )
    assert len(losses) == TINY.steps
    # It learns: 6.2 -> 3.1 nats in 40 steps (the longer counting solutions of 2026-11-30
    # made the ratio 0.505, so the bar is 0.6, still far from a flat loss).
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5

    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0.0 <= metrics["text_accuracy_mean"] <= 1.0
    assert {
        f"text_accuracy_{t}"
        for t in ("navigate", "object_counting", "web_of_lies", "boolean_expressions")
    } <= set(metrics)
    assert metrics["weights_sha256"] == summary.weights_sha256 == weights_sha256(out)
    resolved = json.loads((out / RESOLVED_CONFIG).read_text())
    assert resolved["params"]["steps"] == TINY.steps

    # Reload through the Auto classes (safetensors only) and decode the same tokens.
    tok = load_tokenizer(out)
    model = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True).eval()
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    prompt = text_prompt_ids(tok, "alice lies. bob says alice lies. does bob tell the truth?")
    kw = {"pad_id": token_id(tok, PAD), "eos_id": token_id(tok, IM_END), "max_new_tokens": 12}
    first = greedy_generate(model, [prompt], **kw)
    again = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True).eval()
    assert greedy_generate(again, [prompt], **kw) == first
    with torch.no_grad():
        ids = torch.tensor([prompt])
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_teacher_is_deterministic_for_a_seed(tiny_world: Path, tmp_path: Path) -> None:
    a = teacher(
        Params(teacher=TINY.model_copy(update={"steps": 5})),
        tiny_world,
        tmp_path / "a",
        tmp_path / "a.json",
    )
    b = teacher(
        Params(teacher=TINY.model_copy(update={"steps": 5})),
        tiny_world,
        tmp_path / "b",
        tmp_path / "b.json",
    )
    assert a.weights_sha256 == b.weights_sha256


def test_task_weights_set_the_training_mix(tiny_world: Path, tmp_path: Path) -> None:
    weights = {
        "navigate": 1.0,
        "object_counting": 2.0,
        "web_of_lies": 0.5,
        "boolean_expressions": 0.5,
    }
    tiny = TINY.model_copy(update={"steps": 1, "task_weights": weights})
    metrics = teacher(Params(teacher=tiny), tiny_world, tmp_path / "t", tmp_path / "m.json").metrics
    n = metrics["train_examples"]
    for task, w in weights.items():
        assert metrics[f"train_examples_{task}"] == pytest.approx(n * w / 4.0, abs=1)

    missing = TINY.model_copy(update={"steps": 1, "task_weights": {"navigate": 1.0}})
    with pytest.raises(ValueError, match=r"teacher.task_weights: no weight for group\(s\) \['bool"):
        teacher(Params(teacher=missing), tiny_world, tmp_path / "u", tmp_path / "u.json")
    assert not (tmp_path / "u").exists() and not (tmp_path / "u.json").exists()
