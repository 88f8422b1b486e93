"""Losses of X-OPD and its baselines: pure functions over tensors (no I/O, no config reads).

Per-token functions return float32 `[B, T]` terms (float64 stays float64, for gradcheck);
`weighted_sum` reduces them with weights the trainer computes once for the whole global batch
(`sequence_mean_weights`, `token_mean_weights`), so a batch split into micro-batches gives the
same objective and gradient as the whole batch. References: X-OPD (arXiv 2603.24596) §3 and
DESIGN.md §1; GKD (Agarwal et al., arXiv 2306.13649); GRPO (Shao et al., arXiv 2402.03300).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    # Reduce in float32 at least: bf16 log-sum-exp over a 152k vocabulary loses ~2 digits.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(_math_dtype(x))


# Rows per chunk: ~16M elements (64 MB in float32) per temporary, e.g. 110 positions at a
# 152k vocabulary; measured in benchmarks/bench_kl.py.
_CHUNK_ELEMENTS = 1 << 24


def _rows_per_chunk(chunk: int | None, vocab: int) -> int:
    return chunk if chunk is not None else max(1, _CHUNK_ELEMENTS // max(1, vocab))


def token_mean_weights(mask_B_T: torch.Tensor) -> torch.Tensor:
    """Weights that make `weighted_sum` the mean over all unmasked tokens of the batch."""
    m = mask_B_T.to(torch.float32)
    # clamp_min(1): a fully masked batch gives weights 0 (a finite 0 loss), not NaN.
    return m / m.sum().clamp_min(1)


def sequence_mean_weights(
    mask_B_T: torch.Tensor, group_B: torch.Tensor, group_weights: Sequence[float]
) -> torch.Tensor:
    """Weights for a length mean per sequence, then a mean over the sequences of each group,
    mixed across groups: Σ_g group_weights[g] · mean_{j∈g} 1/|y_j| Σ_t (·).

    `group_B` holds each sequence's group index (X-OPD: 0 in-modal, 1 cross-modal, weights
    (λ, 1−λ)). A group given a nonzero weight must have sequences (else its share of the
    objective would silently vanish); an empty sequence gets weight 0."""
    m = mask_B_T.to(torch.float32)
    lengths_B = m.sum(-1).clamp_min(1)
    per_seq_B = torch.zeros_like(lengths_B)
    for g, w in enumerate(group_weights):
        in_g = group_B == g
        if w != 0 and not bool(in_g.any()):
            raise ValueError(f"group {g} has weight {w} but no sequences in the batch")
        per_seq_B = torch.where(in_g, w / in_g.sum().clamp_min(1), per_seq_B)
    return m * (per_seq_B / lengths_B).unsqueeze(-1)


def weighted_sum(terms_B_T: torch.Tensor, weights_B_T: torch.Tensor) -> torch.Tensor:
    """Σ weights · terms; positions with weight 0 are dropped, not multiplied (padding may
    hold inf/NaN log-probs and NaN · 0 is NaN)."""
    terms = _upcast(terms_B_T)
    w = weights_B_T.to(terms.dtype)
    return torch.where(w != 0, terms * w, torch.zeros_like(terms)).sum()


class _ChunkedLogSumExp(torch.autograd.Function):
    """log Σ_v exp(x_v) over the last axis, `chunk` rows at a time, with an analytic backward
    (softmax), so no float32 copy of the whole [N, V] input is made or kept for backward."""

    @staticmethod
    def forward(ctx, x_N_V: torch.Tensor, chunk: int) -> torch.Tensor:
        out = torch.empty(x_N_V.shape[0], dtype=_math_dtype(x_N_V), device=x_N_V.device)
        for i in range(0, x_N_V.shape[0], chunk):
            out[i : i + chunk] = torch.logsumexp(_upcast(x_N_V[i : i + chunk]), dim=-1)
        ctx.save_for_backward(x_N_V, out)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_N: torch.Tensor) -> tuple[torch.Tensor, None]:
        x, lse = ctx.saved_tensors
        grad = torch.empty_like(x)
        for i in range(0, x.shape[0], ctx.chunk):
            p = torch.exp(_upcast(x[i : i + ctx.chunk]) - lse[i : i + ctx.chunk, None])
            grad[i : i + ctx.chunk] = (grad_N[i : i + ctx.chunk, None] * p).to(x.dtype)
        return grad, None


def log_normalizer(logits_B_T_V: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """log Σ_v exp(logits) per position, `[B, T]` in float32, memory-bounded by `chunk`."""
    b, t, v = logits_B_T_V.shape
    rows = _rows_per_chunk(chunk, v)
    return _ChunkedLogSumExp.apply(logits_B_T_V.reshape(b * t, v), rows).reshape(b, t)


def token_logprobs(
    logits_B_T_V: torch.Tensor, tokens_B_T: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log π(tokens) under softmax(logits / temperature), `[B, T]` float32. Logits at
    position t must already predict token t (shift before calling). Negative token ids
    (padding) read entry 0; weight those positions 0."""
    scaled = logits_B_T_V if temperature == 1.0 else logits_B_T_V / temperature
    picked = scaled.gather(-1, tokens_B_T.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return _upcast(picked) - log_normalizer(scaled)


def token_cross_entropy(logits_B_T_V: torch.Tensor, targets_B_T: torch.Tensor) -> torch.Tensor:
    """−log p(target) per position, `[B, T]`: SFT and offline KD."""
    return -token_logprobs(logits_B_T_V, targets_B_T)


def policy_gradient_terms(
    logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    advantages_B_T: torch.Tensor,
    clip_eps: float | None = None,
) -> torch.Tensor:
    """Per-token loss −r·A with r = π_θ/π_old = exp(logprobs − old_logprobs), A and π_old
    constants (detached). With `clip_eps` ε, PPO's pessimistic −min(r·A, clip(r, 1−ε, 1+ε)·A).
    At r = 1 its gradient is −A·∇log π_θ: the policy gradient."""
    r = torch.exp(_upcast(logprobs_B_T) - _upcast(old_logprobs_B_T).detach())
    adv = _upcast(advantages_B_T).detach()
    objective = r * adv
    if clip_eps is not None:
        objective = torch.minimum(objective, torch.clamp(r, 1 - clip_eps, 1 + clip_eps) * adv)
    return -objective


def xopd_advantages(
    teacher_logprobs_B_T: torch.Tensor, old_logprobs_B_T: torch.Tensor
) -> torch.Tensor:
    """A_x(y_t) = log π_φ(y_t | T, y_<t) − log π_old(y_t | x, y_<t) (paper Eq. for A_im with
    x = T, A_cm with x = S): the sampled-token log-ratio, a single-sample estimate of minus
    the per-token reverse KL(π_θ‖π_φ). Computed from the sampling policy, so a constant."""
    return (_upcast(teacher_logprobs_B_T) - _upcast(old_logprobs_B_T)).detach()


def xopd_loss(
    logprobs_B_T: torch.Tensor,
    old_logprobs_B_T: torch.Tensor,
    teacher_logprobs_B_T: torch.Tensor,
    mask_B_T: torch.Tensor,
    cross_modal_B: torch.Tensor,
    lmbda: float = 0.5,
    clip_eps: float | None = None,
    weights_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """−L, the X-OPD objective to minimise (DESIGN.md §1):

        L_x = E[ 1/m Σ_j 1/|y_j| Σ_t r_{j,t}(θ) · A_x(y_{j,t}) ],   L = λ·L_im + (1−λ)·L_cm

    Shapes: log-probs and mask `[B, T]` over the rollouts' response tokens (B = rollouts,
    im and cm together), `cross_modal_B` bool (True: sampled from the speech prompt S).
    `weights_B_T` are the global batch's `sequence_mean_weights` when this batch is one
    micro-batch of it; by default they are computed from this batch. At r = 1 the value is
    the mean sampled-token reverse-KL estimate."""
    if weights_B_T is None:
        weights_B_T = sequence_mean_weights(mask_B_T, cross_modal_B.long(), (lmbda, 1 - lmbda))
    # Zero the inputs at dropped positions first: padding may hold NaN/−inf log-probs, and a
    # NaN there would reach the gradient through exp() even where the weight is 0.
    keep = weights_B_T != 0
    lp, old, teacher = (
        torch.where(keep, x, 0.0) for x in (logprobs_B_T, old_logprobs_B_T, teacher_logprobs_B_T)
    )
    terms = policy_gradient_terms(lp, old, xopd_advantages(teacher, old), clip_eps)
    return weighted_sum(terms, weights_B_T)


class _ChunkedReverseKL(torch.autograd.Function):
    """KL(softmax(s) ‖ softmax(t)) per row, `chunk` rows at a time. Backward is analytic,
    ∂KL/∂s = p_s ⊙ (log p_s − log p_t − KL), recomputed per chunk, so neither pass holds a
    float32 [N, V] tensor. The teacher is a constant (no gradient)."""

    @staticmethod
    def forward(ctx, s_N_V: torch.Tensor, t_N_V: torch.Tensor, chunk: int) -> torch.Tensor:
        out = torch.empty(s_N_V.shape[0], dtype=_math_dtype(s_N_V), device=s_N_V.device)
        for i in range(0, s_N_V.shape[0], chunk):
            ls = torch.log_softmax(_upcast(s_N_V[i : i + chunk]), dim=-1)
            lt = torch.log_softmax(_upcast(t_N_V[i : i + chunk]).to(ls.dtype), dim=-1)
            out[i : i + chunk] = (ls.exp() * (ls - lt)).sum(-1)
        ctx.save_for_backward(s_N_V, t_N_V, out)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_N: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        s, t, kl = ctx.saved_tensors
        grad = torch.empty_like(s)
        for i in range(0, s.shape[0], ctx.chunk):
            j = slice(i, i + ctx.chunk)
            ls = torch.log_softmax(_upcast(s[j]), dim=-1)
            lt = torch.log_softmax(_upcast(t[j]).to(ls.dtype), dim=-1)
            g = ls.exp() * (ls - lt - kl[j, None]) * grad_N[j, None]
            grad[j] = g.to(s.dtype)
        return grad, None, None


def reverse_kl_full(
    student_logits_B_T_V: torch.Tensor,
    teacher_logits_B_T_V: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """Exact per-position reverse KL(π_θ‖π_φ) = Σ_v p_θ(v) (log p_θ(v) − log p_φ(v)), `[B, T]`.

    Both inputs `[B, T, V]` over the same (shared, already sliced) vocabulary, any float
    dtype; `chunk` positions at a time (default ~16M elements) are converted to float32, so
    memory beyond the inputs and the gradient is O(chunk · V). Gradient flows to the student
    only."""
    b, t, v = student_logits_B_T_V.shape
    if teacher_logits_B_T_V.shape != student_logits_B_T_V.shape:
        raise ValueError(
            f"student logits {tuple(student_logits_B_T_V.shape)} and teacher logits "
            f"{tuple(teacher_logits_B_T_V.shape)} differ; slice both to the shared vocabulary"
        )
    kl = _ChunkedReverseKL.apply(
        student_logits_B_T_V.reshape(b * t, v),
        teacher_logits_B_T_V.detach().reshape(b * t, v),
        _rows_per_chunk(chunk, v),
    )
    return kl.reshape(b, t)


def reverse_kl_topk(
    student_logits_B_T_V: torch.Tensor,
    teacher_topk_ids_B_T_K: torch.Tensor,
    teacher_topk_logprobs_B_T_K: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """Reverse KL over the teacher's top-k tokens plus one bucket for all other tokens,
    `[B, T]`: Σ_{c ∈ K ∪ {rest}} p_θ(c) (log p_θ(c) − log p_φ(c)).

    This is what a vLLM teacher can return (`prompt_logprobs=k`: full-vocabulary log-probs
    of its k most likely tokens). The rest bucket keeps the mode-seeking penalty on student
    mass outside the teacher's top k (renormalising over K alone would drop it); with k = V it
    equals `reverse_kl_full`."""
    ls_k = _upcast(student_logits_B_T_V.gather(-1, teacher_topk_ids_B_T_K)) - log_normalizer(
        student_logits_B_T_V, chunk
    ).unsqueeze(-1)
    lt_k = _upcast(teacher_topk_logprobs_B_T_K).detach().to(ls_k.dtype)
    tiny = torch.finfo(ls_k.dtype).tiny
    ps_rest = (1 - ls_k.exp().sum(-1)).clamp_min(tiny)
    pt_rest = (1 - lt_k.exp().sum(-1)).clamp_min(tiny)
    in_k = (ls_k.exp() * (ls_k - lt_k)).sum(-1)
    return in_k + ps_rest * (ps_rest.log() - pt_rest.log())


def generalized_jsd(
    student_logits_B_T_V: torch.Tensor, teacher_logits_B_T_V: torch.Tensor, beta: float
) -> torch.Tensor:
    """GKD's generalised Jensen-Shannon divergence per position, `[B, T]` (GKD Eq. 4 with
    P = teacher, Q = student, M = β·P + (1−β)·Q):

        JSD(β) = β·KL(P‖M) + (1−β)·KL(Q‖M),

    whose limits are taken at the ends: β = 0 is forward KL(P‖Q), β = 1 reverse KL(Q‖P).
    Unchunked float32 (the baselines run on small vocabularies)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    lq = torch.log_softmax(_upcast(student_logits_B_T_V), dim=-1)
    lp = torch.log_softmax(_upcast(teacher_logits_B_T_V).detach().to(lq.dtype), dim=-1)
    if beta == 0.0:
        return (lp.exp() * (lp - lq)).sum(-1)
    if beta == 1.0:
        return (lq.exp() * (lq - lp)).sum(-1)
    b = torch.tensor(beta, dtype=lq.dtype)
    lm = torch.logsumexp(torch.stack([lp + b.log(), lq + (1 - b).log()]), dim=0)
    return beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)


def grpo_advantages(rewards_B_G: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised outcome advantages (GRPO): (R − mean_g R) / (std_g R + ε) over the G
    rollouts of each prompt, population std; a group whose rewards are all equal gets 0."""
    r = rewards_B_G.to(torch.float32)
    mean = r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True, correction=0)
    return (r - mean) / (std + eps)
