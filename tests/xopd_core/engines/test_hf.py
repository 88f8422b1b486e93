"""HF engines: sampling log-probs, teacher-forced log-probs, teacher scoring and its remap."""

from __future__ import annotations

import copy

import pytest
import torch

from xopd_core.engines.base import Modality, Prompt, Rollout
from xopd_core.engines.hf import HfStudent, HfTeacher
from xopd_core.engines.scoring import response_positions, shared_vocab_size
from xopd_core.models.audio import merge_audio
from xopd_core.models.prompts import text_prompt_ids
from xopd_core.models.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def student(parts) -> HfStudent:
    _, _, model, processor = parts
    return HfStudent(model.eval(), processor, batch_size=3)


@pytest.fixture(scope="module")
def teacher(parts) -> HfTeacher:
    tok, model, _, _ = parts
    return HfTeacher(model.eval(), tok, shared_vocab_size(tok, tok), batch_size=4)


@pytest.mark.parametrize(("modality", "temperature"), [("speech", 1.0), ("text", 0.7)])
def test_sampling_logprobs_equal_teacher_forced_logprobs(
    student: HfStudent, prompts: list[Prompt], modality: str, temperature: float
) -> None:
    """What the engine reports as π_old is what the trainer's forward computes as π_θ before
    any update (r = 1), across a batch of prompts of different lengths."""
    chosen = prompts[::2][:5]
    rollouts = student.sample(
        chosen, modality, n=3, temperature=temperature, max_new_tokens=12, seed=5
    )  # type: ignore[arg-type]
    assert [r.prompt_id for r in rollouts] == [p.id for p in chosen for _ in range(3)]
    assert len({len(r.prompt_ids) for r in rollouts}) > 1
    with torch.no_grad():
        lp, mask = student.response_logprobs(rollouts, temperature)
    for i, r in enumerate(rollouts):
        n = len(r.response_ids)
        assert mask[i].sum().item() == n > 0
        assert torch.allclose(lp[i, :n], torch.tensor(r.logprobs), atol=1e-4)
        assert r.finished == (r.response_ids[-1] == student.eos_id)


def test_sampling_is_reproducible_for_a_seed(student: HfStudent, prompts: list[Prompt]) -> None:
    def draw(seed: int) -> list[list[int]]:
        rs = student.sample(
            prompts[:4], "speech", n=2, temperature=1.0, max_new_tokens=8, seed=seed
        )
        return [r.response_ids for r in rs]

    torch.manual_seed(0)
    before = torch.rand(1)
    assert draw(1) == draw(1) != draw(2)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), before)  # the caller's RNG stream is untouched


def test_teacher_scores_remap_the_response_span_exactly(
    student: HfStudent, teacher: HfTeacher, prompts: list[Prompt], parts
) -> None:
    """Scored in batches of prompts of different lengths, every rollout's teacher log-probs
    equal a lone, unpadded teacher pass over transcript + response — including the first
    response token, predicted by the last prompt token."""
    tok, model, _, _ = parts
    chosen = prompts[:6]
    rollouts = student.sample(chosen, "speech", n=1, temperature=1.0, max_new_tokens=10, seed=0)
    transcripts = [p.transcript for p in chosen]
    scores = teacher.score(rollouts, transcripts, mode="full")
    topk = teacher.score(rollouts, transcripts, mode="topk", top_k=5)
    for r, s, k, text in zip(rollouts, scores, topk, transcripts, strict=True):
        prompt = text_prompt_ids(tok, text)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + r.response_ids])).logits[0]
        lone = torch.log_softmax(logits[response_positions(len(prompt), len(r.response_ids))], -1)
        expected = lone[torch.arange(len(r.response_ids)), r.response_ids]
        first = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1], -1)[
            r.response_ids[0]
        ]
        assert s.sampled[0] == pytest.approx(first.item(), abs=1e-5)
        assert torch.allclose(torch.tensor(s.sampled), expected, atol=1e-5)
        assert s.full_T_V is not None and torch.allclose(s.full_T_V, lone, atol=1e-5)
        assert k.topk_logprobs is not None and k.topk_ids is not None
        assert torch.allclose(torch.tensor(k.topk_logprobs), lone.topk(5, -1).values, atol=1e-5)
        assert k.sampled == pytest.approx(s.sampled, abs=1e-6)


