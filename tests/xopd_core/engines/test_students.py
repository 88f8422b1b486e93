"""Student families (#23): the Qwen2.5-Omni and Qwen3-Omni thinkers (tiny, random, the real
classes) give through xopd's own audio path, prompts and 1-D positions the same log-probs as
their own forward on the processor's inputs; folders load by their config's class."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

from tasks.cli import main
from tests.omni_fixtures import (
    MEL_BINS,
    SPECIALS,
    omni_feature_extractor,
    omni_tokenizer,
    save_omni_student,
    tiny_omni,
)
from tests.xopd_core.engines.test_teachers import save_teacher, tiny_teacher_of
from xopd_core.config import TrainParams
from xopd_core.engines.base import Rollout
from xopd_core.engines.hf import HfStudent, HfTeacher
from xopd_core.engines.scoring import shared_vocab_size
from xopd_core.engines.vllm_engine import EngineError, VllmEngine
from xopd_core.errors import CheckpointError
from xopd_core.models.audio import AudioFeatures
from xopd_core.models.checkpoint import weights_sha256
from xopd_core.models.families import (
    QWEN2_5_OMNI,
    QWEN3_OMNI,
    SpeechProcessor,
    family_of,
    load_student,
    student_family,
)
from xopd_core.models.prompts import text_prompt_ids
from xopd_core.models.tokenizer import load_tokenizer, token_id
from xopd_core.train.distill import train

FAMILIES = ["qwen2_5_omni", "qwen3_omni"]


def _hf_inputs(tok, family, extractor, wave: np.ndarray, ids: list[int]) -> dict:
    """The model's own inputs for one utterance: the features of the full window with the
    extractor's attention mask, and the prompt ids (placeholders already expanded)."""
    features = extractor(
        [wave],
        sampling_rate=16_000,
        return_attention_mask=True,
        padding="max_length",
        return_tensors="pt",
    )
    return {
        "input_ids": torch.tensor([ids]),
        "input_features": features["input_features"],
        "feature_attention_mask": features["attention_mask"],
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_an_omni_students_log_probs_equal_its_own_forward(
    parts, prompts, tmp_path: Path, family: str
) -> None:
    """Two utterances of different lengths in one left-padded batch, with response ids
    after them: `HfStudent.response_logprobs` (flattened valid frames through the real
    encoder, placeholders filled by `merge_audio`, 1-D positions, the prompt read once)
    equals a lone `model(input_ids, input_features, feature_attention_mask)` per item, whose
    multimodal RoPE positions the model computes itself."""
    tok = omni_tokenizer(parts[0], family, tmp_path / "tok")
    model = tiny_omni(family, tok)
    extractor = omni_feature_extractor()
    student = HfStudent(model, SpeechProcessor(tok, extractor, tmp_path), batch_size=2)
    assert student.family is family_of(model) and student.hears
    chosen = sorted(prompts, key=lambda p: sf.info(str(p.audio_path)).frames)[::3][:2]
    rng = np.random.default_rng(0)
    rollouts = []
    for i, p in enumerate(chosen):
        ids = student.prompt_ids(p, "speech")
        response = rng.integers(10, 300, size=5 + 3 * i).tolist()  # no special ids
        rollouts.append(Rollout(p.id, "speech", 0, ids, response, [], True))
    ours, mask = student.response_logprobs(rollouts)
    for row, (p, r) in enumerate(zip(chosen, rollouts, strict=True)):
        wave, _ = sf.read(str(p.audio_path), dtype="float32")
        audio_id = token_id(tok, student.family.audio_token)
        assert r.prompt_ids.count(audio_id) == student.audio_tokens(p.id) > 0
        with torch.no_grad():
            logits = model(
                **_hf_inputs(tok, family, extractor, wave, r.prompt_ids + r.response_ids)
            ).logits[0]
        # over the tokenizer's ids: the checkpoint's padded embedding rows are no tokens
        lone = torch.log_softmax(logits[len(r.prompt_ids) - 1 : -1, : student.vocab_size], -1)
        expected = lone[torch.arange(len(r.response_ids)), r.response_ids]
        n = len(r.response_ids)
        assert mask[row, :n].all() and not mask[row, n:].any()
        torch.testing.assert_close(ours[row, :n].detach(), expected, atol=2e-5, rtol=1e-5)


def test_the_qwen2_5_omni_prompt_holds_its_system_turn_and_markers(parts, tmp_path) -> None:
    tok = omni_tokenizer(parts[0], "qwen2_5_omni", tmp_path / "tok")
    ids = HfStudent(
        tiny_omni("qwen2_5_omni", tok), SpeechProcessor(tok, omni_feature_extractor(), tmp_path)
    ).speech_prompt_ids(3)
    text = tok.decode(ids)
    assert text.startswith(f"<|im_start|>system\n{QWEN2_5_OMNI.system_prompt}<|im_end|>\n")
    assert "<|audio_bos|>" + "<|AUDIO|>" * 3 + "<|audio_eos|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_qwen3_omni_counts_placeholders_per_100_frame_chunk(parts, tmp_path) -> None:
    """Qwen3-Omni's encoder downsamples each 100-frame chunk to 13 positions; the count is
    transformers' own formula, and it is what the encoder yields."""
    tok = omni_tokenizer(parts[0], "qwen3_omni", tmp_path / "tok")
    model = tiny_omni("qwen3_omni", tok)
    frames = [100, 200, 250, 37]
    assert QWEN3_OMNI.audio_tokens(model, frames) == [13, 26, 33, 5]
    feats = [AudioFeatures(torch.randn(MEL_BINS, n + 4), n) for n in frames]
    with torch.no_grad():
        assert [len(e) for e in QWEN3_OMNI.encode(model, feats)] == [13, 26, 33, 5]
    # Qwen2.5-Omni keeps Qwen2-Audio's strides: 4x down, whatever the chunking.
    assert QWEN2_5_OMNI.audio_tokens(model, [100, 37]) == [25, 9]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_omni_student_reloads_as_its_class_and_keeps_its_processor_files(
    parts, tmp_path: Path, family: str
) -> None:
    folder = save_omni_student(family, parts[0], tmp_path / family)
    model, processor = load_student(folder)
    assert family_of(model) is student_family(folder)
    assert (
        type(model).__name__ == json.loads((folder / "config.json").read_text())["architectures"][0]
    )
    assert processor.feature_extractor.feature_size == model.config.audio_config.num_mel_bins
    again = tmp_path / "again"
    again.mkdir()
    processor.save_pretrained(str(again))
    assert (again / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert (again / "preprocessor_config.json").is_file()


def test_a_folder_of_an_unsupported_class_is_refused_naming_its_config(
    parts, tmp_path: Path
) -> None:
    folder = save_omni_student("qwen2_5_omni", parts[0], tmp_path / "omni")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["Qwen2_5OmniForConditionalGeneration"]  # thinker + talker
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"omni/config\.json: Qwen2_5OmniForConditionalGeneration is not a speech student",
    ):
        load_student(folder)


class Recording:
    """A rollout engine that keeps what it sampled."""

    def __init__(self, engine: HfStudent) -> None:
        self.engine, self.sampled = engine, []

    def sample(self, prompts, modality, **kwargs):
        out = self.engine.sample(prompts, modality, **kwargs)
        self.sampled.append(out)
        return out


def _student_of(family: str, parts, tmp_path: Path):
    """The family's tiny student and processor over the mini tokenizer (Qwen2-Audio: the
    module's own), and the teacher to pair it with: the tiny Qwen2 for Qwen2-Audio and
    Qwen2.5-Omni, a tiny Qwen3-MoE for Qwen3-Omni (the paper's pair's classes)."""
    tok, teacher, student, processor = parts
    if family == "qwen2_audio":
        return copy.deepcopy(student), processor, teacher
    otok = omni_tokenizer(tok, family, tmp_path / "tok")
    model = tiny_omni(family, otok)
    if family == "qwen3_omni":
        teacher = tiny_teacher_of("qwen3_moe", tok)
    return model, SpeechProcessor(otok, omni_feature_extractor(), tmp_path), teacher


def _lone_logprobs(model, ids: list[int], n: int, vocab: int, audio=None) -> torch.Tensor:
    """log-probs of the last `n` of `ids` from one plain forward of the model, over `vocab`."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **(audio or {})).logits[0]
    lps = torch.log_softmax(logits[len(ids) - n - 1 : -1, :vocab].float(), -1)
    return lps[torch.arange(n), ids[-n:]]


@pytest.mark.parametrize("family", ["qwen2_audio", *FAMILIES])
def test_the_first_xopd_loss_is_the_sampled_token_reverse_kl_estimate(
    parts, prompts, tmp_path: Path, family: str
) -> None:
    """Two X-OPD steps (λ 0.5, `loss: sampled`) for each family against its teacher (the
    Omni students' embedding rows differ from the teacher's); step 0's loss equals
    λ·mean_text + (1−λ)·mean_speech over rollouts of mean_t (log π_s − log π_t), with both
    log-probs from lone plain forwards of the models on the processor's own inputs
    (multimodal positions from the model) and the teacher's own prompt."""
    model, processor, teacher = _student_of(family, parts, tmp_path)
    tok = processor.tokenizer
    vocab = shared_vocab_size(
        tok,
        parts[0],
        student_rows=model.get_output_embeddings().weight.shape[0],
        teacher_rows=teacher.get_output_embeddings().weight.shape[0],
    )
    if family != "qwen2_audio":  # the mini world's pair shares one embedding size
        assert model.get_output_embeddings().weight.shape[0] != teacher.config.vocab_size
    student = HfStudent(model, processor, batch_size=4, vocab_size=vocab)
    engine = Recording(student)
    cfg = TrainParams(
        steps=2,
        prompts_per_step=2,
        rollouts_per_prompt=2,
        max_new_tokens=8,
        lr=1e-3,
        loss="sampled",
        anchor_items=0,
        lmbda=0.5,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(
        student, engine, HfTeacher(teacher, parts[0], vocab), prompts[:4], cfg, vocab_size=vocab
    )
    assert result.steps == 2 and len(engine.sampled) == 4  # text, speech per step
    model.load_state_dict(before)  # the weights that sampled step 0
    means = {}
    for rollouts in engine.sampled[:2]:
        per_rollout = []
        for r in rollouts:
            p = next(q for q in prompts if q.id == r.prompt_id)
            n = len(r.response_ids)
            audio = None
            if r.modality == "speech":
                wave, _ = sf.read(str(p.audio_path), dtype="float32")
                feats = processor.feature_extractor(
                    [wave],
                    sampling_rate=16_000,
                    return_attention_mask=True,
                    padding="max_length",
                    return_tensors="pt",
                )
                audio = {
                    "input_features": feats["input_features"],
                    "feature_attention_mask": feats["attention_mask"],
                }
            s = _lone_logprobs(model, r.prompt_ids + r.response_ids, n, vocab, audio)
            t_prompt = text_prompt_ids(parts[0], p.transcript)
            t = _lone_logprobs(teacher, t_prompt + r.response_ids, n, vocab)
            per_rollout.append(float((s - t).mean()))
        means[rollouts[0].modality] = sum(per_rollout) / len(per_rollout)
    estimate = 0.5 * means["text"] + 0.5 * means["speech"]
    assert result.history[0]["loss"] == pytest.approx(estimate, abs=2e-6)


@pytest.mark.parametrize("loss", ["topk", "full"])
def test_topk_and_full_losses_run_on_a_pair_whose_embedding_sizes_differ(
    parts, prompts, tmp_path: Path, loss: str
) -> None:
    model, processor, teacher = _student_of("qwen3_omni", parts, tmp_path)
    vocab = shared_vocab_size(processor.tokenizer, parts[0])
    student = HfStudent(model, processor, batch_size=4, vocab_size=vocab)
    cfg = TrainParams(
        steps=1,
        prompts_per_step=2,
        rollouts_per_prompt=2,
        max_new_tokens=6,
        loss=loss,
        top_k=4,
        anchor_items=0,
    )
    result = train(
        student, student, HfTeacher(teacher, parts[0], vocab), prompts[:2], cfg, vocab_size=vocab
    )
    assert math.isfinite(result.history[0]["loss"]) and result.history[0]["loss"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_vllm_refuses_an_omni_student_before_starting(parts, tmp_path: Path, family) -> None:
    """vLLM 0.31 serves the Omni thinkers only through processors that need torchvision,
    which this CPU build lacks: the engine says so naming the folder, before any process
    starts (the HF engine is the tested path)."""
    folder = save_omni_student(family, parts[0], tmp_path / family)
    with pytest.raises(EngineError, match=rf"{family}/config\.json: xopd serves only Qwen2-Audio"):
        VllmEngine(folder, audio=True)


@pytest.mark.parametrize("family", ["qwen2_audio", "qwen2_5_omni"])
def test_gradient_checkpointing_gives_the_same_log_probs_and_gradients(
    parts, prompts, tmp_path: Path, family: str
) -> None:
    """`train.gradient_checkpointing`: the checkpointed layers keep no cache, so each rollout
    reads its prompt in one pass with its response; same values and gradients as the cached
    pass, and sampling (eval mode meanwhile) still decodes with its cache."""
    model, processor, _ = _student_of(family, parts, tmp_path)
    student = HfStudent(model, processor, batch_size=4)
    rollouts = student.sample(prompts[:2], "speech", n=2, temperature=1.0, max_new_tokens=6, seed=3)
    rollouts += student.sample(prompts[:2], "text", n=1, temperature=1.0, max_new_tokens=6, seed=4)
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        model.train()
        lps, mask = student.response_logprobs(rollouts)
        (lps * mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((lps.detach(), grads))
    (plain, plain_grads), (ckpt, ckpt_grads) = results
    torch.testing.assert_close(ckpt, plain, atol=1e-5, rtol=1e-5)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 10
    for name, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    assert model.training and model.is_gradient_checkpointing
    again = student.sample(prompts[:2], "speech", n=2, temperature=1.0, max_new_tokens=6, seed=3)
    assert [r.response_ids for r in again] == [r.response_ids for r in rollouts[:4]]
    assert model.training  # sampling restored the mode


def test_a_bf16_checkpointed_round_runs_through_the_train_stage(
    tiny_world, tiny_pipeline_params, tiny_teacher, tmp_path: Path
) -> None:
    """The memory settings for 7B–30B pairs (the student's forward under bf16 autocast with
    float32 weights, gradient checkpointing, a bfloat16 teacher) on the tiny Qwen3-Omni
    thinker and Qwen3-MoE teacher: the stage trains and saves a float32 checkpoint that
    reloads and differs from the start."""
    from tasks.train import train as train_stage
    from tests.tasks.test_train import params_with

    tok = load_tokenizer(tiny_teacher.checkpoint)
    start = save_omni_student("qwen3_omni", tok, tmp_path / "student")
    teacher = save_teacher(tiny_teacher_of("qwen3_moe", tok), tok, tmp_path / "teacher")
    params = params_with(
        tiny_pipeline_params,
        steps=2,
        precision="bf16",
        teacher_dtype="bfloat16",
        gradient_checkpointing=True,
    )
    summary = train_stage(params, tiny_world, start, teacher, tmp_path / "r1", tmp_path / "m.json")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["final_loss"])
    assert summary.weights_sha256 != weights_sha256(start)
    model, _ = load_student(tmp_path / "r1")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_bfloat16_weight_would_round_away_the_papers_updates() -> None:
    """Why `train.precision: bf16` keeps float32 weights: an AdamW step at lr 2e-6 moves a
    weight of typical size by ~1e-4 of itself, under bfloat16's resolution (2^-8)."""
    weight = torch.full((1000,), 0.02)
    for dtype, changed in ((torch.float32, True), (torch.bfloat16, False)):
        w = torch.nn.Parameter(weight.to(dtype))
        opt = torch.optim.AdamW([w], lr=2e-6, weight_decay=0.0)
        w.grad = torch.randn_like(w)
        before = w.detach().clone()
        opt.step()
        assert bool((w.detach() != before).any()) is changed


@pytest.mark.parametrize(
    ("family", "whole"),
    [
        ("qwen2_5_omni", "Qwen2_5OmniForConditionalGeneration"),
        ("qwen3_omni", "Qwen3OmniMoeForConditionalGeneration"),
    ],
)
@pytest.mark.parametrize("shards", [1, 2])
def test_export_thinker_makes_a_student_of_a_whole_omni_checkpoint(
    parts, tmp_path: Path, family: str, whole: str, shards: int
) -> None:
    """A whole Omni folder (config with thinker_config, `thinker.`/`talker.` tensors, one
    file or shards): `xopd export-thinker` writes the thinker alone, which loads as the
    student class with the thinker's weights; the talker stays behind."""
    thinker_dir = save_omni_student(family, parts[0], tmp_path / "thinker")
    thinker, _ = load_student(thinker_dir)
    tensors = {f"thinker.{k}": v.contiguous() for k, v in thinker.state_dict().items()}
    tensors["talker.model.embed_tokens.weight"] = torch.ones(3, 2)
    full = tmp_path / "whole"
    full.mkdir()
    names = sorted(tensors)
    groups = [names[i::shards] for i in range(shards)]
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    if shards == 1:
        files = ["model.safetensors"]
    for group, file in zip(groups, files, strict=True):
        save_file({k: tensors[k] for k in group}, str(full / file))
    if shards > 1:
        weight_map = {k: f for g, f in zip(groups, files, strict=True) for k in g}
        (full / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    thinker_config = json.loads((thinker_dir / "config.json").read_text())
    (full / "config.json").write_text(
        json.dumps(
            {"architectures": [whole], "thinker_config": thinker_config, "talker_config": {}}
        )
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copyfile(thinker_dir / name, full / name)
    with pytest.raises(CheckpointError, match="is not a speech student"):
        load_student(full)
    assert main(["export-thinker", str(full), str(tmp_path / "student")]) == 0
    model, processor = load_student(tmp_path / "student")
    assert type(model) is type(thinker)
    exported = model.state_dict()
    assert exported.keys() == thinker.state_dict().keys()
    for k, v in thinker.state_dict().items():
        assert torch.equal(exported[k], v), k
    assert processor.tokenizer.audio_token == SPECIALS[family]["audio_token"]


def test_export_thinker_refuses_a_folder_that_is_no_whole_omni_checkpoint(
    parts, tmp_path: Path, capsys
) -> None:
    folder = save_omni_student("qwen3_omni", parts[0], tmp_path / "thinker")
    assert main(["export-thinker", str(folder), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "thinker/config.json: Qwen3OmniMoeThinkerForConditionalGeneration is not a whole" in err
    assert not (tmp_path / "out").exists()


class Routes:
    """The experts each Qwen3-Omni MoE layer's router picks, token by token, in call order."""

    def __init__(self, model) -> None:
        self.picked: dict[str, list[torch.Tensor]] = {}
        self.handles = [
            m.register_forward_hook(self._hook(name))
            for name, m in model.named_modules()
            if name.endswith("mlp.gate")
        ]
        assert self.handles

    def _hook(self, name: str):
        def hook(module, args, out) -> None:
            self.picked.setdefault(name, []).append(out[2].sort(-1).values.clone())

        return hook

    def tokens(self) -> dict[str, torch.Tensor]:
        for h in self.handles:
            h.remove()
        return {k: torch.cat(v) for k, v in self.picked.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen3_omni_routes_the_same_experts_in_rollouts_and_training(
    parts, prompts, tmp_path: Path, dtype
) -> None:
    """Router behaviour (#23): with the HF engine the rollout (cached decoding) and the
    training pass (prompt once, then the response teacher-forced) send every token of a
    rollout to the same top-k experts in every MoE layer, in float32 and in bfloat16, so
    π_old and π_θ at step start differ by arithmetic alone and the sampled loss's ratio r
    (1 at step start, clipped by train.clip_eps) needs no router replay."""
    model, processor, _ = _student_of("qwen3_omni", parts, tmp_path)
    model.to(dtype)
    student = HfStudent(model, processor, batch_size=1)
    agree = total = 0
    for p in prompts[:3]:
        sampling = Routes(model)
        (rollout,) = student.sample([p], "speech", n=1, temperature=1.0, max_new_tokens=10, seed=1)
        decoded = sampling.tokens()
        training = Routes(model)
        with torch.no_grad():
            student.response_logits([rollout])
        forced = training.tokens()
        for layer, picks in decoded.items():
            assert picks.shape == forced[layer].shape  # prompt + all response tokens but the last
            agree += int((picks == forced[layer]).all(-1).sum())
            total += picks.shape[0]
    assert total > 100 and agree == total
