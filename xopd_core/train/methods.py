"""Which engines a method trains with: who writes the responses (the student sampling in HF
or vLLM, or fixed responses: SFT's gold solutions, offline KD's teacher-written ones), who
scores them (the HF or vLLM teacher, or nobody) and GRPO's reward. The one place a method is
paired with its engines; the trainer loop only sees the objective and these."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from xopd_core.config import TrainParams
from xopd_core.engines.base import Prompt, RolloutEngine, TeacherScorer
from xopd_core.engines.fixed import FixedResponses, reference_responses, teacher_written_responses
from xopd_core.engines.hf import HfStudent, HfTeacher
from xopd_core.eval.metrics import AnswerSets, extract_answer
from xopd_core.models.checkpoint import load_causal_lm
from xopd_core.models.tokenizer import decode
from xopd_core.train.objectives import Reward


@dataclass
class MethodEngines:
    rollout: RolloutEngine
    scorer: TeacherScorer | None
    reward: Reward
    teacher_tokens_spent: int  # offline KD: the tokens the teacher wrote before the loop


def answer_reward(tokenizer: PreTrainedTokenizerFast, answer_sets: AnswerSets) -> Reward:
    """GRPO's reward: 1 when the response's final answer is the prompt's, else 0."""

    def reward(prompt: Prompt, ids: list[int]) -> float:
        said = extract_answer(decode(tokenizer, ids), prompt.task, answer_sets)
        return float(said == prompt.answer)

    return reward


@contextlib.contextmanager
def method_engines(
    cfg: TrainParams,
    student: HfStudent,
    student_dir: Path,
    teacher_dir: Path,
    teacher_tokenizer: PreTrainedTokenizerFast,
    vocab_size: int,
    prompts: Sequence[Prompt],
    solutions: Mapping[str, str],
    device: torch.device,
    answer_sets: AnswerSets,
) -> Iterator[MethodEngines]:
    """The engines `cfg.method` trains with on `cfg.engine`; vLLM engines are closed on exit.
    vLLM serves the sampling methods (xopd, grpo) and X-OPD's teacher unless `loss` is full
    (vLLM returns no full distributions); an HF teacher is loaded only where one is needed.
    `solutions`: SFT's reference response per prompt id; `answer_sets`: each task's legal
    answers (GRPO's reward)."""
    with contextlib.ExitStack() as stack:
        rollout: RolloutEngine = student
        scorer: TeacherScorer | None = None
        spent = 0

        def hf_teacher(on: torch.device) -> Any:
            return load_causal_lm(teacher_dir, dtype=getattr(torch, cfg.teacher_dtype)).to(on)

        if cfg.engine == "vllm" and cfg.method in ("xopd", "grpo"):
            from xopd_core.engines.vllm_engine import VllmEngine, VllmSettings

            # Under a launcher each rank starts its own engines, on its own GPU (colocated).
            on_gpu = VllmSettings(gpu_memory_utilization=cfg.vllm_gpu_memory)
            rollout = stack.enter_context(
                VllmEngine(student_dir, audio=True, settings=on_gpu, vocab_size=vocab_size)
            )
            if cfg.method == "xopd" and cfg.loss != "full":
                wide = replace(on_gpu, tensor_parallel_size=cfg.teacher_tensor_parallel)
                scorer = stack.enter_context(
                    VllmEngine(teacher_dir, audio=False, settings=wide, vocab_size=vocab_size)
                )
        if scorer is None and cfg.method in ("xopd", "gkd"):
            scorer = HfTeacher(hf_teacher(device), teacher_tokenizer, vocab_size)
        if cfg.method == "sft":
            rollout = FixedResponses(student, reference_responses(teacher_tokenizer, solutions))
        elif cfg.method == "offline_kd":
            written = teacher_written_responses(  # greedy, once, on the CPU
                hf_teacher(torch.device("cpu")), teacher_tokenizer, prompts, cfg.max_new_tokens
            )
            spent = sum(len(v) for v in written.values())
            rollout = FixedResponses(student, written)
        yield MethodEngines(rollout, scorer, answer_reward(teacher_tokenizer, answer_sets), spent)