def test_padded_teacher_vocabulary_is_sliced_to_the_shared_one(
    student: HfStudent, teacher: HfTeacher, prompts: list[Prompt], parts
) -> None:
    """A teacher checkpoint whose embedding table is padded (as Qwen's are) scores exactly as
    the unpadded one once sliced, even if its padded rows would win every softmax."""
    tok, model, _, _ = parts
    padded = copy.deepcopy(model)
    v = model.config.vocab_size
    padded.resize_token_embeddings(v + 37)
    with torch.no_grad():
        padded.lm_head.weight[v:] = 50.0
    rollouts = student.sample(prompts[:3], "text", n=2, temperature=1.0, max_new_tokens=6, seed=3)
    texts = [p.transcript for p in prompts[:3] for _ in range(2)]
    want = teacher.score(rollouts, texts, mode="full")
    got = HfTeacher(padded, tok, shared_vocab_size(tok, tok)).score(rollouts, texts, mode="full")
    for a, b in zip(want, got, strict=True):
        assert a.full_T_V is not None and b.full_T_V is not None
        assert b.full_T_V.shape[-1] == len(tok.get_vocab())
        assert torch.allclose(a.full_T_V, b.full_T_V, atol=1e-6)


@pytest.mark.parametrize("modality", ["speech", "text"])
def test_a_padded_student_never_samples_past_the_shared_vocabulary(
    student: HfStudent, prompts: list[Prompt], parts, modality: Modality
) -> None:
    """A student whose output head has padded rows (Qwen2-Audio's 156032 for ~151.6k
    tokens), here biased to win every softmax, samples and scores exactly as the unpadded
    one: its rollouts hold only ids below the shared vocabulary."""
    _, _, model, processor = parts
    v = len(processor.tokenizer.get_vocab())
    padded_model = copy.deepcopy(model).eval()
    head = torch.nn.Linear(model.lm_head.in_features, v + 37, bias=True)
    with torch.no_grad():
        head.weight[:v] = model.lm_head.weight
        head.weight[v:] = 0.0
        head.bias.zero_()
        head.bias[v:] = 50.0
    padded_model.lm_head = head
    padded = HfStudent(padded_model, processor, batch_size=3, vocab_size=v)

    def draw(s: HfStudent) -> list[Rollout]:
        return s.sample(prompts[:3], modality, n=3, temperature=1.0, max_new_tokens=8, seed=6)

    got, want = draw(padded), draw(student)
    assert max(t for r in got for t in r.response_ids) < v
    assert [r.response_ids for r in got] == [r.response_ids for r in want]
    for g, w in zip(got, want, strict=True):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
    with torch.no_grad():
        lp, _ = padded.response_logprobs(got)
        assert padded.response_logits(got).shape[-1] == v
    for i, r in enumerate(got):
        assert torch.allclose(lp[i, : len(r.response_ids)], torch.tensor(r.logprobs), atol=1e-4)


def test_different_tokenizers_are_refused_with_a_clear_error(parts) -> None:
    tok = parts[0]
    other = train_tokenizer(["a different corpus entirely", "with other words"])
    with pytest.raises(ValueError, match="tokenizers differ"):
        shared_vocab_size(tok, other)


