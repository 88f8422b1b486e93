"""What the engines exchange: prompts, rollouts, teacher scores, and the two Protocols.

A rollout is a response the student sampled from its own distribution, for one prompt in one
modality (speech S or its transcript T), with the sampling policy's log-prob of every token.
Teacher scores are the teacher's log-probs of those same tokens, read after the transcript.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Modality = Literal["speech", "text"]
ScoreMode = Literal["sampled", "topk", "full"]


@dataclass(frozen=True)
class Prompt:
    """One parallel pair (S, T): the audio file and its transcript."""

    id: str
    transcript: str
    audio_path: Path
    task: str = ""
    answer: str = ""


@dataclass(frozen=True)
class Rollout:
    """`response_ids` sampled for `prompt_ids` (the student's prompt, <|AUDIO|> expanded for
    speech); `logprobs[t]` = log π_old(response_ids[t] | prompt, response_ids[:t]) under the
    sampling distribution (softmax of logits / temperature). `finished`: ended with EOS
    (which is then the last response token) rather than at the length limit."""

    prompt_id: str
    modality: Modality
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    finished: bool


@dataclass(frozen=True)
class TeacherScores:
    """The teacher's view of one rollout's response tokens, position t predicting token t:
    `sampled[t]` its log-prob of the sampled token; with mode "topk" its `topk_ids` and
    `topk_logprobs` (normalised over the full shared vocabulary) per position; with "full"
    its log-probs over the shared vocabulary, `full_T_V`."""

    sampled: list[float]
    topk_ids: list[list[int]] | None = None
    topk_logprobs: list[list[float]] | None = None
    full_T_V: torch.Tensor | None = None


class RolloutEngine(Protocol):
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
        """`n` rollouts per prompt, prompt-major (all of prompt 0's, then prompt 1's, ...),
        reproducible for a fixed `seed`."""
        ...


@runtime_checkable
class WeightSync(Protocol):
    """A rollout engine that holds its own copy of the student's weights (vLLM): the
    trainer hands it the current model to serve from then on."""

    def sync_weights(self, model: Any) -> str: ...


class TeacherScorer(Protocol):
    def score(
        self,
        rollouts: Sequence[Rollout],
        transcripts: Sequence[str],
        *,
        mode: ScoreMode,
        top_k: int = 0,
    ) -> list[TeacherScores]:
        """Teacher log-probs of each rollout's response given `transcripts[i]` (the text form
        of rollout i's prompt) in the teacher's own chat template."""
        ...
