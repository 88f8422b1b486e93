"""Flow tests: a Prefect test server (one per session, started by the harness), the tiny
pipeline's params cut to one- or two-step rounds, and a work folder laid out like the repo."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.testing.utilities import prefect_test_harness

from xopd_core.config import EvalParams, Params, TrainParams


@pytest.fixture(scope="session")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def flow_params(tiny_pipeline_params: Params) -> Params:
    return tiny_pipeline_params.model_copy(
        update={
            "train": TrainParams(
                steps=1, prompts_per_step=2, rollouts_per_prompt=2, max_new_tokens=8
            ),
            "eval": EvalParams(max_new_tokens=8),
        }
    )


@pytest.fixture()
def work(tmp_path: Path, tiny_world: Path, tiny_teacher, tiny_student) -> Path:
    return lay_out_work(tmp_path / "work", tiny_world, tiny_teacher, tiny_student)


def lay_out_work(root: Path, tiny_world: Path, tiny_teacher, tiny_student) -> Path:
    """data/mini, models/teacher, models/student and the teacher's scores, as `make run`
    leaves them."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "mini").symlink_to(tiny_world)
    shutil.copytree(tiny_teacher.checkpoint, root / "models" / "teacher")
    shutil.copytree(tiny_student.summary.checkpoint, root / "models" / "student")
    # The 40-step tiny teacher answers nothing right; the Avg-Drop needs a non-zero
    # reference, so the flows read a stand-in teacher score file.
    (root / "reports" / "teacher").mkdir(parents=True)
    tasks = ("navigate", "object_counting", "web_of_lies", "boolean_expressions")
    scores = {f"text_accuracy_{t}": 0.9 for t in tasks}
    (root / "reports" / "teacher" / "metrics.json").write_text(json.dumps(scores))
    return root


def logs_of(flow_run_id: UUID | None, *wanted: str) -> list[str]:
    """The run's log messages, once messages starting with each of `wanted` have arrived
    (logs reach the server in batches), or after 30 s."""
    of_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            logs = [entry.message for entry in client.read_logs(of_run)]
            arrived = all(any(m.startswith(w) for m in logs) for w in wanted)
            if arrived or time.monotonic() > deadline:
                return logs
            time.sleep(0.5)
