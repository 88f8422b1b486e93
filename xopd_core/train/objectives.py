"""What each method optimises, as one small object the trainer picks once before its loop.

Every objective answers the same four questions: which prompts it samples (text and/or speech),
what it asks of the teacher (`score_mode`), how a step's tokens are weighted (`weights`, over
the whole step so micro-batches sum to its objective) and the loss of one micro-batch
(`loss`). GRPO also turns rewards into advantages at the start of a step (`begin_step`).
Add a method: one class here, one name in `objective_for` and in `TrainParams.method`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from xopd_core.config import TrainParams
from xopd_core.engines.base import Modality, Prompt, Rollout, ScoreMode, TeacherScores
from xopd_core.losses import (
    generalized_jsd,
    grpo_advantages,
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

Reward = Callable[[Prompt, list[int]], float]


@dataclass
class StepBatch:
    """One step's rollouts and what a loss reads of them, padded to the step's longest
    response (`B` rollouts, `T` response positions), on the CPU."""

    rollouts: list[Rollout]
    scores: list[TeacherScores] | None
    tokens_B_T: torch.Tensor
    mask_B_T: torch.Tensor  # the tokens that train (a budget may cut the last step's)
    weights_B_T: torch.Tensor
    old_B_T: torch.Tensor  # the sampler's log-probs (π_old)
    teacher_B_T: torch.Tensor | None  # the teacher's log-probs of the sampled tokens
    speech_B: torch.Tensor  # True for a rollout from the speech prompt
    sampled_B_T: torch.Tensor  # every sampled response token (the budget's cut aside)
    advantages_B_T: torch.Tensor | None = None


@dataclass
class Part:
    """One micro-batch: `rows` of the step's batch, cut to their longest response, on the
    model's device. `rows` also indexes `batch.scores`."""

    batch: StepBatch
    rows: list[int]
    logits_B_T_V: torch.Tensor  # temperature-scaled, sliced to the shared vocabulary

    def cut(self, full_B_T: torch.Tensor) -> torch.Tensor:
        t = self.logits_B_T_V.shape[1]
        return full_B_T[torch.tensor(self.rows), :t].to(self.logits_B_T_V.device)

    @property
    def weights_B_T(self) -> torch.Tensor:
        return self.cut(self.batch.weights_B_T)


