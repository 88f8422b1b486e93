"""The distillation trainer on the tiny random student/teacher: what it trains and what it
must leave alone, resume, accumulation, the baselines, and that X-OPD closes the gap."""

from __future__ import annotations

import copy
import json
import math
import multiprocessing
import zlib
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration, Qwen2ForCausalLM

from tests.xopd_core.conftest import TINY_AUDIO
from tests.xopd_core.engines.conftest import prompts_of
from xopd_core.config import TrainParams
from xopd_core.data.manifest import manifest_path, read_manifest
from xopd_core.engines.base import Prompt
from xopd_core.engines.fixed import FixedResponses, reference_responses, teacher_written_responses
from xopd_core.engines.hf import HfStudent, HfTeacher
from xopd_core.engines.scoring import shared_vocab_size
from xopd_core.errors import NonFiniteTrainingError, ResumeStateError
from xopd_core.losses import reverse_kl_full
from xopd_core.models.prompts import TRANSCRIBE
from xopd_core.models.student import build_student
from xopd_core.models.tokenizer import IM_END, token_id
from xopd_core.train.distill import (
    AnchorItem,
    Interrupted,
    anchor_loss,
    prompts_for_step,
    train,
    within_budget,
)

TINY = {
    "steps": 4,
    "prompts_per_step": 2,
    "rollouts_per_prompt": 2,
    "max_new_tokens": 12,
    "lr": 1e-3,
    "micro_batch_size": 3,
    "checkpoint_every": 1,
    # The paper's objective alone; the mini world's defaults (full, anchored) have own tests.
    "loss": "sampled",
    "anchor_items": 0,
}


@pytest.fixture(scope="module")
def prompts(tiny_world: Path) -> list[Prompt]:
    return prompts_of(tiny_world, "train")[:8]


@pytest.fixture(scope="module")
def trained(tiny_teacher, tiny_student):
    """The session's briefly trained tiny teacher and round-0 student: a random LM predicts
    almost uniformly whatever it reads, these depend on the prompt, so there is a gap."""
    teacher = Qwen2ForCausalLM.from_pretrained(str(tiny_teacher.checkpoint)).eval()
    path = str(tiny_student.summary.checkpoint)
    student = Qwen2AudioForConditionalGeneration.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return processor.tokenizer, teacher, student, processor


def fresh(parts) -> tuple[HfStudent, HfTeacher, int]:
    tok, teacher, student, processor = parts
    vocab = shared_vocab_size(tok, tok)
    return (
        HfStudent(copy.deepcopy(student), processor, batch_size=4),
        HfTeacher(teacher, tok, vocab),
        vocab,
    )


def run(
    trained, prompts, state_dir=None, on_step=None, log=None, anchors=(), engine=None, **overrides
):
    student, teacher, vocab = fresh(trained)
    cfg = TrainParams(**(TINY | overrides))
    result = train(
        student,
        student if engine is None else engine(student),
        teacher,
        prompts,
        cfg,
        vocab_size=vocab,
        state_dir=state_dir,
        on_step=on_step,
        log=log,
        anchors=anchors,
    )
    return student.model, result


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_xopd_trains_the_language_model_only(trained, prompts) -> None:
    before = weights(trained[2])
    model, result = run(trained, prompts)
    after = weights(model)
    frozen = [k for k in before if "audio_tower" in k or "multi_modal_projector" in k]
    lm = [k for k in before if "language_model" in k]
    assert frozen and lm
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert sum(not torch.equal(before[k], after[k]) for k in lm) > len(lm) // 2
    h = result.history
    # log π_old − log π_T on one sample per token is an unbiased but noisy KL estimate: a
    # step's mean can dip below 0, and over four steps of this tiny run the speech and text
    # means are not reliably ordered (a clean clone saw speech 0.18 < text 0.30). The run's
    # speech mean is above 0: the untrained audio side leaves speech far from the teacher.
    assert len(h) == 4
    speech, text = (sum(m[f"reverse_kl_{g}"] for m in h) / 4 for g in ("speech", "text"))
    assert speech > 0 and math.isfinite(text)
    # HF rollouts come from the current weights: on-policy, r = 1 up to float rounding.
    assert all(1 - 1e-3 < m["ratio_min"] <= m["ratio_max"] < 1 + 1e-3 for m in h)
    assert (
        result.student_tokens == result.teacher_tokens == sum(m["response_length"] * 8 for m in h)
    )


