"""The distillation trainer: one loop — rollout, score, loss, step, log, checkpoint.

X-OPD (DESIGN.md §1) trains the student's language model on its own samples from the speech
prompt S (cross-modal) and the transcript T (in-modal), scored by the text teacher reading T.
The baselines (SFT, offline KD, GKD, GRPO) run through the same loop, data and accounting
(student tokens trained, teacher tokens scored or written). Deterministic on CPU for a fixed
seed and thread count; a run resumed from its checkpoint ends bit-identical to an
uninterrupted one, or with `anchor_items` within float rounding (3e-8 measured: the frozen
encoder's cached states depend on which utterances shared their encoder call). Not a
framework Trainer subclass, on purpose (STYLE.md).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from xopd_core.atomic import atomic_directory
from xopd_core.config import TrainParams
from xopd_core.distributed import (
    ReplicatedUpdate,
    ShardedUpdate,
    all_gather_rows,
    mean_over_ranks,
    run_ranks,
)
from xopd_core.engines.base import (
    Modality,
    Prompt,
    Rollout,
    RolloutEngine,
    TeacherScorer,
    TeacherScores,
    WeightSync,
)
from xopd_core.engines.hf import HfStudent
from xopd_core.engines.scoring import response_tokens
from xopd_core.errors import ResumeStateError, require_finite
from xopd_core.losses import token_cross_entropy, token_logprobs, weighted_sum
from xopd_core.models.families import family_of
from xopd_core.train.objectives import (
    Objective,
    Part,
    Reward,
    StepBatch,
    objective_for,
)

logger = logging.getLogger(__name__)
STATE_WEIGHTS = "trainable.safetensors"
STATE_OPTIMIZER = "optimizer.safetensors"
STATE_META = "trainer.json"


class Interrupted(Exception):
    """Raised by an `on_step` callback to stop after a step (tests; a user's Ctrl-C is a
    KeyboardInterrupt and behaves the same: the last checkpoint is the resume point)."""


@dataclass
class TrainResult:
    steps: int  # steps completed, restored ones included (fewer than cfg.steps on a budget)
    student_tokens: int
    teacher_tokens: int
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0


def prompts_for_step(n_prompts: int, per_step: int, seed: int, step: int) -> list[int]:
    """Prompt indices of `step`: consecutive slices of per-epoch shuffles, a pure function of
    (seed, step) so a resumed run sees the same prompts."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n_prompts)
        order = list(range(n_prompts))
        random.Random(seed * 7919 + epoch).shuffle(order)
        out.append(order[pos])
    return out


def within_budget(mask_B_T: torch.Tensor, remaining: int) -> torch.Tensor:
    """The step's response-token mask cut to its first `remaining` tokens (row-major: earlier
    rollouts first, each response's prefix), so a token budget is met exactly."""
    if remaining >= int(mask_B_T.sum().item()):
        return mask_B_T
    kept_B_T = (mask_B_T.flatten().cumsum(0) <= remaining).view_as(mask_B_T)
    return mask_B_T * kept_B_T


def set_trainable(model: Any, *, audio_encoder: bool, projector: bool) -> list[torch.nn.Parameter]:
    """Freeze or unfreeze the audio parts (a text-only model has none); the language model
    always trains. The Omni thinkers' projection is the encoder's last layers, so there
    `projector` must equal `audio_encoder`. Their vision tower never trains. Returns the
    trainable parameters in a fixed order."""
    for p in model.parameters():
        p.requires_grad_(True)
    family = family_of(model)
    if family is not None:
        projector_module = family.audio_projector(model)
        if projector_module is None and projector != audio_encoder:
            raise ValueError(
                f"{family.architecture} projects audio inside its encoder: train.projector "
                f"({projector}) must equal train.audio_encoder ({audio_encoder})"
            )
        parts = [(family.audio_tower(model), audio_encoder), (projector_module, projector)]
        parts.append((getattr(model, "visual", None), False))
        for module, on in parts:
            for p in module.parameters() if module is not None else ():
                p.requires_grad_(on)
    return [p for p in model.parameters() if p.requires_grad]


def _padded(rows: Sequence[Sequence[float]], width: int, fill: float) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(list(r), dtype=torch.float32)
    return out


