"""Losses: hand-computed values, properties, torch.nn.functional references, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from xopd_core.losses import (
    generalized_jsd,
    grpo_advantages,
    log_normalizer,
    policy_gradient_terms,
    reverse_kl_full,
    reverse_kl_topk,
    sequence_mean_weights,
    token_cross_entropy,
    token_logprobs,
    token_mean_weights,
    weighted_sum,
    xopd_loss,
)

NAN = float("nan")


def hand_case() -> dict[str, torch.Tensor]:
    """Two rollouts × three positions; the second has two response tokens (third is padding
    holding garbage). Row 0 in-modal, row 1 cross-modal."""
    return {
        "old": torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, NAN]]),
        "teacher": torch.tensor([[-1.5, -1.0, -0.5], [-1.2, -1.0, -math.inf]]),
        "mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "cm": torch.tensor([False, True]),
    }


def test_xopd_loss_matches_the_hand_computed_objective() -> None:
    c = hand_case()
    # A_im = [-0.5, 1, 0] → L_im = 0.5/3; A_cm = [-1, 2] → L_cm = 0.5; L = ½·⅙ + ½·½ = ⅓.
    at_r1 = xopd_loss(c["old"].clone(), c["old"], c["teacher"], c["mask"], c["cm"])
    assert at_r1.item() == pytest.approx(-1 / 3, abs=1e-7)
    # λ = 1 keeps only the in-modal term; λ = 0 only the cross-modal one.
    only_im = xopd_loss(c["old"], c["old"], c["teacher"], c["mask"], c["cm"], lmbda=1.0)
    only_cm = xopd_loss(c["old"], c["old"], c["teacher"], c["mask"], c["cm"], lmbda=0.0)
    assert (only_im.item(), only_cm.item()) == pytest.approx((-1 / 6, -0.5), abs=1e-7)
    # A mix that weights a modality the batch lacks is an error, not a silently halved loss.
    with pytest.raises(ValueError, match=r"group 0 has weight 0\.5"):
        xopd_loss(c["old"], c["old"], c["teacher"], c["mask"], torch.tensor([True, True]))
    # r = 2 on row 0, position 1 (A = 1): that term becomes 2 → L_im = 1.5/3, L = 0.5.
    doubled = c["old"].clone()
    doubled[0, 1] += math.log(2)
    assert xopd_loss(doubled, c["old"], c["teacher"], c["mask"], c["cm"]).item() == (
        pytest.approx(-0.5, abs=1e-6)
    )
    # PPO clip ε = 0.2 caps that term at 1.2 → L_im = 0.7/3, L = 0.7/6 + 0.25.
    clipped = xopd_loss(doubled, c["old"], c["teacher"], c["mask"], c["cm"], clip_eps=0.2)
    assert clipped.item() == pytest.approx(-(0.7 / 6 + 0.25), abs=1e-6)


def test_identical_distributions_give_zero() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g)
    lp = torch.log_softmax(logits, -1)
    mask = torch.ones(2, 3)
    tokens = torch.randint(0, 11, (2, 3), generator=g)
    sampled = token_logprobs(logits, tokens)
    assert xopd_loss(sampled, sampled, sampled, mask, torch.tensor([0, 1])).item() == 0.0
    assert reverse_kl_full(logits, logits).abs().max().item() < 1e-6
    ids = torch.arange(11).expand(2, 3, 11)
    assert reverse_kl_topk(logits, ids, lp).abs().max().item() < 1e-6
    for beta in (0.0, 0.5, 1.0):
        assert generalized_jsd(logits, logits, beta).abs().max().item() < 1e-6


def test_reverse_kl_full_on_a_hand_computed_case() -> None:
    # Student p = (¼, ¾), teacher q = (½, ½) at every one of the 2×3 positions.
    student = torch.tensor([0.0, math.log(3)]).expand(2, 3, 2)
    teacher = torch.zeros(2, 3, 2)
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert torch.allclose(reverse_kl_full(student, teacher), torch.full((2, 3), expected))
    # Forward KL (GKD β = 0) is the other direction: Σ q log(q/p).
    forward = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert torch.allclose(generalized_jsd(student, teacher, 0.0), torch.full((2, 3), forward))


def test_sampled_token_estimator_expectation_approaches_the_exact_reverse_kl() -> None:
    """E_{y~π_θ}[log π_θ(y) − log π_φ(y)] = KL(π_θ‖π_φ); the X-OPD loss at r = 1 is that
    sample mean. 200 000 draws on a 7-token vocabulary: tolerance 4 standard errors."""
    g = torch.Generator().manual_seed(1)
    s_logits, t_logits = torch.randn(7, generator=g) * 2, torch.randn(7, generator=g) * 2
    n = 200_000
    y = torch.multinomial(torch.softmax(s_logits, -1), n, replacement=True, generator=g)
    lp_s = torch.log_softmax(s_logits, -1)[y].view(n, 1)
    lp_t = torch.log_softmax(t_logits, -1)[y].view(n, 1)
    cm = torch.ones(n, dtype=torch.bool)
    estimate = xopd_loss(lp_s, lp_s, lp_t, torch.ones(n, 1), cm, lmbda=0.0)
    exact = reverse_kl_full(s_logits.view(1, 1, 7), t_logits.view(1, 1, 7)).item()
    stderr = (lp_s - lp_t).std().item() / math.sqrt(n)
    assert exact > 0.1
    assert abs(estimate.item() - exact) < 4 * stderr


def test_expected_policy_gradient_is_minus_the_reverse_kl_gradient() -> None:
    """Σ_y π_θ(y)·∇(r·A)(y) at r = 1 is −∇KL(π_θ‖π_φ) (E[∇log π] = 0), checked exactly by
    enumerating a 6-token vocabulary at 2 positions."""
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 6, generator=g, dtype=torch.float64)
    lp = torch.log_softmax(s, -1)
    tokens = torch.arange(6).expand(2, 6)  # row b, column y: every token at position b
    lp_y = lp.gather(-1, tokens)  # [2, 6]
    lt_y = torch.log_softmax(t, -1).gather(-1, tokens)
    terms = policy_gradient_terms(lp_y, lp_y.detach(), lt_y - lp_y.detach())
    (pg_grad,) = torch.autograd.grad((terms * lp_y.exp().detach()).sum(), s)
    (kl_grad,) = torch.autograd.grad(reverse_kl_full(s[None], t[None]).sum(), s)
    assert torch.allclose(pg_grad, kl_grad, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 64, 4096])
def test_chunked_full_vocab_kl_equals_the_unchunked_formula(chunk: int) -> None:
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(3, 17, 301, generator=g) * 3).requires_grad_(True)
    t = torch.randn(3, 17, 301, generator=g) * 3
    kl = reverse_kl_full(s, t, chunk=chunk)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    naive = (ls.exp() * (ls - lt)).sum(-1)
    reference = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, naive, atol=1e-6)
    assert torch.allclose(kl, reference, atol=1e-6)
    w = torch.rand(3, 17, generator=g)
    (g_chunked,) = torch.autograd.grad((kl * w).sum(), s)
    (g_naive,) = torch.autograd.grad((naive * w).sum(), s)
    assert torch.allclose(g_chunked, g_naive, atol=1e-6)


def test_topk_kl_keeps_the_rest_bucket_and_equals_full_kl_at_k_equal_v() -> None:
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 5, 40, generator=g), torch.randn(2, 5, 40, generator=g)
    lt = torch.log_softmax(t, -1)
    top = lt.topk(40, -1)
    # At k = V the rest masses 1 − Σp are float32 rounding (~1e-6), and the rest term
    # p_rest·log(p_rest/q_rest) turns that into up to ~1e-5 (seen on an AMD EPYC; 1e-8 on
    # the Intel machines before): KLs here are 0.5-1.3, so 1e-4 still pins the formula.
    full = reverse_kl_full(s, t)
    assert torch.allclose(reverse_kl_topk(s, top.indices, top.values), full, atol=1e-4)
    # A student that puts its mass on a token outside a peaked teacher's top 3 is penalised
    # (over the top 3 renormalised it would look as good as any).
    lt = torch.log_softmax(t + 8.0 * (t >= t.topk(3, -1).values[..., -1:]), -1)
    top3 = lt.topk(3, -1)
    outside = torch.zeros_like(s).scatter(-1, lt.argmin(-1, keepdim=True), 30.0)
    inside = torch.zeros_like(s).scatter(-1, top3.indices[..., :1], 30.0)
    far = reverse_kl_topk(outside, top3.indices, top3.values)
    near = reverse_kl_topk(inside, top3.indices, top3.values)
    assert (far > near + 1.0).all()


def test_fully_masked_batch_gives_a_finite_zero_and_zero_gradient() -> None:
    lp = torch.tensor([[NAN, -math.inf], [0.0, NAN]], requires_grad=True)
    mask = torch.zeros(2, 2)
    loss = xopd_loss(lp, lp.detach(), torch.full((2, 2), -math.inf), mask, torch.tensor([0, 1]))
    loss.backward()
    assert loss.item() == 0.0
    assert lp.grad is not None and torch.equal(lp.grad, torch.zeros(2, 2))
    ce = token_cross_entropy(torch.randn(2, 2, 5), torch.full((2, 2), -100))
    assert weighted_sum(ce, token_mean_weights(mask)).item() == 0.0


def test_float32_math_under_bf16_inputs() -> None:
    g = torch.Generator().manual_seed(5)
    s = (torch.randn(2, 64, 5000, generator=g) * 4).bfloat16()
    t = (torch.randn(2, 64, 5000, generator=g) * 4).bfloat16()
    tokens = torch.randint(0, 5000, (2, 64), generator=g)
    kl, lp = reverse_kl_full(s, t), token_logprobs(s, tokens)
    assert kl.dtype == lp.dtype == torch.float32
    ls, lt = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
    assert torch.allclose(kl, (ls.exp() * (ls - lt)).sum(-1), atol=1e-5)
    assert torch.allclose(lp, ls.gather(-1, tokens[..., None])[..., 0], atol=1e-5)
    # The same formula in bf16 is off by orders of magnitude more: why we upcast.
    bf16_lp = torch.log_softmax(s, -1).gather(-1, tokens[..., None])[..., 0].float()
    assert (bf16_lp - lp).abs().max() > 100 * (
        lp - ls.gather(-1, tokens[..., None])[..., 0]
    ).abs().max()
    # The gradient comes back in the input's dtype.
    s.requires_grad_(True)
    reverse_kl_full(s, t).sum().backward()
    assert s.grad is not None and s.grad.dtype == torch.bfloat16


def test_gradients_pass_gradcheck_in_double() -> None:
    g = torch.Generator().manual_seed(6)

    def d(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    s = d(2, 3, 7).requires_grad_(True)
    t = d(2, 3, 7)
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    lt = torch.log_softmax(t, -1)
    top = lt.topk(3, -1)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]], dtype=torch.float64)
    old = token_logprobs(s, tokens).detach()
    teacher = lt.gather(-1, tokens[..., None])[..., 0]
    nudged = (old + 0.1 * d(2, 3)).requires_grad_(
        True
    )  # r ≠ 1, some inside and some outside the clip
    cm = torch.tensor([False, True])
    checks = {
        "reverse_kl_full": lambda x: reverse_kl_full(x, t, chunk=2),
        "reverse_kl_topk": lambda x: reverse_kl_topk(x, top.indices, top.values, chunk=4),
        "log_normalizer": lambda x: log_normalizer(x, chunk=5),
        "token_logprobs@T=0.7": lambda x: token_logprobs(x, tokens, temperature=0.7),
        "jsd": lambda x: generalized_jsd(x, t, 0.3),
    }
    for name, fn in checks.items():
        assert torch.autograd.gradcheck(fn, (s,)), name
    assert torch.autograd.gradcheck(
        lambda x: xopd_loss(x, old, teacher, mask, cm, lmbda=0.3, clip_eps=0.05), (nudged,)
    )


def test_generalized_jsd_matches_references_in_both_directions_and_its_midpoint() -> None:
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    forward = F.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)  # KL(teacher‖student)
    reverse = F.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(generalized_jsd(s, t, 0.0), forward, atol=1e-6)
    assert torch.allclose(generalized_jsd(s, t, 1.0), reverse, atol=1e-6)
    # β = ½ is the ordinary JSD: ½KL(P‖M) + ½KL(Q‖M), M the average, bounded by log 2.
    p, q = lt.exp(), ls.exp()
    m = (p + q) / 2
    jsd = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert torch.allclose(generalized_jsd(s, t, 0.5), jsd, atol=1e-6)
    assert (jsd <= math.log(2)).all()
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s, t, 1.5)


def test_token_cross_entropy_matches_torch() -> None:
    g = torch.Generator().manual_seed(8)
    logits, targets = torch.randn(3, 5, 13, generator=g), torch.randint(0, 13, (3, 5))
    ref = F.cross_entropy(logits.view(-1, 13), targets.view(-1), reduction="none").view(3, 5)
    assert torch.allclose(token_cross_entropy(logits, targets), ref, atol=1e-6)


def test_grpo_advantages_are_group_normalised() -> None:
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    assert torch.allclose(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5)
    assert torch.equal(adv[1], torch.zeros(4))


def test_micro_batches_with_global_weights_reproduce_the_full_batch_gradient() -> None:
    """Gradient accumulation: split 6 rollouts into micro-batches of 1, 2 and 3, weight each
    with the global batch's weights, and the summed gradient is the full batch's."""
    g = torch.Generator().manual_seed(9)
    lp = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    old = lp.detach() + 0.05 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = (torch.arange(5) < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]).double()
    cm = torch.tensor([0, 0, 1, 1, 1, 0]).bool()
    (full,) = torch.autograd.grad(xopd_loss(lp, old, teacher, mask, cm, lmbda=0.3), lp)
    w = sequence_mean_weights(mask, cm.long(), (0.3, 0.7))
    total = sum(
        xopd_loss(lp[i:j], old[i:j], teacher[i:j], mask[i:j], cm[i:j], weights_B_T=w[i:j])
        for i, j in ((0, 1), (1, 3), (3, 6))
    )
    (accumulated,) = torch.autograd.grad(total, lp)
    assert torch.allclose(full, accumulated, atol=1e-12)
