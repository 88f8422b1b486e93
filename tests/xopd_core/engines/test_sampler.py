"""The lean sampling loop: its log-probs are the model's, padding and EOS are handled, a seed
fixes the samples, and its draws follow the policy."""

from __future__ import annotations

import copy

import pytest
import torch

from xopd_core.engines import sampler
from xopd_core.engines.base import Prompt
from xopd_core.engines.hf import HfStudent
from xopd_core.engines.sampler import draw, sample_from_embeds


@pytest.fixture(scope="module")
def student(parts) -> HfStudent:
    _, _, model, processor = parts
    return HfStudent(model.eval(), processor, batch_size=4)


def eos_biased(parts, bias: float) -> HfStudent:
    """The tiny teacher with a bias of `bias` on its output head's EOS row."""
    tok, teacher, _, _ = parts
    model = copy.deepcopy(teacher).eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    s = HfStudent(model, tok, batch_size=4)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[s.eos_id] = bias
    model.lm_head = head
    return s


@pytest.fixture(scope="module")
def eos_prone(parts) -> HfStudent:
    """A text LM whose output head favours EOS, so rollouts end at different lengths within
    one batch."""
    return eos_biased(parts, 4.0)


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
        temperature=0.5,  # sharpens the EOS bias: p(EOS) ≈ 0.8 per token instead of ≈ 0.09
        max_new_tokens=40,
        eos_id=s.eos_id,
        pad_id=s.pad_id,
        generator=torch.Generator().manual_seed(0),
    )
    assert len(set(out.lengths_BG.tolist())) > 1
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


def test_draw_follows_the_probabilities() -> None:
    """Inverse-CDF draws: frequencies match each row's (unnormalised) probabilities, an index
    of probability 0 is never drawn, and a generator state fixes the draws."""
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, 3.0]])
    rows = probs.repeat(20_000, 1)

    def uniforms(seed: int) -> torch.Tensor:
        return torch.rand(
            len(rows), generator=torch.Generator().manual_seed(seed), dtype=torch.float64
        )

    picked = draw(rows, uniforms(3)).view(20_000, 3)
    for r in range(3):
        freq = torch.bincount(picked[:, r], minlength=4).float() / 20_000
        expected = probs[r] / probs[r].sum()
        assert torch.allclose(freq, expected, atol=0.01), (r, freq, expected)
        assert (freq[expected == 0] == 0).all()
    again = draw(rows, uniforms(3)).view(20_000, 3)
    assert torch.equal(picked, again)
    assert not torch.equal(picked, draw(rows, uniforms(4)).view(20_000, 3))


def test_the_loop_samples_from_the_policy(eos_prone: HfStudent) -> None:
    """The first sampled token, over many rows of one prompt, is distributed as
    softmax(logits / temperature) of a plain forward."""
    s = eos_prone
    ids = torch.tensor([[5, 6, 7, 8]])
    temperature = 0.3  # a peaked policy, so a few tokens carry the mass being compared
    out = sample_from_embeds(
        s.model,
        s.model.get_input_embeddings()(ids),
        torch.ones_like(ids),
        n=4000,
        temperature=temperature,
        max_new_tokens=1,
        eos_id=s.eos_id,
        pad_id=s.pad_id,
        generator=torch.Generator().manual_seed(5),
    )
    with torch.no_grad():
        policy = torch.softmax(s.model(ids).logits[0, -1].float() / temperature, dim=-1)
    freq = torch.bincount(out.tokens_BG_T[:, 0], minlength=policy.numel()).float() / 4000
    top = policy.topk(3).indices
    assert policy[top].sum() > 0.5
    assert torch.allclose(freq[top], policy[top], atol=0.03), (freq[top], policy[top])
    assert torch.allclose(out.logprobs_BG_T[:, 0], policy.log()[out.tokens_BG_T[:, 0]], atol=1e-5)


@pytest.mark.parametrize("greedy", [False, True])
def test_rows_leaving_the_batch_change_no_sample(
    parts, monkeypatch: pytest.MonkeyPatch, greedy: bool
) -> None:
    """Ended rows leave the batch (cache and per-row state shrink); every row's tokens and
    log-probs are those of a batch that keeps all its rows to the end, whether rows leave
    at every EOS, at the default share, or never."""
    # Biases under which rows of these prompts end after 1 to 30 tokens.
    s = eos_biased(parts, 1.0 if greedy else 4.0)
    ids = torch.randint(5, 60, (8, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[5, :1] = 0  # left padding
    embeds = s.model.get_input_embeddings()(ids).detach()

    def run(share: float) -> sampler.Samples:
        monkeypatch.setattr(sampler, "LEAVE_SHARE", share)
        common = {"max_new_tokens": 30, "eos_id": s.eos_id, "pad_id": s.pad_id}
        if greedy:
            return sampler.greedy_from_embeds(s.model, embeds, mask, **common)
        generator = torch.Generator().manual_seed(8)
        return sampler.sample_from_embeds(
            s.model, embeds, mask, n=3, temperature=0.8, generator=generator, **common
        )

    kept = run(2.0)  # never: a share above 1 is never reached
    assert len(set(kept.lengths_BG.tolist())) > 3  # rows end at different steps
    for share in (1e-9, sampler.LEAVE_SHARE):
        left = run(share)
        assert torch.equal(left.tokens_BG_T, kept.tokens_BG_T), share
        assert torch.equal(left.lengths_BG, kept.lengths_BG)
        assert torch.equal(left.finished_BG, kept.finished_BG)
        torch.testing.assert_close(left.logprobs_BG_T, kept.logprobs_BG_T, rtol=0, atol=1e-5)
