"""Flow tests: a Prefect test server (one per session, started by the harness), the tiny
pipeline's params cut to one- or two-step rounds, a work folder laid out like the repo, and
`xopd serve` running in its own process on a work folder (`served`, one per module)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest
import yaml
from prefect import tags
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentTaskRunId,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.testing.utilities import prefect_test_harness

from flows.server import healthy
from xopd_core.config import EvalParams, InputsParams, NightlyParams, Params, TrainParams

REPO = Path(__file__).resolve().parents[2]


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
            # The stand-in scores lay_out_work writes (8 tokens answer nothing right).
            "inputs": InputsParams(teacher_scores="reports/teacher/metrics.json"),
        }
    )


@pytest.fixture()
def work(tmp_path: Path, tiny_world: Path, tiny_teacher, tiny_student) -> Path:
    return lay_out_work(tmp_path / "work", tiny_world, tiny_teacher, tiny_student)


def lay_out_work(root: Path, tiny_world: Path, tiny_teacher, tiny_student) -> Path:
    """data/mini, models/teacher, models/student with their metrics (the teacher's a stand-in),
    as `make run` leaves them."""
    (root / "data").mkdir(parents=True)
    (root / "data" / "mini").symlink_to(tiny_world)
    shutil.copytree(tiny_teacher.checkpoint, root / "models" / "teacher")
    shutil.copytree(tiny_student.summary.checkpoint, root / "models" / "student")
    (root / "reports" / "student").mkdir(parents=True)
    shutil.copy(tiny_student.summary.metrics_path, root / "reports" / "student" / "metrics.json")
    # The 40-step tiny teacher answers nothing right; the Avg-Drop needs a non-zero
    # reference, so the flows read a stand-in teacher score file.
    (root / "reports" / "teacher").mkdir(parents=True)
    tasks = ("navigate", "object_counting", "web_of_lies", "boolean_expressions")
    scores = {f"text_accuracy_{t}": 0.9 for t in tasks}
    (root / "reports" / "teacher" / "metrics.json").write_text(json.dumps(scores))
    return root


def run_flow(flow: Callable[..., Any], **kwargs: Any) -> tuple[Any, UUID]:
    """Run a flow and return what it returned and the id of its run. Not through
    `return_state=True`: when the server rejects the engine's proposal of a terminal state
    it has already recorded (a client retry on a busy server does that), the engine keeps
    the server's copy, which carries no result, and `state.result()` raises MissingResult;
    the plain call returns the value the flow returned. The run is found by a tag only it
    carries (and its subflows, which have a parent)."""
    tag = f"test-{uuid4()}"
    with tags(tag):
        result = flow(**kwargs)
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(  # its subflows carry the tag too
                tags=FlowRunFilterTags(all_=[tag]),
                parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=True),
            )
        )
    return result, run.id


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    api: str
    work: Path
    log: Path
    registered_at: float  # time.monotonic() when the deployments were first readable

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def xopd_serve(tmp: Path, params: Params, work: Path, *extra: str) -> Iterator[Served]:
    """`xopd serve` in its own process with nothing configured (it starts the server) until
    its deployments are registered; stopped afterwards, its server with it."""
    (work / "params.yaml").write_text(yaml.safe_dump(params.to_yaml_dict()))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {
        "PREFECT_HOME": str(tmp / "prefect-home"),  # this server's own database
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",  # pick a triggered run up within a second
        "PYTHONPATH": str(REPO),
    }
    log = tmp / "serve.log"
    command = [sys.executable, "-m", "flows.cli", "serve", "--params", str(work / "params.yaml")]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--workdir", str(work), "--port", str(port), *extra],
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 240
        while not healthy(api):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no server came up"
            time.sleep(0.5)
        with (
            temporary_settings(updates={PREFECT_API_URL: api}),
            get_client(sync_client=True) as client,
        ):
            while True:  # the serve loop registers the deployments once the flows import
                assert proc.poll() is None, log.read_text()[-3000:]
                try:
                    client.read_deployment_by_name("xopd-campaign/campaign")
                    break
                except ObjectNotFound:
                    assert time.monotonic() < deadline, "the deployments never registered"
                    time.sleep(0.2)
        yield Served(proc, port, api, work, log, time.monotonic())
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not healthy(api), "the server xopd serve started outlived it"


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    flow_params: Params,
    tiny_world: Path,
    tiny_teacher,
    tiny_student,
) -> Iterator[Served]:
    """`xopd serve`, serving the deployments itself."""
    tmp = tmp_path_factory.mktemp("serve")
    work = lay_out_work(tmp / "work", tiny_world, tiny_teacher, tiny_student)
    params = flow_params.model_copy(update={"nightly": NightlyParams(timezone="Europe/Berlin")})
    with xopd_serve(tmp, params, work) as served:
        yield served
