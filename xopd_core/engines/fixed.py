"""Responses that are given rather than sampled: reference solutions (SFT) and responses the
teacher wrote from the transcript (offline KD). Served as a `RolloutEngine` so the baselines
run through the same trainer loop as X-OPD; their `logprobs` are 0 (no sampling policy)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerFast

from xopd_core.engines.base import Modality, Prompt, Rollout
from xopd_core.engines.greedy import greedy_generate
from xopd_core.engines.hf import HfStudent
from xopd_core.models.prompts import text_prompt_ids
from xopd_core.models.tokenizer import IM_END, PAD, token_id


class FixedResponses:
    """One given response per prompt, in the student's prompt layout for `modality`."""

    def __init__(self, student: HfStudent, responses: Mapping[str, list[int]]) -> None:
        self.student = student
        self.responses = responses

    def sample(
        self,
        prompts: Sequence[Prompt],
        modality: Modality,
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[Rollout]:
        del temperature, seed  # nothing is sampled
        missing = [p.id for p in prompts if p.id not in self.responses]
        if missing:
            raise KeyError(f"no given response for prompts {missing[:3]}")
        out = []
        for p in prompts:
            ids = self.responses[p.id][:max_new_tokens]
            for j in range(n):
                out.append(
                    Rollout(
                        p.id,
                        modality,
                        j,
                        self.student.prompt_ids(p, modality),
                        ids,
                        [0.0] * len(ids),
                        finished=bool(ids) and ids[-1] == self.student.eos_id,
                    )
                )
        return out


def reference_responses(
    tokenizer: PreTrainedTokenizerFast, solutions: Mapping[str, str]
) -> dict[str, list[int]]:
    """Each reference solution as response ids ending in <|im_end|> (as the teacher learned)."""
    eos = token_id(tokenizer, IM_END)
    return {k: [*tokenizer(v)["input_ids"], eos] for k, v in solutions.items()}


def teacher_written_responses(
    teacher: Any,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    batch_size: int = 64,
) -> dict[str, list[int]]:
    """The teacher's greedy answer to each transcript, ending in <|im_end|> when it stopped."""
    eos = token_id(tokenizer, IM_END)
    outs = greedy_generate(
        teacher,
        [text_prompt_ids(tokenizer, p.transcript) for p in prompts],
        pad_id=token_id(tokenizer, PAD),
        eos_id=eos,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    return {
        p.id: [*ids, eos] if len(ids) < max_new_tokens else ids
        for p, ids in zip(prompts, outs, strict=True)
    }