def test_an_audio_token_inside_a_sampled_response_is_just_a_token(
    student: HfStudent, prompts: list[Prompt]
) -> None:
    """Only the prompt's placeholders receive audio; a response may contain <|AUDIO|> (an
    untrained student samples it) and teacher forcing must still work."""
    (r,) = student.sample(prompts[:1], "speech", n=1, temperature=1.0, max_new_tokens=4, seed=0)
    audio_id = student.model.config.audio_token_id
    odd = Rollout(
        r.prompt_id, "speech", 0, r.prompt_ids, [audio_id, *r.response_ids], [0.0] * 5, False
    )
    with torch.no_grad():
        lp, mask = student.response_logprobs([odd, r])
    assert torch.isfinite(lp[mask.bool()]).all()
    n = len(r.response_ids)
    assert torch.allclose(lp[1, :n], torch.tensor(r.logprobs), atol=1e-4)


def test_a_text_only_causal_lm_works_as_a_text_student(parts, prompts: list[Prompt]) -> None:
    """The in-modal half (and the TRL comparison benchmark) runs a plain Qwen2 LM."""
    tok, teacher, _, _ = parts
    text_student = HfStudent(teacher, tok, batch_size=4)
    rollouts = text_student.sample(
        prompts[:3], "text", n=2, temperature=1.0, max_new_tokens=6, seed=1
    )
    with torch.no_grad():
        lp, _ = text_student.response_logprobs(rollouts)
    for i, r in enumerate(rollouts):
        assert torch.allclose(lp[i, : len(r.response_ids)], torch.tensor(r.logprobs), atol=1e-4)
    with pytest.raises(ValueError, match="no audio encoder"):
        text_student.sample(prompts[:1], "speech", n=1, temperature=1.0, max_new_tokens=2, seed=0)


def test_shared_prompts_give_the_logits_and_gradients_of_separate_passes(
    student: HfStudent, prompts: list[Prompt]
) -> None:
    """Each distinct prompt is read once and its rollouts continue from its cache: the
    logits and the gradients equal one unpadded prompt + response pass per rollout, for
    speech and text rollouts mixed, prompts of different lengths, several rollouts per
    prompt and a one-token response."""
    model = student.model
    chosen = prompts[1:4]
    rollouts = student.sample(chosen, "speech", n=2, temperature=1.0, max_new_tokens=7, seed=2)
    rollouts += student.sample(chosen[:2], "text", n=3, temperature=1.0, max_new_tokens=5, seed=4)
    short = rollouts[0]
    rollouts.append(
        Rollout(
            short.prompt_id, "speech", 9, short.prompt_ids, short.response_ids[:1], [0.0], False
        )
    )
    assert len({len(r.prompt_ids) for r in rollouts}) > 2
    weights = torch.randn(len(rollouts), max(len(r.response_ids) for r in rollouts), 7)
    lm = [p for n, p in model.named_parameters() if "audio_tower" not in n]

    def grads(loss: torch.Tensor) -> list[torch.Tensor]:
        return [
            g.clone()
            for g in torch.autograd.grad(loss, lm, allow_unused=True, materialize_grads=True)
        ]

    shared = student.response_logits(rollouts)
    got = grads((shared[..., :7] * weights).sum())
    lone_total = torch.zeros(())
    for i, r in enumerate(rollouts):
        ids = torch.tensor([r.prompt_ids + r.response_ids])
        slots = torch.arange(ids.shape[1])[None] < len(r.prompt_ids)
        audio = student.audio_embeddings([r.prompt_id]) if r.modality == "speech" else []
        embeds = (
            merge_audio(model, ids, audio, slots)
            if r.modality == "speech"
            else model.get_input_embeddings()(ids)
        )
        logits = model(inputs_embeds=embeds).logits[0]
        lone = logits[response_positions(len(r.prompt_ids), len(r.response_ids))]
        n = len(r.response_ids)
        assert torch.allclose(shared[i, :n], lone, atol=1e-5), (i, r.modality)
        assert not shared[i, n:].any()  # zeros past the response's end
        lone_total = lone_total + (lone[:, :7] * weights[i, :n]).sum()
    want = grads(lone_total)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)
