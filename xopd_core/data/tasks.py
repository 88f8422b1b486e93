"""The tasks a dataset may hold: each task's kind and the answers it may have.

The mini world's seven are the default. A dataset of your own names its tasks in params.yaml
(`validate.tasks`); the dataset suite (which tasks, kinds and answers a row may have), the
strict answer extractor of the evaluation and GRPO's reward all read this one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from xopd_core.config import ValidateParams
from xopd_core.data.reasoning import REASONING_TASKS
from xopd_core.data.world import ANSWER_SETS, PARA_TASKS

TaskKind = Literal["reasoning", "paralinguistic"]
KINDS: tuple[TaskKind, ...] = ("reasoning", "paralinguistic")


@dataclass(frozen=True)
class TaskDef:
    kind: TaskKind
    answers: frozenset[str]


MINI_TASKS: dict[str, TaskDef] = {
    **{t: TaskDef("reasoning", ANSWER_SETS[t]) for t in REASONING_TASKS},
    **{t: TaskDef("paralinguistic", ANSWER_SETS[t]) for t in PARA_TASKS},
}


def task_table(p: ValidateParams) -> dict[str, TaskDef]:
    """`validate.tasks` as a table, or the mini world's when it is null."""
    if p.tasks is None:
        return MINI_TASKS
    return {name: TaskDef(t.kind, frozenset(t.answers)) for name, t in p.tasks.items()}


def answer_sets(p: ValidateParams) -> dict[str, frozenset[str]]:
    """Each task's legal answers (the extractor's and GRPO's reward's view of the table)."""
    return {name: t.answers for name, t in task_table(p).items()}
