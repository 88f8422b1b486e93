"""The lean sampling loop: its log-probs are the model's, padding and EOS are handled, a seed
fixes the samples, and its draws follow the policy."""

from __future__ import annotations

import copy

import pytest
import torch

from xopd_core.engines.base import Prompt
from xopd_core.engines.hf import HfStudent
from xopd_core.engines.sampler import sample_from_embeds


@pytest.fixture(scope="module")
def student(parts) -> HfStudent:
    _, _, model, processor = parts
    return HfStudent(model.eval(), processor, batch_size=4)


@pytest.fixture(scope="module")
def eos_prone(parts) -> HfStudent:
    """A text LM whose output head favours EOS (a bias on its row), so rollouts end at
    different lengths within one batch."""
    tok, teacher, _, _ = parts
    model = copy.deepcopy(teacher).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    s = HfStudent(model, tok, batch_size=4)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[s.eos_id] = 4.0
    model.lm_head = head
    return s


@pytest.mark.parametrize(("modality", "temperature"), [("speech", 1.0), ("text", 0.7)])
def test_sampled_logprobs_equal_lone_teacher_forced_logprobs(
    student: HfStudent, prompts: list[Prompt], modality: str, temperature: float
) -> None:
    """Prompts of different lengths are left-padded into one batch; every rollout's sampling
    log-probs equal a forward over that rollout alone (no padding at all), so the padding
    mask and the position ids of the padded rows are right."""
    chosen = prompts[:6]
    rollouts = student.sample(
        chosen,
        modality,  # type: ignore[arg-type]
        n=2,
        temperature=temperature,
        max_new_tokens=10,
        seed=11,
    )
    assert len({len(r.prompt_ids) for r in rollouts}) > 1
    for r in rollouts:
        with torch.no_grad():
            lone, _ = student.response_logprobs([r], temperature)
        assert len(r.logprobs) == len(r.response_ids) > 0
        assert torch.allclose(lone[0], torch.tensor(r.logprobs), atol=1e-5, rtol=0)


def test_rows_stop_at_eos_and_are_padded_after_it(
    eos_prone: HfStudent, prompts: list[Prompt]
) -> None:
    s = eos_prone
    rollouts = s.sample(prompts[:4], "text", n=4, temperature=1.0, max_new_tokens=40, seed=2)
    lengths = [len(r.response_ids) for r in rollouts]
    assert len(set(lengths)) > 1 and any(r.finished for r in rollouts)
    for r in rollouts:
        assert r.finished == (r.response_ids[-1] == s.eos_id)
        assert s.eos_id not in r.response_ids[:-1]
        assert r.finished or len(r.response_ids) == 40
        with torch.no_grad():
            lone, _ = s.response_logprobs([r])
        assert torch.allclose(lone[0], torch.tensor(r.logprobs), atol=1e-5, rtol=0)

    ids = torch.tensor([[5, 6, 7]])
    out = sample_from_embeds(
        s.model,
        s.model.get_input_embeddings()(ids),
        torch.ones_like(ids),
        n=16,
        temperature=1.0,
        max_new_tokens=40,
        eos_id=s.eos_id,
        pad_id=s.pad_id,
        generator=torch.Generator().manual_seed(0),
    )
    past_end = torch.arange(out.tokens_BG_T.shape[1])[None, :] >= out.lengths_BG[:, None]
    assert (out.tokens_BG_T[past_end] == s.pad_id).all()
    assert (out.logprobs_BG_T[past_end] == 0).all()
    assert torch.isfinite(out.logprobs_BG_T).all()
    assert out.finished_BG.all()  # with EOS this likely, every row ends well within 40
    assert out.tokens_BG_T.shape[1] == int(out.lengths_BG.max()) < 40  # and the loop stops


def test_a_seed_fixes_the_samples(student: HfStudent, prompts: list[Prompt]) -> None:
    def draw(seed: int, modality: str) -> list[tuple[list[int], list[float]]]:
        rs = student.sample(
            prompts[:5],
            modality,  # type: ignore[arg-type]
            n=3,
            temperature=1.0,
            max_new_tokens=8,
            seed=seed,
        )
        return [(r.response_ids, r.logprobs) for r in rs]

    for modality in ("speech", "text"):
        torch.manual_seed(0)
        before = torch.rand(1)
        assert draw(4, modality) == draw(4, modality) != draw(5, modality)
        torch.manual_seed(0)
        assert torch.equal(torch.rand(1), before)  # the global RNG is neither used nor moved


def test_the_loop_draws_what_generate_draws(eos_prone: HfStudent, prompts: list[Prompt]) -> None:
    """From the same RNG state, HF `generate`'s multinomial sampling and this loop pick the
    same tokens with the same log-probs, EOS and padding included: a seed gives the rollouts
    it gave before the loop replaced `generate`."""
    s = eos_prone
    seqs = [s.prompt_ids(p, "text") for p in prompts[:4]]
    longest = max(len(q) for q in seqs)
    ids = torch.full((len(seqs), longest), s.pad_id)
    mask = torch.zeros_like(ids)
    for i, q in enumerate(seqs):
        ids[i, longest - len(q) :], mask[i, longest - len(q) :] = torch.tensor(q), 1
    embeds = s.model.get_input_embeddings()(ids)
    ours = sample_from_embeds(
        s.model,
        embeds,
        mask,
        n=3,
        temperature=0.8,
        max_new_tokens=20,
        eos_id=s.eos_id,
        pad_id=s.pad_id,
        generator=torch.Generator().manual_seed(7),
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(7)
        theirs = s.model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            do_sample=True,
            temperature=0.8,
            top_k=0,
            top_p=1.0,
            num_return_sequences=3,
            max_new_tokens=20,
            pad_token_id=s.pad_id,
            eos_token_id=s.eos_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(ours.tokens_BG_T, theirs.sequences)
    logp = torch.log_softmax(torch.stack(theirs.logits, dim=1).float() / 0.8, dim=-1)
    picked = logp.gather(-1, theirs.sequences[..., None]).squeeze(-1)
    inside = ours.tokens_BG_T != s.pad_id
    assert torch.allclose(ours.logprobs_BG_T[inside], picked[inside], atol=1e-5, rtol=0)