def test_interrupted_and_resumed_run_is_bit_identical(trained, prompts, tmp_path: Path) -> None:
    straight, _ = run(trained, prompts)

    def stop_after_two(step: int, metrics: dict) -> None:
        if step == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(trained, prompts, state_dir=tmp_path / "state", on_step=stop_after_two)
    logged: list[int] = []
    resumed, result = run(
        trained, prompts, state_dir=tmp_path / "state", log=lambda step, m: logged.append(step)
    )
    assert result.resumed_from == 2 and len(result.history) == 4
    assert logged == [0, 1, 2, 3]  # restored steps replayed to the log, then new ones
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), {
        k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])
    }
    with pytest.raises(ValueError, match="different train params"):
        run(trained, prompts, state_dir=tmp_path / "state", lr=5e-4)


def test_gradient_accumulation_is_normalised_over_the_whole_step(trained, prompts) -> None:
    """Micro-batches of 1 rollout or all 8 at once: the same update, to float rounding (Adam's
    first step moves each weight by ≈ lr = 1e-3; a micro-batch mean normalised per micro-batch
    instead would move them differently by a sizeable fraction of that)."""
    one, _ = run(trained, prompts, steps=1, micro_batch_size=1)
    every, _ = run(trained, prompts, steps=1, micro_batch_size=64)
    a, b = weights(one), weights(every)
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # A weight whose gradient is ~Adam's ε (1e-8) moves by a steep function of it, so float
    # rounding shows there (one lm_head entry of ~76k: 1.5e-5); every other agrees to 1e-5.
    assert int((diffs > 1e-5).sum()) <= 3
    assert diffs.max().item() < 1e-4


def fresh_speech_gap(student: HfStudent, teacher: HfTeacher, prompts, vocab: int) -> float:
    """Exact mean reverse KL(student | speech ‖ teacher | text) over fresh speech rollouts."""
    rollouts = student.sample(prompts, "speech", n=4, temperature=1.0, max_new_tokens=12, seed=999)
    with torch.no_grad():
        s = student.response_logits(rollouts)[..., :vocab]
        t = teacher.response_logprobs_full(
            rollouts, [p.transcript for p in prompts for _ in range(4)]
        )
    mask = torch.zeros(s.shape[:2])
    for i, r in enumerate(rollouts):
        mask[i, : len(r.response_ids)] = 1
    return float((reverse_kl_full(s, t) * mask).sum() / mask.sum())


def test_a_few_xopd_steps_close_the_speech_text_gap_on_fresh_rollouts(trained, prompts) -> None:
    """A student whose LM is the (tiny) teacher and whose audio parts are untrained hears
    noise: its speech answers are far from the teacher's text answers (exact reverse KL ~2.5
    nats/token). Twelve X-OPD steps (sampled-token estimator, 4 prompts × 2 rollouts × 2
    modalities each) cut the exact KL measured on fresh rollouts (another seed) by more than
    half; measured 2.46 → 0.06."""
    tok, teacher, _, processor = trained
    raw = (tok, teacher, build_student(teacher, tok, TINY_AUDIO, seed=2), processor)
    student, scorer, vocab = fresh(raw)
    before = fresh_speech_gap(student, scorer, prompts, vocab)
    cfg = TrainParams(**(TINY | {"steps": 12, "prompts_per_step": 4}))
    result = train(student, student, scorer, prompts, cfg, vocab_size=vocab)
    after = fresh_speech_gap(student, scorer, prompts, vocab)
    assert before > 1.0
    assert after < 0.5 * before, (before, after)
    assert result.history[-1]["reverse_kl_speech"] < result.history[0]["reverse_kl_speech"]


@pytest.mark.parametrize("loss", ["full", "topk"])
def test_full_and_topk_losses_run_through_the_loop(trained, prompts, loss: str) -> None:
    _, result = run(trained, prompts, steps=2, loss=loss, top_k=5)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in result.history)
    assert result.history[0]["loss"] > 0