# -- resumable state ---------------------------------------------------------------------
def _config_fingerprint(cfg: TrainParams) -> dict[str, Any]:
    # How long a run lasts is not what a step does: a run may be extended on resume.
    return cfg.model_dump(mode="json", exclude={"checkpoint_every", "steps", "student_tokens"})


def save_state(
    state_dir: Path,
    model: Any,
    opt_state: dict[str, Any],
    cfg: TrainParams,
    step: int,
    counters: dict[str, int],
    history: list[dict[str, float]],
    start_weights_sha256: str | None = None,
) -> None:
    """Everything a resumed run needs, swapped in whole (a crash mid-write keeps the last
    good state): trainable weights, Adam moments, step, counters, metric history, and the
    hash of the checkpoint the run started from (a state only resumes that run).
    `opt_state`: the optimizer's `state_dict()` as one process would hold it."""
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tensors = {f"{i}.{k}": v.clone() for i, s in opt_state["state"].items() for k, v in s.items()}
    meta = {
        "step": step,
        "counters": counters,
        "history": history,
        "param_groups": opt_state["param_groups"],
        "config": _config_fingerprint(cfg),
        "from_weights_sha256": start_weights_sha256,
    }
    with atomic_directory(state_dir) as staging:
        save_file(trainable, str(staging / STATE_WEIGHTS))
        save_file(tensors, str(staging / STATE_OPTIMIZER))
        (staging / STATE_META).write_text(json.dumps(meta, indent=1))