class Objective(Protocol):
    modalities: tuple[Modality, ...]
    score_mode: ScoreMode | None
    on_policy: bool  # trains on the student's own samples (their log-probs are π_old's)

    def weights(self, mask_B_T: torch.Tensor, speech_B: torch.Tensor) -> torch.Tensor: ...

    def begin_step(
        self, batch: StepBatch, prompt_of: Callable[[Rollout], Prompt]
    ) -> dict[str, float]: ...

    def loss(self, part: Part) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The micro-batch's share of the step's loss, and the importance ratios π_φ/π_old
        of its trained tokens where the objective has them."""
        ...


class _NoStepSetup:
    """An objective with nothing to prepare at the start of a step."""

    def begin_step(
        self, batch: StepBatch, prompt_of: Callable[[Rollout], Prompt]
    ) -> dict[str, float]:
        return {}


class _TokenMean(_NoStepSetup):
    """Token mean over the global batch."""

    def weights(self, mask_B_T: torch.Tensor, speech_B: torch.Tensor) -> torch.Tensor:
        return token_mean_weights(mask_B_T)


class CrossEntropy(_TokenMean):
    """SFT (gold solutions) and offline KD (the teacher's written responses): the engine
    supplies the fixed responses, this maximises their likelihood after the speech prompt."""

    modalities: tuple[Modality, ...] = ("speech",)
    score_mode: ScoreMode | None = None
    on_policy = False

    def loss(self, part: Part) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens_B_T = part.cut(part.batch.tokens_B_T)
        return weighted_sum(
            token_cross_entropy(part.logits_B_T_V, tokens_B_T), part.weights_B_T
        ), None


class GKD(_TokenMean):
    """On-policy generalised JSD to the teacher's full distribution (β 0: forward KL)."""

    modalities: tuple[Modality, ...] = ("speech",)
    score_mode: ScoreMode | None = "full"
    on_policy = True

    def __init__(self, beta: float) -> None:
        self.beta = beta

    def loss(self, part: Part) -> tuple[torch.Tensor, torch.Tensor | None]:
        teacher_B_T_V = teacher_distribution(part)
        terms_B_T = generalized_jsd(part.logits_B_T_V, teacher_B_T_V, self.beta)
        return weighted_sum(terms_B_T, part.weights_B_T), None


class XOPD(_NoStepSetup):
    """X-OPD (DESIGN.md §1): reverse KL to the text teacher on the student's own samples from
    the transcript (weight λ) and the speech prompt (1 − λ); each rollout's tokens averaged,
    then rollouts averaged (the paper's normalisation). `loss` sampled: the paper's
    policy-gradient estimate; full / topk: the exact reverse KL over the vocabulary / top-k."""

    def __init__(self, lmbda: float, loss: ScoreMode, top_k: int, clip_eps: float | None):
        both: list[tuple[Modality, bool]] = [("text", lmbda > 0), ("speech", lmbda < 1)]
        self.modalities = tuple(m for m, on in both if on)
        self.score_mode: ScoreMode | None = loss
        self.on_policy = True
        self.lmbda, self.top_k, self.clip_eps = lmbda, top_k, clip_eps

    def weights(self, mask_B_T: torch.Tensor, speech_B: torch.Tensor) -> torch.Tensor:
        return sequence_mean_weights(mask_B_T, speech_B.long(), (self.lmbda, 1 - self.lmbda))

    def loss(self, part: Part) -> tuple[torch.Tensor, torch.Tensor | None]:
        w_B_T = part.weights_B_T
        if self.score_mode == "full":
            terms_B_T = reverse_kl_full(part.logits_B_T_V, teacher_distribution(part))
            return weighted_sum(terms_B_T, w_B_T), None
        if self.score_mode == "topk":
            ids_B_T_K, lps_B_T_K = teacher_top_k(part, self.top_k)
            return weighted_sum(
                reverse_kl_topk(part.logits_B_T_V, ids_B_T_K, lps_B_T_K), w_B_T
            ), None
        batch = part.batch
        assert batch.teacher_B_T is not None
        lp_B_T = token_logprobs(part.logits_B_T_V, part.cut(batch.tokens_B_T))
        old_B_T = part.cut(batch.old_B_T)
        loss = xopd_loss(
            lp_B_T,
            old_B_T,
            part.cut(batch.teacher_B_T),
            part.cut(batch.mask_B_T),
            batch.speech_B[torch.tensor(part.rows)].to(lp_B_T.device),
            self.lmbda,
            self.clip_eps,
            weights_B_T=w_B_T,
        )
        return loss, _ratios(lp_B_T, old_B_T, w_B_T)


class GRPO:
    """Group-relative policy optimisation on speech prompts: a reward per rollout (the
    answer's correctness), advantages normalised within each prompt's group of rollouts."""

    modalities: tuple[Modality, ...] = ("speech",)
    score_mode: ScoreMode | None = None
    on_policy = True

    def __init__(self, reward: Reward, group: int, clip_eps: float | None) -> None:
        self.reward, self.group, self.clip_eps = reward, group, clip_eps

    def weights(self, mask_B_T: torch.Tensor, speech_B: torch.Tensor) -> torch.Tensor:
        return sequence_mean_weights(mask_B_T, torch.zeros_like(speech_B, dtype=torch.long), (1.0,))

    def begin_step(
        self, batch: StepBatch, prompt_of: Callable[[Rollout], Prompt]
    ) -> dict[str, float]:
        rewards_P_G = torch.tensor(
            [self.reward(prompt_of(r), r.response_ids) for r in batch.rollouts]
        ).view(-1, self.group)
        width = batch.tokens_B_T.shape[1]
        batch.advantages_B_T = grpo_advantages(rewards_P_G).view(-1, 1).expand(-1, width)
        return {"reward": float(rewards_P_G.float().mean())}

    def loss(self, part: Part) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch = part.batch
        assert batch.advantages_B_T is not None
        lp_B_T = token_logprobs(part.logits_B_T_V, part.cut(batch.tokens_B_T))
        old_B_T = part.cut(batch.old_B_T)
        terms_B_T = policy_gradient_terms(
            lp_B_T, old_B_T, part.cut(batch.advantages_B_T), self.clip_eps
        )
        w_B_T = part.weights_B_T
        return weighted_sum(terms_B_T, w_B_T), _ratios(lp_B_T, old_B_T, w_B_T)


def objective_for(cfg: TrainParams, reward: Reward | None = None) -> Objective:
    """`cfg.method` as its objective; GRPO needs the `reward` of a prompt's response."""
    if cfg.method in ("sft", "offline_kd"):
        return CrossEntropy()
    if cfg.method == "gkd":
        return GKD(cfg.gkd_beta)
    if cfg.method == "xopd":
        return XOPD(cfg.lmbda, cfg.loss, cfg.top_k, cfg.clip_eps)
    if reward is None:
        raise ValueError("method grpo needs a reward function")
    return GRPO(reward, cfg.rollouts_per_prompt, cfg.clip_eps)


def teacher_distribution(part: Part) -> torch.Tensor:
    """The teacher's stored full distributions of the part's rows, `[B, T, V]` (positions past
    a response: uniform, weight 0)."""
    b, t, v = part.logits_B_T_V.shape
    scores = _scores(part)
    teacher_B_T_V = torch.full((b, t, v), -math.log(v), device=part.logits_B_T_V.device)
    for i, s in enumerate(scores):
        assert s.full_T_V is not None
        teacher_B_T_V[i, : s.full_T_V.shape[0]] = s.full_T_V
    return teacher_B_T_V


def teacher_top_k(part: Part, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's stored top-k ids and log-probs of the part's rows, `[B, T, k]`."""
    b, t, _ = part.logits_B_T_V.shape
    ids_B_T_K = torch.zeros((b, t, k), dtype=torch.long)
    lps_B_T_K = torch.full((b, t, k), -math.log(k))
    for i, s in enumerate(_scores(part)):
        assert s.topk_ids is not None and s.topk_logprobs is not None
        n = len(s.topk_ids)
        ids_B_T_K[i, :n] = torch.tensor(s.topk_ids, dtype=torch.long)
        lps_B_T_K[i, :n] = torch.tensor(s.topk_logprobs)
    dev = part.logits_B_T_V.device
    return ids_B_T_K.to(dev), lps_B_T_K.to(dev)


def _scores(part: Part) -> Sequence[TeacherScores]:
    assert part.batch.scores is not None
    return [part.batch.scores[j] for j in part.rows]


def _ratios(lp_B_T: torch.Tensor, old_B_T: torch.Tensor, w_B_T: torch.Tensor) -> torch.Tensor:
    """π_φ/π_old of the trained tokens (a logged check that the step is on-policy)."""
    return torch.exp(lp_B_T - old_B_T).detach()[w_B_T != 0].cpu()