def test_baselines_run_through_the_same_loop_and_budget(trained, prompts) -> None:
    tok, teacher_model, _, _ = trained
    student, teacher, vocab = fresh(trained)
    refs = reference_responses(tok, {p.id: "the answer is yes." for p in prompts})
    sft = TrainParams(**(TINY | {"method": "sft", "steps": 6}))
    r = train(student, FixedResponses(student, refs), None, prompts, sft, vocab_size=vocab)
    assert r.teacher_tokens == 0 and r.student_tokens > 0
    assert r.history[-1]["loss"] < r.history[0]["loss"]

    student, teacher, vocab = fresh(trained)
    written = teacher_written_responses(teacher_model, tok, prompts, max_new_tokens=10)
    spent = sum(len(v) for v in written.values())
    kd = TrainParams(**(TINY | {"method": "offline_kd", "steps": 2}))
    r = train(
        student,
        FixedResponses(student, written),
        None,
        prompts,
        kd,
        vocab_size=vocab,
        teacher_tokens_spent=spent,
    )
    assert r.teacher_tokens == spent

    student, teacher, vocab = fresh(trained)
    gkd = TrainParams(**(TINY | {"method": "gkd", "steps": 2}))
    r = train(student, student, teacher, prompts, gkd, vocab_size=vocab)
    assert r.teacher_tokens == r.student_tokens > 0 and r.history[0]["loss"] > 0

    student, teacher, vocab = fresh(trained)
    grpo = TrainParams(**(TINY | {"method": "grpo", "steps": 2}))
    first = {p.id: None for p in prompts}

    def reward(prompt: Prompt, ids: list[int]) -> float:  # reward the first sample seen
        first[prompt.id] = first[prompt.id] or tuple(ids)
        return float(first[prompt.id] == tuple(ids))

    r = train(student, student, None, prompts, grpo, vocab_size=vocab, reward=reward)
    assert r.teacher_tokens == 0 and "reward" in r.history[0]
    with pytest.raises(ValueError, match="reward"):
        train(student, student, None, prompts, grpo, vocab_size=vocab)