def load_state(
    state_dir: Path,
    model: Any,
    opt: torch.optim.Optimizer,
    cfg: TrainParams,
    start_weights_sha256: str | None = None,
) -> tuple[int, dict[str, int], list[dict[str, float]]]:
    try:
        meta = json.loads((state_dir / STATE_META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ResumeStateError(
            f"{state_dir / STATE_META}: unreadable resume state ({err})"
        ) from None
    saved_from = meta.get("from_weights_sha256")
    if start_weights_sha256 is not None and saved_from != start_weights_sha256:
        raise ResumeStateError(
            f"{state_dir}: this resume state continues a run that started from weights "
            f"{str(saved_from)[:12]}, not from this run's starting checkpoint "
            f"({start_weights_sha256[:12]}); delete the folder to start this run fresh"
        )
    if meta["config"] != _config_fingerprint(cfg):
        raise ResumeStateError(
            f"{state_dir}: this training state was written with different train params; "
            "delete it to start over or restore the params it was written with"
        )
    weights = load_file(str(state_dir / STATE_WEIGHTS))
    params = dict(model.named_parameters())
    if set(weights) != {n for n, p in params.items() if p.requires_grad}:
        raise ResumeStateError(f"{state_dir}: saved trainable parameters do not match the model's")
    with torch.no_grad():
        for name, t in weights.items():
            params[name].copy_(t)
    flat = load_file(str(state_dir / STATE_OPTIMIZER))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = t
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return int(meta["step"]), dict(meta["counters"]), list(meta["history"])


# -- the anchor (opt-in) -------------------------------------------------------------------
@dataclass(frozen=True)
class AnchorItem:
    """A speech item only the audio can answer and its gold response: a paralinguistic
    question (`instruction` None: the default speech instruction) or a transcription."""

    prompt: Prompt
    instruction: str | None
    response_ids: list[int]


def anchor_loss(student: HfStudent, items: Sequence[AnchorItem], vocab_size: int) -> torch.Tensor:
    """Token-mean cross-entropy of the items' gold responses after their speech prompts.
    Teacher-scored objectives never ask what only audio carries, so rounds erode it
    (docs/rounds.md); `train.anchor_items` trains on it beside the objective."""
    student.load_audio([a.prompt for a in items])
    rollouts = [
        Rollout(
            a.prompt.id,
            "speech",
            0,
            student.speech_prompt_ids(student.audio_tokens(a.prompt.id), a.instruction),
            a.response_ids,
            [],
            True,
        )
        for a in items
    ]
    tokens_B_T, mask_B_T = response_tokens(rollouts)
    logits_B_T_V = student.response_logits(rollouts)[..., :vocab_size]
    weights_B_T = mask_B_T.float() / mask_B_T.sum().clamp_min(1)
    return weighted_sum(token_cross_entropy(logits_B_T_V, tokens_B_T), weights_B_T)


# -- the loop ----------------------------------------------------------------------------
def train(
    student: HfStudent,
    engine: RolloutEngine,
    scorer: TeacherScorer | None,
    prompts: Sequence[Prompt],
    cfg: TrainParams,
    *,
    vocab_size: int,
    state_dir: Path | None = None,
    reward: Reward | None = None,
    teacher_tokens_spent: int = 0,
    log: Callable[[int, dict[str, float]], None] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    start_weights_sha256: str | None = None,
    anchors: Sequence[AnchorItem] = (),
) -> TrainResult:
    """Run `cfg.steps` steps of `cfg.method` on `student` (in place), or fewer when the
    `cfg.student_tokens` budget is met first (exactly: see `within_budget`), resuming from
    `state_dir` when it holds a state. `vocab_size`: the shared student/teacher vocabulary
    (`engines.scoring.shared_vocab_size`); `reward(prompt, response_ids)` for GRPO;
    `teacher_tokens_spent`: teacher tokens used before the loop (offline KD's written
    responses), counted in the teacher's budget. `log(step, metrics)` is called for every step,
    including (replayed first) the steps a resumed run restored. `start_weights_sha256`: the
    hash of the checkpoint `student` was loaded from, bound into the resume state: a state
    written from other weights is refused (ResumeStateError), never applied.
    `anchors`: the items `cfg.anchor_items` draws from each step (`anchor_loss`).
    A non-finite teacher score, loss or gradient norm stops the run before the update
    (NonFiniteTrainingError naming the step and the source)."""
    if not prompts:
        raise ValueError("training needs at least one prompt")
    objective = objective_for(cfg, reward)
    if objective.score_mode is not None and scorer is None:
        raise ValueError(f"method {cfg.method} needs a teacher scorer")
    if cfg.anchor_items and not anchors:
        raise ValueError("train.anchor_items > 0 needs anchor items (paralinguistic or speech)")
    model = student.model
    params = set_trainable(
        model, audio_encoder=cfg.train_audio_encoder, projector=cfg.train_projector
    )
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    device_type = model.get_input_embeddings().weight.device.type

    def autocast() -> torch.autocast:
        """The student's training forward in `cfg.precision` (the weights stay float32)."""
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")

    start, history = 0, list[dict[str, float]]()
    counters = {"student_tokens": 0, "teacher_tokens": teacher_tokens_spent}
    if state_dir is not None and (state_dir / STATE_META).is_file():
        start, counters, history = load_state(state_dir, model, opt, cfg, start_weights_sha256)
        if log is not None:  # the log sees every step once, restored ones replayed
            for step, metrics in enumerate(history):
                log(step, metrics)
    student.clear_audio_cache()
    by_id = {p.id: p for p in prompts}
    budget = cfg.student_tokens
    sync = engine if cfg.sync_every > 0 and isinstance(engine, WeightSync) else None
    if sync is not None and start > 0:  # the engine started from the round's weights
        sync.sync_weights(model)

    # fsdp: the update on a sharded copy, which `model` (sampling) is published to
    sharded = cfg.parallel == "fsdp" and cfg.processes > 1
    update = ShardedUpdate(model) if sharded else ReplicatedUpdate(model, params)

    def loop(rank: int, ranks: int) -> int:
        """Steps from `start`, this rank on its share of each step's prompts; rank 0 logs
        and checkpoints. Returns the steps done."""
        done = start
        optimizer = update.start(
            opt, lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay)
        )
        trainer = student if update.model is model else student.with_model(update.model)
        model.train()
        bar = tqdm(
            range(start, cfg.steps),
            initial=start,
            total=cfg.steps,
            desc=cfg.method,
            disable=None if rank == 0 else True,
        )
        try:
            for step in bar:
                if budget is not None and counters["student_tokens"] >= budget:
                    break
                t0 = time.perf_counter()
                lr = (
                    cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
                )
                for param_group in optimizer.param_groups:
                    param_group["lr"] = lr
                order = prompts_for_step(len(prompts), cfg.prompts_per_step, cfg.seed, step)
                prompts_now = [prompts[i] for i in order[rank::ranks]]
                if "speech" in objective.modalities:  # the student's forward reads the audio
                    student.load_audio(prompts_now)

                # 1. sample: m responses per prompt, from the transcript T and/or the speech S
                model.eval()
                rollouts: list[Rollout] = []
                for modality in objective.modalities:
                    seed = cfg.seed * 100_003 + step * 2 + (modality == "speech")
                    rollouts += engine.sample(
                        prompts_now,
                        modality,
                        n=cfg.rollouts_per_prompt,
                        temperature=cfg.temperature,
                        max_new_tokens=cfg.max_new_tokens,
                        seed=seed * ranks + rank,
                    )
                model.train()

                # 2. score: the teacher reads the transcript and scores the same tokens
                scores = None
                if objective.score_mode is not None and scorer is not None:
                    transcripts = [by_id[r.prompt_id].transcript for r in rollouts]
                    scores = scorer.score(
                        rollouts, transcripts, mode=objective.score_mode, top_k=cfg.top_k
                    )
                    _require_finite_scores(scores, step)

                # 3. loss: weights over the whole step, so the micro-batches (and the ranks)
                # sum to its objective
                share = StepShare.of(rollouts, cfg, objective.modalities, rank, ranks)
                batch, trained = step_batch(
                    rollouts, scores, objective, budget, counters["student_tokens"], share
                )
                extra = objective.begin_step(batch, lambda r: by_id[r.prompt_id])
                optimizer.zero_grad(set_to_none=True)
                loss_total, ratios, gaps = 0.0, [], []
                for rows in micro_batches(rollouts, cfg.micro_batch_size):
                    with autocast():
                        logits_B_T_V = trainer.response_logits([rollouts[j] for j in rows])
                    logits_B_T_V = logits_B_T_V[..., :vocab_size]
                    if cfg.temperature != 1.0:
                        logits_B_T_V = logits_B_T_V / cfg.temperature
                    part = Part(batch, rows, logits_B_T_V)
                    loss, ratio = objective.loss(part)
                    loss.backward()
                    loss_total += loss.item()
                    if ratio is not None:
                        ratios.append(ratio)
                    if objective.on_policy:
                        gaps.append(policy_gap(part))
                if ranks > 1:
                    extra = mean_over_ranks(extra)
                share_of_anchor = update.share_of_extra_loss(rank, ranks)
                if cfg.anchor_items and share_of_anchor > 0:
                    drawn = prompts_for_step(len(anchors), cfg.anchor_items, cfg.seed + 1, step)
                    with autocast():
                        anchor = anchor_loss(trainer, [anchors[i] for i in drawn], vocab_size)
                    (cfg.anchor_weight * share_of_anchor * anchor).backward()
                    extra["anchor_loss"] = anchor.item()
                    loss_total += cfg.anchor_weight * share_of_anchor * extra["anchor_loss"]
                loss_total = update.reduce(loss_total)

                # 4. step: clip, update
                require_finite(loss_total, step, "loss")
                grad_norm = update.clip_grad_norm_(cfg.max_grad_norm)
                require_finite(grad_norm, step, "gradient norm")
                optimizer.step()
                update.publish()
                counters["student_tokens"] += trained
                if scores is not None:
                    counters["teacher_tokens"] += sum(share.lengths)
                if sync is not None and (step + 1) % cfg.sync_every == 0:
                    sync.sync_weights(model)  # the engine samples the next step on-policy

                # 5. log
                metrics = step_metrics(
                    batch, loss_total, lr, grad_norm, counters, ratios, gaps, ranks
                )
                if metrics.get("logprob_gap_mean", 0.0) > cfg.mismatch_warn and rank == 0:
                    logger.warning(
                        "step %d: the rollouts' log-probs differ from the trainer's by %.3g "
                        "on average (train.mismatch_warn %.3g): the engine is not serving the "
                        "trainer's weights",
                        step,
                        metrics["logprob_gap_mean"],
                        cfg.mismatch_warn,
                    )
                metrics |= extra | {"seconds": time.perf_counter() - t0}
                history.append(metrics)
                done = step + 1
                last = done == cfg.steps or (
                    budget is not None and counters["student_tokens"] >= budget
                )
                checkpoint = state_dir is not None and (done % cfg.checkpoint_every == 0 or last)
                # sharded moments are gathered by every rank
                opt_state = update.full_optimizer_state(optimizer) if checkpoint else {}
                if rank != 0:
                    continue
                bar.set_postfix(loss=f"{loss_total:.3f}", kl=f"{metrics.get('reverse_kl', 0):.3f}")
                if log is not None:
                    log(step, metrics)

                # 6. checkpoint
                if checkpoint:
                    assert state_dir is not None
                    save_state(
                        state_dir,
                        model,
                        opt_state,
                        cfg,
                        done,
                        counters,
                        history,
                        start_weights_sha256,
                    )
                if on_step is not None:
                    on_step(step, metrics)
        finally:
            model.eval()
            update.model.eval()
            bar.close()
        return done

    done = run_ranks(loop, cfg.processes, device_type)
    return TrainResult(
        steps=done,
        student_tokens=counters["student_tokens"],
        teacher_tokens=counters["teacher_tokens"],
        history=history,
        resumed_from=start,
    )


@dataclass(frozen=True)
class StepShare:
    """Where a rank's rollouts sit in the whole step: `rows`, their rows in one process's
    order (modality, then prompt, then sample); `lengths`, every rollout's response length
    in that order; `modalities`, what the step samples, in order."""

    rows: list[int]
    lengths: list[int]
    modalities: tuple[Modality, ...]

    @classmethod
    def of(
        cls,
        rollouts: Sequence[Rollout],
        cfg: TrainParams,
        modalities: tuple[Modality, ...],
        rank: int,
        ranks: int,
    ) -> StepShare:
        n, per_modality = cfg.rollouts_per_prompt, cfg.prompts_per_step
        mine = range(rank, per_modality, ranks)  # rank r has prompts r, r + ranks, ...
        rows = [
            (m * per_modality + g) * n + i
            for m in range(len(modalities))
            for g in mine
            for i in range(n)
        ]
        lengths = [len(r.response_ids) for r in rollouts]
        if ranks == 1:
            return cls(rows, lengths, modalities)
        everyone = [0] * (len(modalities) * per_modality * n)
        for their_rows, their_lengths in all_gather_rows([rows, lengths]):
            for row, length in zip(their_rows, their_lengths, strict=True):
                everyone[row] = length
        return cls(rows, everyone, modalities)


def step_batch(
    rollouts: list[Rollout],
    scores: list[TeacherScores] | None,
    objective: Objective,
    budget: int | None,
    tokens_trained: int,
    share: StepShare,
) -> tuple[StepBatch, int]:
    """The rank's rollouts as padded tensors with the objective's weights over the whole
    step (`share`), and how many of the step's tokens train; under a token budget the last
    step trains on what is left of it."""
    tokens_B_T, mask_long_B_T = response_tokens(rollouts)
    width = tokens_B_T.shape[1]
    lengths_S = torch.tensor(share.lengths)
    step_mask_S_T = (torch.arange(int(lengths_S.max())) < lengths_S[:, None]).float()
    if budget is not None:
        step_mask_S_T = within_budget(step_mask_S_T, budget - tokens_trained)
    per_modality = len(share.lengths) // len(share.modalities)
    step_speech_S = torch.tensor(
        [share.modalities[row // per_modality] == "speech" for row in range(len(share.lengths))]
    )
    speech_B = torch.tensor([r.modality == "speech" for r in rollouts])
    if not bool((step_speech_S[share.rows] == speech_B).all()):
        raise RuntimeError("the engine's rollouts are not in step order (modality, prompt)")
    step_weights_S_T = objective.weights(step_mask_S_T, step_speech_S)
    rows = torch.tensor(share.rows)
    return StepBatch(
        rollouts=rollouts,
        scores=scores,
        tokens_B_T=tokens_B_T,
        mask_B_T=step_mask_S_T[rows, :width],
        weights_B_T=step_weights_S_T[rows, :width],
        old_B_T=_padded([r.logprobs for r in rollouts], width, 0.0),
        teacher_B_T=_padded([s.sampled for s in scores], width, 0.0)
        if scores is not None
        else None,
        speech_B=speech_B,
        sampled_B_T=mask_long_B_T.float(),
    ), int(step_mask_S_T.sum().item())


def micro_batches(rollouts: Sequence[Rollout], size: int) -> list[list[int]]:
    """Row indices of the step's micro-batches. A micro-batch holds a prompt's rollouts together
    (the forward reads each prompt once for all of them) and prompts of similar length (a part
    pads its prompts to the longest, its responses to the longest). The weights are global,
    so the grouping does not change the objective."""
    order = sorted(
        range(len(rollouts)),
        key=lambda j: (len(rollouts[j].prompt_ids), rollouts[j].modality, rollouts[j].prompt_id, j),
    )
    return [order[i : i + size] for i in range(0, len(order), size)]


def step_metrics(
    batch: StepBatch,
    loss: float,
    lr: float,
    grad_norm: float,
    counters: dict[str, int],
    ratios: list[torch.Tensor],
    gaps: Sequence[torch.Tensor] = (),
    ranks: int = 1,
) -> dict[str, float]:
    """What a step logs: loss, optimiser state, lengths, budgets, the sampled-token reverse-KL
    estimate log π_old − log π_teacher per modality, the importance ratios and the gap
    between the engine's and the trainer's log-probs (`policy_gap`); over every rank's
    rollouts (each rank's sums are added up)."""
    rollouts, mask_B_T = batch.rollouts, batch.mask_B_T
    sums: list[float | torch.Tensor] = [
        batch.sampled_B_T.sum(),
        sum(r.finished for r in rollouts),
        len(rollouts),
    ]
    groups = [
        ("reverse_kl", torch.ones_like(batch.speech_B)),
        ("reverse_kl_text", ~batch.speech_B),
        ("reverse_kl_speech", batch.speech_B),
    ]
    if batch.teacher_B_T is not None:
        est_B_T = (batch.old_B_T - batch.teacher_B_T) * mask_B_T
        sums += [
            x
            for _, sel_B in groups
            for x in (est_B_T[sel_B].sum(), mask_B_T[sel_B].sum(), sel_B.sum())
        ]
    spreads = [torch.cat([*(t.cpu() for t in ts), torch.zeros(0)]) for ts in (ratios, gaps)]
    sums += [x for t in spreads for x in (t.sum(), t.numel())]
    total = torch.tensor([float(x) for x in sums], dtype=torch.float64)
    low_high = torch.tensor(
        [
            x
            for t in spreads
            for x in ((float(t.min()), -float(t.max())) if t.numel() else (math.inf,) * 2)
        ]
    )
    if ranks > 1:
        torch.distributed.all_reduce(total)
        torch.distributed.all_reduce(low_high, torch.distributed.ReduceOp.MIN)
    sampled, finished, n = total[:3].tolist()
    metrics = {
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "response_length": sampled / n,
        "finished": finished / n,
        "student_tokens": float(counters["student_tokens"]),
        "teacher_tokens": float(counters["teacher_tokens"]),
    }
    if batch.teacher_B_T is not None:
        for k, (name, _) in enumerate(groups):
            est, mask, count = total[3 + 3 * k : 6 + 3 * k].tolist()
            if count:
                metrics[name] = est / max(mask, 1.0)
    ratio_sum, ratio_n, gap_sum, gap_n = total[-4:].tolist()
    if ratio_n:
        metrics |= {
            "ratio_mean": ratio_sum / ratio_n,
            "ratio_min": float(low_high[0]),
            "ratio_max": -float(low_high[1]),
        }
    if gap_n:
        metrics |= {"logprob_gap_mean": gap_sum / gap_n, "logprob_gap_max": -float(low_high[3])}
    return metrics


def policy_gap(part: Part) -> torch.Tensor:
    """|log π_engine − log π_trainer| of each sampled token of the micro-batch: the
    rollout/trainer mismatch before the step's update (≈ 0 when the engine serves the
    trainer's weights; it grows with stale weights or a wrong load)."""
    with torch.no_grad():
        lp_B_T = token_logprobs(part.logits_B_T_V, part.cut(part.batch.tokens_B_T))
        gap_B_T = (lp_B_T - part.cut(part.batch.old_B_T)).abs()
        return gap_B_T[part.cut(part.batch.sampled_B_T) > 0].float().cpu()


def _require_finite_scores(scores: Sequence[Any], step: int) -> None:
    """The teacher's scores of the step's tokens are log-probs: finite, or −inf at worst for
    a top-k/full entry; a NaN or +inf (a broken teacher) stops the run."""
    for s in scores:
        if s.sampled and not all(math.isfinite(v) for v in s.sampled):
            require_finite(
                next(v for v in s.sampled if not math.isfinite(v)), step, "teacher score"
            )
        if s.full_T_V is not None and bool((s.full_T_V.isnan() | (s.full_T_V == math.inf)).any()):
            require_finite(math.nan, step, "teacher score (full distribution)")
        if s.topk_logprobs is not None and any(
            v != v or v == math.inf for row in s.topk_logprobs for v in row
        ):
            require_finite(math.nan, step, "teacher score (top-k)")
