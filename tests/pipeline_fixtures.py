"""A tiny teacher and round-0 student, trained once per session on the tiny world (the
fixtures are registered in tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tasks.student import StudentSummary, student
from tasks.teacher import TeacherSummary, teacher
from tests.xopd_core.conftest import TINY_AUDIO, TINY_LM
from xopd_core.config import (
    InstructPhase,
    Params,
    Phase,
    ReadPhase,
    StudentParams,
    TeacherParams,
)

TINY_TEACHER = TeacherParams(
    model=TINY_LM.model_copy(update={"max_positions": 1024}),
    steps=40,
    batch_size=8,
    lr=3e-3,
    warmup_steps=5,
    max_new_tokens=24,
    task_weights=None,  # the tiny world's own mix (tests/tasks/test_teacher.py covers weights)
)

TINY_STUDENT = StudentParams(
    audio=TINY_AUDIO,
    pretrain_utterances=6,
    ctc=Phase(steps=15, batch_size=8, lr=3e-3, warmup_steps=2),
    align=Phase(steps=15, batch_size=4, lr=3e-3, warmup_steps=2),
    read=ReadPhase(steps=15, batch_size=8, lr=3e-3, warmup_steps=2, text_replay_items=6),
    instruct=InstructPhase(
        steps=15, batch_size=8, lr=2e-3, warmup_steps=2, asr_items=8, text_replay_items=16
    ),
)


@pytest.fixture(scope="session")
def tiny_pipeline_params() -> Params:
    return Params(teacher=TINY_TEACHER, student=TINY_STUDENT)


@pytest.fixture(scope="session")
def tiny_teacher(
    tiny_world: Path, tiny_pipeline_params: Params, tmp_path_factory: pytest.TempPathFactory
) -> TeacherSummary:
    out = tmp_path_factory.mktemp("teacher")
    return teacher(tiny_pipeline_params, tiny_world, out / "teacher", out / "metrics.json")


@dataclass
class TinyStudent:
    summary: StudentSummary
    losses: dict[str, list[float]] = field(default_factory=dict)


@pytest.fixture(scope="session")
def tiny_student(
    tiny_world: Path,
    tiny_pipeline_params: Params,
    tiny_teacher: TeacherSummary,
    tmp_path_factory: pytest.TempPathFactory,
) -> TinyStudent:
    out = tmp_path_factory.mktemp("student")
    losses: dict[str, list[float]] = {}
    summary = student(
        tiny_pipeline_params,
        tiny_world,
        tiny_teacher.checkpoint,
        out / "student",
        out / "metrics.json",
        on_step=lambda phase, step, loss: losses.setdefault(phase, []).append(loss),
    )
    return TinyStudent(summary, losses)