def test_within_budget_keeps_the_first_tokens_in_rollout_order() -> None:
    mask = torch.tensor([[1.0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(
        within_budget(mask, 4), torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    )
    assert torch.equal(within_budget(mask, 9), mask) and torch.equal(within_budget(mask, 99), mask)
    assert within_budget(mask, 0).sum() == 0


def test_a_token_budget_gives_each_method_exactly_the_same_student_tokens(
    trained, prompts, tmp_path: Path
) -> None:
    """X-OPD samples two modalities per step and SFT one short reference: different tokens per
    step, the same total, each stopping at the step that meets the budget (cap 30 steps)."""
    tok = trained[0]
    reference = "the answer is yes. the answer is yes."  # shorter than two sampled responses
    budget = 250
    _, xopd = run(trained, prompts, steps=30, student_tokens=budget)
    student, _, vocab = fresh(trained)
    refs = reference_responses(tok, {p.id: reference for p in prompts})
    cfg = TrainParams(**(TINY | {"method": "sft", "steps": 30, "student_tokens": budget}))
    sft = train(student, FixedResponses(student, refs), None, prompts, cfg, vocab_size=vocab)
    assert xopd.student_tokens == sft.student_tokens == budget
    assert [r.history[-1]["student_tokens"] for r in (xopd, sft)] == [budget, budget]
    assert xopd.steps == len(xopd.history) < sft.steps == len(sft.history) < 30
    assert xopd.history[-2]["student_tokens"] < budget  # no step after the budget was met
    # Resumed from its last checkpoint (after step 1), a budget run ends where it would have.

    def stop_after_two(step: int, metrics: dict) -> None:
        if step == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(trained, prompts, tmp_path, stop_after_two, steps=30, student_tokens=budget)
    _, resumed = run(trained, prompts, tmp_path, steps=30, student_tokens=budget)
    assert resumed.resumed_from == 2
    assert (resumed.steps, resumed.student_tokens) == (xopd.steps, budget)
    assert resumed.history == [{**m, "seconds": r["seconds"]} for m, r in
                               zip(xopd.history, resumed.history, strict=True)]  # fmt: skip


def test_prompt_order_is_a_pure_function_of_seed_and_step() -> None:
    steps = [prompts_for_step(5, 2, seed=3, step=s) for s in range(5)]
    flat = [i for s in steps for i in s]
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))  # each epoch covers all
    assert steps == [prompts_for_step(5, 2, seed=3, step=s) for s in range(5)]
    assert steps != [prompts_for_step(5, 2, seed=4, step=s) for s in range(5)]


def test_a_non_finite_teacher_score_stops_the_run_at_its_step_before_any_update(
    trained, prompts, tmp_path: Path
) -> None:
    student, teacher, vocab = fresh(trained)
    after_step_1: dict[str, torch.Tensor] = {}
    real_score = teacher.score

    def broken_at_step_2(rollouts, transcripts, **kw):
        scores = real_score(rollouts, transcripts, **kw)
        calls.append(1)
        if len(calls) == 2:
            scores[0].sampled[0] = float("nan")
        return scores

    calls: list[int] = []
    teacher.score = broken_at_step_2  # type: ignore[method-assign]
    with pytest.raises(NonFiniteTrainingError, match=r"^step 2: non-finite teacher score"):
        train(student, student, teacher, prompts, TrainParams(**TINY), vocab_size=vocab,
              state_dir=tmp_path / "state",
              on_step=lambda step, m: after_step_1.update(weights(student.model)))  # fmt: skip
    # Step 1's state is the resume point; step 2 changed nothing.
    assert json.loads((tmp_path / "state" / "trainer.json").read_text())["step"] == 1
    assert all(torch.equal(after_step_1[k], v) for k, v in weights(student.model).items())


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_the_loss(
    trained, prompts, tmp_path: Path
) -> None:
    student, teacher, vocab = fresh(trained)
    before = weights(student.model)
    real_logits = student.response_logits
    student.response_logits = lambda mb: real_logits(mb) * float("nan")  # type: ignore[method-assign]
    with pytest.raises(NonFiniteTrainingError, match=r"^step 1: non-finite loss \(nan\)"):
        train(student, student, teacher, prompts, TrainParams(**TINY), vocab_size=vocab,
              state_dir=tmp_path / "state")  # fmt: skip
    assert all(torch.equal(before[k], v) for k, v in weights(student.model).items())
    assert not (tmp_path / "state").exists()


def test_a_resume_state_only_resumes_the_run_from_its_starting_weights(
    trained, prompts, tmp_path: Path
) -> None:
    def stop_after_one(step, metrics):
        raise Interrupted

    student, teacher, vocab = fresh(trained)
    state = tmp_path / "state"
    with pytest.raises(Interrupted):
        train(student, student, teacher, prompts, TrainParams(**TINY), vocab_size=vocab,
              state_dir=state, on_step=stop_after_one, start_weights_sha256="a" * 64)  # fmt: skip
    student, teacher, vocab = fresh(trained)
    with pytest.raises(ResumeStateError, match=r"started from weights aaaaaaaaaaaa, not .*bbbb"):
        train(student, student, teacher, prompts, TrainParams(**TINY), vocab_size=vocab,
              state_dir=state, start_weights_sha256="b" * 64)  # fmt: skip
    result = train(student, student, teacher, prompts, TrainParams(**TINY), vocab_size=vocab,
                   state_dir=state, start_weights_sha256="a" * 64)  # fmt: skip
    assert result.resumed_from == 1 and result.steps == TINY["steps"]


@pytest.fixture(scope="module")
def anchors(trained, tiny_world: Path) -> list[AnchorItem]:
    """Six paralinguistic items and six transcriptions with their gold responses."""
    tok = trained[0]
    eos = token_id(tok, IM_END)
    rows = read_manifest(manifest_path(tiny_world, "train"))
    rows = [r for r in rows if r["kind"] == "paralinguistic"][:6] + [
        r for r in rows if r["kind"] == "reasoning"
    ][:6]
    return [
        AnchorItem(
            Prompt(r["id"], r["transcript"], tiny_world / r["audio_path"], r["task"]),
            None if r["kind"] == "paralinguistic" else TRANSCRIBE,
            [
                *tok(r["solution"] if r["kind"] == "paralinguistic" else r["transcript"])[
                    "input_ids"
                ],
                eos,
            ],
        )
        for r in rows
    ]


def test_the_anchor_trains_what_only_audio_carries_beside_xopd(
    trained, prompts, anchors: list[AnchorItem]
) -> None:
    tok = trained[0]
    assert {a.instruction for a in anchors} == {None, TRANSCRIBE}

    def anchor_nll(model) -> float:
        student = HfStudent(model, trained[3], batch_size=4)
        with torch.no_grad():
            return float(anchor_loss(student, anchors, shared_vocab_size(tok, tok)))

    plain_model, plain = run(trained, prompts)
    anchored_model, anchored = run(trained, prompts, anchors=anchors, anchor_items=6)
    assert all("anchor_loss" not in m for m in plain.history)
    assert all(math.isfinite(m["anchor_loss"]) for m in anchored.history)
    assert anchor_nll(anchored_model) < anchor_nll(plain_model) < anchor_nll(trained[2]) + 1.0
    # The anchor's tokens are not the method's: the token budget's count is unchanged.
    assert anchored.student_tokens == sum(m["response_length"] * 8 for m in anchored.history)
    with pytest.raises(ValueError, match="anchor"):
        run(trained, prompts, anchor_items=2)


class PerPrompt:
    """The student's own sampling, each prompt alone with a seed of its own: a rollout then
    does not depend on which prompts share its call, or its rank."""

    def __init__(self, student: HfStudent) -> None:
        self.student = student

    def sample(self, prompts, modality, **kw):
        return [
            r
            for p in prompts
            for r in self.student.sample(
                [p], modality, **(kw | {"seed": zlib.crc32(f"{p.id}/{modality}".encode())})
            )
        ]


@pytest.mark.parametrize(
    ("loss", "parallel", "checkpointed"),
    [
        ("sampled", "ddp", False),
        ("full", "ddp", False),
        ("sampled", "fsdp", False),
        ("full", "fsdp", True),
    ],
)
def test_two_ranks_take_the_step_of_one_process_on_the_same_rollouts(
    trained, prompts, anchors: list[AnchorItem], loss: str, parallel: str, checkpointed: bool
) -> None:
    """Each rank samples, scores and trains on half of each step's prompts; the loss keeps
    the whole step's weights and the gradients are summed: the update is one process's, to
    float rounding, and so are the step's counts and metrics. Under fsdp each rank holds
    half of every decoder layer's weights (gathered into the sampling model each step),
    also with activation checkpointing."""
    common = {"steps": 3, "prompts_per_step": 4, "loss": loss, "engine": PerPrompt}
    common |= {"anchors": anchors, "anchor_items": 2}
    one_model, one = run(trained, prompts, **common)
    parts = trained
    if checkpointed:
        tok, teacher, student, processor = trained
        student = copy.deepcopy(student)
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        parts = (tok, teacher, student, processor)
    two_model, two = run(parts, prompts, processes=2, parallel=parallel, **common)
    a, b = weights(one_model), weights(two_model)
    diffs = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diffs.max().item() < 1e-4 and int((diffs > 1e-5).sum()) <= 3, diffs.max()
    assert (two.student_tokens, two.teacher_tokens) == (one.student_tokens, one.teacher_tokens)
    for m1, m2 in zip(one.history, two.history, strict=True):
        assert m2["response_length"] == m1["response_length"]
        keys = ("loss", "reverse_kl", "reverse_kl_speech", "reverse_kl_text", "grad_norm")
        for key in (*keys, "anchor_loss"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_two_rank_run_interrupted_and_resumed_ends_bit_identical(
    trained, prompts, tmp_path: Path, parallel: str
) -> None:
    """Under fsdp the state holds the AdamW moments gathered whole; resumed, each rank
    takes its shard of them again."""
    two = {"processes": 2, "parallel": parallel}
    straight, _ = run(trained, prompts, **two)

    def stop_after_two(step: int, metrics: dict) -> None:
        if step == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        run(trained, prompts, state_dir=tmp_path / "state", on_step=stop_after_two, **two)
    assert not multiprocessing.active_children()  # the other rank went with the run
    resumed, result = run(trained, prompts, state_dir=tmp_path / "state", **two)
    assert result.resumed_from == 2 and len(result.history) == 4
    a, b = weights(straight), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), {
        k: (a[k] - b[k]).abs().max().item() for k in a if not torch.equal(a[k], b[k])
    }


def test_ranks_must_divide_the_step_and_not_fork_a_vllm_engine() -> None:
    with pytest.raises(ValueError, match=r"train.processes \(3\) must divide"):
        TrainParams(prompts_per_step=8, processes=3)
    with pytest.raises(ValueError, match="vLLM"):
        TrainParams(processes=2, engine="vllm")
