"""The HF engines and the trainer on a CUDA device (`train.device: cuda`). Skipped where torch
sees no GPU; run on one with `pytest tests/xopd_core/train/test_cuda.py`.

Needs no espeak-ng: the spoken prompts are tones written here, and the tokenizer learns the
reasoning generators' text. TF32 is off, so the GPU computes in float32 as the CPU does.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch

from xopd_core.config import AudioEncoderShape, Difficulty, LMShape, TrainParams
from xopd_core.data.reasoning import make_boolean, make_counting, make_navigate, make_web_of_lies
from xopd_core.engines.base import Modality, Prompt, Rollout
from xopd_core.engines.hf import HfStudent, HfTeacher
from xopd_core.losses import reverse_kl_full
from xopd_core.models.build import build_teacher
from xopd_core.models.student import build_processor, build_student
from xopd_core.models.tokenizer import train_tokenizer
from xopd_core.train.distill import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LM = LMShape(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128)
AUDIO = AudioEncoderShape(d_model=64, num_layers=1, num_heads=2, ffn_dim=128)


@pytest.fixture(autouse=True)
def _float32_on_gpu() -> Iterator[None]:
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any, Any, list[Prompt]]:
    rng = random.Random(0)
    makers = (make_navigate, make_counting, make_web_of_lies, make_boolean)
    items = [makers[i % 4](rng, Difficulty()) for i in range(6)]
    tok = train_tokenizer(t for it in items for t in (it.prompt, it.solution))
    teacher = build_teacher(LM, tok, seed=1)
    student = build_student(teacher, tok, AUDIO, seed=2)
    folder = tmp_path_factory.mktemp("tones")
    prompts = []
    for i, it in enumerate(items):
        seconds = np.arange(int(16_000 * (0.8 + 0.15 * i))) / 16_000
        path = folder / f"p{i}.wav"
        sf.write(
            path, (0.2 * np.sin(2 * np.pi * (180 + 40 * i) * seconds)).astype("float32"), 16_000
        )
        prompts.append(Prompt(f"p{i}", it.prompt, path, it.task))
    return tok, teacher, student, build_processor(tok, AUDIO), prompts


def _on(device: str, model: Any) -> Any:
    return copy.deepcopy(model).to(device)


@pytest.mark.parametrize("modality", ["text", "speech"])
def test_sampling_logprobs_match_teacher_forcing_on_cuda(world, modality: Modality) -> None:
    _, _, student, processor, prompts = world
    engine = HfStudent(_on("cuda", student), processor, batch_size=4)
    rollouts = engine.sample(prompts, modality, n=3, temperature=1.0, max_new_tokens=12, seed=5)
    with torch.no_grad():
        lp, mask = engine.response_logprobs(rollouts)
    assert lp.device.type == "cuda"
    sampled = torch.zeros_like(lp)
    for i, r in enumerate(rollouts):
        sampled[i, : len(r.logprobs)] = torch.tensor(r.logprobs)
    assert mask.sum() == sum(len(r.response_ids) for r in rollouts) > 0
    torch.testing.assert_close(lp * mask, sampled, atol=1e-4, rtol=0)


def test_teacher_scores_on_cuda_equal_cpu(world) -> None:
    tok, teacher, student, processor, prompts = world
    rollouts = HfStudent(_on("cpu", student), processor, batch_size=4).sample(
        prompts, "speech", n=2, temperature=1.0, max_new_tokens=10, seed=3
    )
    transcripts = [next(p.transcript for p in prompts if p.id == r.prompt_id) for r in rollouts]
    vocab = len(tok)
    for mode in ("sampled", "topk", "full"):
        cpu, gpu = (
            HfTeacher(_on(d, teacher), tok, vocab, batch_size=5).score(
                rollouts, transcripts, mode=mode, top_k=4
            )
            for d in ("cpu", "cuda")
        )
        for a, b in zip(cpu, gpu, strict=True):
            np.testing.assert_allclose(a.sampled, b.sampled, atol=1e-4)
            if mode == "topk":
                assert a.topk_ids == b.topk_ids
            if mode == "full":
                torch.testing.assert_close(b.full_T_V.cpu(), a.full_T_V, atol=1e-4, rtol=0)


class _Replay:
    """The same rollouts every step (sampled once on the CPU), so a CPU and a CUDA run train
    on identical data and can be compared."""

    def __init__(self, rollouts: Sequence[Rollout]) -> None:
        self.rollouts = list(rollouts)

    def sample(self, prompts: Sequence[Prompt], modality: Modality, **_: Any) -> list[Rollout]:
        ids = {p.id for p in prompts}
        return [r for r in self.rollouts if r.modality == modality and r.prompt_id in ids]


@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_xopd_steps_on_cuda_equal_cpu(world, loss: str) -> None:
    tok, teacher, student, processor, prompts = world
    sampler = HfStudent(_on("cpu", student), processor, batch_size=8)
    rollouts = [
        r
        for m in ("text", "speech")
        for r in sampler.sample(prompts, m, n=2, temperature=1.0, max_new_tokens=10, seed=9)
    ]
    cfg = TrainParams(
        steps=3,
        prompts_per_step=len(prompts),
        rollouts_per_prompt=2,
        max_new_tokens=10,
        loss=loss,  # type: ignore[arg-type]
        lr=1e-3,
        micro_batch_size=5,
        anchor_items=0,
    )
    runs = {}
    for device in ("cpu", "cuda"):
        model = _on(device, student)
        engine = HfStudent(model, processor, batch_size=8)
        scorer = HfTeacher(_on(device, teacher), tok, len(tok), batch_size=8)
        result = train(engine, _Replay(rollouts), scorer, prompts, cfg, vocab_size=len(tok))
        runs[device] = (model, result.history)
    (cpu, cpu_hist), (gpu, gpu_hist) = runs["cpu"], runs["cuda"]
    for a, b in zip(cpu_hist, gpu_hist, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3, abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    before, on_cpu = dict(student.named_parameters()), dict(cpu.named_parameters())
    moved, apart = [], []
    for name, p in gpu.named_parameters():
        assert p.device.type == "cuda"
        if "audio_tower" in name or "multi_modal_projector" in name:  # frozen: bitwise kept
            assert torch.equal(p.cpu(), before[name])
        else:
            moved.append((p.detach().cpu() - before[name].detach()).flatten())
            apart.append((p.detach().cpu() - on_cpu[name].detach()).flatten())
    # The runs differ by under 5 % of how far training moved the weights (measured on an
    # H200: 2 %). Not per weight: Adam's first steps move a weight whose gradient is
    # rounding noise by ±lr either way, so the losses and gradient norms above are the
    # tight check.
    movement, difference = torch.cat(moved).norm(), torch.cat(apart).norm()
    assert movement > 1e-2
    assert difference < 5e-2 * movement


def test_chunked_reverse_kl_on_cuda_equals_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(2, 5, 1000, generator=g)).bfloat16()
    t = (3 * torch.randn(2, 5, 1000, generator=g)).bfloat16()
    cpu = reverse_kl_full(s, t)
    gpu = reverse_kl_full(s.cuda(), t.cuda())
    assert gpu.dtype == torch.float32
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)


def test_graphed_decode_step_equals_the_backbone() -> None:
    """Three tokens after a left-padded prefill: the CUDA-graph step's hidden states and the
    cache slots it wrote equal transformers' own steps on a twin cache."""
    from tests.xopd_core.engines.test_decode import assert_steps_equal_the_backbone
    from xopd_core.engines.decode import GraphedStep

    rng = random.Random(1)
    tok = train_tokenizer(make_navigate(rng, Difficulty()).solution for _ in range(4))
    shape = LMShape(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    backbone = build_teacher(shape, tok, seed=3).eval().cuda().model
    assert_steps_equal_the_backbone(
        backbone, len(tok), lambda fused: GraphedStep(fused, rows=3, filled=9).step
    )


class _Stop(Exception):
    pass


def test_an_interrupted_cuda_run_resumes_from_its_state(world, tmp_path) -> None:
    """The resumable state is written from and read back into CUDA weights and Adam moments:
    stopped after 2 of 4 steps and resumed, the run ends where an uninterrupted one does.
    Compared to 1e-6, not bitwise: CUDA's embedding backward adds with atomics, in no fixed
    order."""
    tok, teacher, student, processor, prompts = world
    cfg = TrainParams(
        steps=4,
        prompts_per_step=3,
        rollouts_per_prompt=2,
        max_new_tokens=8,
        lr=1e-3,
        micro_batch_size=4,
        checkpoint_every=1,
        loss="sampled",
        anchor_items=0,
    )

    def run(state: Any = None, on_step: Any = None) -> tuple[Any, Any]:
        model = _on("cuda", student)
        engine = HfStudent(model, processor, batch_size=8)
        scorer = HfTeacher(_on("cuda", teacher), tok, len(tok), batch_size=8)
        result = train(
            engine,
            engine,
            scorer,
            prompts,
            cfg,
            vocab_size=len(tok),
            state_dir=state,
            on_step=on_step,
        )
        return model, result

    straight, _ = run()

    def stop_after_two(step: int, metrics: dict) -> None:
        if step == 1:
            raise _Stop

    with pytest.raises(_Stop):
        run(tmp_path / "state", stop_after_two)
    resumed, result = run(tmp_path / "state")
    assert result.resumed_from == 2 and len(result.history) == 4
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert b.device.type == "cuda", name
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
