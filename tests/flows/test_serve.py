"""`xopd serve` for real: one Prefect server it starts on loopback (its own PREFECT_HOME), the
deployments registered with it, the nightly cron scheduled at once, a round triggered through
the API the UI uses completing with its artifacts; and the API a user configured (environment,
profile, prefect.toml) used instead of a server of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, date, datetime
from pathlib import Path

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import StateType
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.callables import parameter_schema

from flows.nightly import xopd_nightly
from flows.round import xopd_round
from flows.serve import deployments
from flows.server import healthy
from tests.flows.conftest import Served, free_port, lay_out_work, xopd_serve
from xopd_core.config import Params

REPO = Path(__file__).resolve().parents[2]


def test_deployments_carry_the_schedule_params_and_a_concurrency_limit(tmp_path: Path) -> None:
    params = Params.model_validate({"nightly": {"cron": "30 3 * * 1", "timezone": "Asia/Tokyo"}})
    nightly, round_, campaign, study = deployments(params, str(tmp_path))
    assert [d.name for d in (nightly, round_, campaign, study)] == [
        "nightly",
        "round",
        "campaign",
        "study",
    ]
    assert nightly.schedules[0].schedule.cron == "30 3 * * 1"
    assert nightly.schedules[0].schedule.timezone == "Asia/Tokyo"
    assert nightly.parameters["params"]["nightly"]["cron"] == "30 3 * * 1"
    assert all(d.concurrency_limit == 1 for d in (nightly, round_, campaign, study))
    # The round's form: the round and its train and gate settings; the rest is params.yaml.
    assert round_.parameters == {"workdir": str(tmp_path.resolve())}
    shown = list(parameter_schema(xopd_round).model_dump()["properties"])
    assert shown[:3] == ["round", "train", "gate"]
    # The UI renders a typed form for the params from the flow's parameter schema.
    schema = parameter_schema(xopd_nightly).model_dump()
    assert schema["properties"]["params"]["$ref"].endswith("/Params")
    assert "TrainParams" in schema["definitions"] and "lmbda" in str(schema["definitions"])


def test_the_ui_talks_to_the_server_it_is_served_by(served: Served) -> None:
    """On a port other than 4200 the UI asked 127.0.0.1:4200 for its API and showed no
    deployments: the server must tell the UI its own address."""
    ui = served.api.removesuffix("/api")
    with urllib.request.urlopen(f"{ui}/ui-settings", timeout=30) as r:
        settings = json.load(r)
    assert served.port != 4200 and settings["api_url"] == served.api


def test_the_nightly_cron_has_runs_scheduled_within_seconds(served: Served) -> None:
    """Prefect schedules a new cron deployment within seconds; with SQLAlchemy 2.1.9 its
    scheduler fails on every pass ("Can't evaluate bulk DML statement") and none appear."""
    with (
        temporary_settings(updates={PREFECT_API_URL: served.api}),
        get_client(sync_client=True) as client,
    ):
        nightly = client.read_deployment_by_name("xopd-nightly/nightly")
        (schedule,) = nightly.schedules
        assert schedule.schedule.cron == "0 2 * * *"
        assert schedule.schedule.timezone == "Europe/Berlin"
        only_scheduled = FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
        )
        mine = DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id]))
        while not (
            runs := client.read_flow_runs(flow_run_filter=only_scheduled, deployment_filter=mine)
        ):
            assert time.monotonic() - served.registered_at < 20, (
                "no scheduled nightly run 20 s after serving\n" + served.tail()
            )
            time.sleep(0.5)
    now = datetime.now(UTC)
    starts = sorted(r.expected_start_time for r in runs if r.expected_start_time)
    assert starts and all(s > now for s in starts)
    # 2 am in Berlin is 1 am (winter) or midnight (summer) UTC.
    assert {s.astimezone(UTC).hour for s in starts} <= {0, 1}


def test_a_round_triggered_through_the_api_completes_with_artifacts(served: Served) -> None:
    """What a user does in the UI: press Run on the round deployment, with its defaults. Its
    flow run reports to the one server that `xopd serve` started (two servers cancelled every
    run), trains the round after the newest on disk, is named and tagged after it, and its
    log shows the progress and the gate's decision."""
    listening = {  # the process tree's servers: whatever listens on a port
        (p.pid, c.laddr.port)
        for p in psutil.Process(served.proc.pid).children(recursive=True)
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert [port for _, port in listening] == [served.port]
    with temporary_settings(updates={PREFECT_API_URL: served.api}):
        run = run_deployment("xopd-round/round", timeout=300, poll_interval=1)
        assert run.state is not None and run.state.is_completed(), (run.state, served.tail())
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run.id)
            keys = {a.key for a in client.read_artifacts() if a.flow_run_id == run.id}
            of_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id]))
            expected = [
                "round 1: validating the data",
                "round 1: training from models/student: xopd, 1 steps",
                "round 1: train step 1/1  loss ",
                "round 1: speech Avg-Drop ",
                "round 1: gate: ",
            ]
            deadline = time.monotonic() + 30  # logs reach the server in batches
            while True:
                logs = [entry.message for entry in client.read_logs(of_run)]
                missing = [x for x in expected if not any(m.startswith(x) for m in logs)]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(1)
    assert {"round-1", "validation-report"} <= keys
    assert (served.work / "models" / "rounds" / "round1" / "model.safetensors").is_file()
    assert run.name == f"round-1-{date.today().isoformat()}"
    assert {"xopd", "round-1", "method-xopd"} <= set(run.tags)
    assert not missing, (missing, logs)


PROBE = """
import sys
from flows.server import ServeApi
api = ServeApi(port=int(sys.argv[1]))
from prefect.settings import get_current_settings
print("decided", api.url, api.started, get_current_settings().api.url)
"""


@pytest.mark.parametrize("source", ["environment", "profile", "prefect.toml"])
def test_serve_uses_the_api_a_user_configured(source: str, tmp_path: Path) -> None:
    """No server of its own, and Prefect in the serving process agrees on the URL."""
    configured = "http://127.0.0.1:9/api"  # nothing listens: serve must not probe it
    home = tmp_path / "prefect-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PREFECT_HOME": str(home), "PYTHONPATH": str(REPO)}
    if source == "environment":
        env["PREFECT_API_URL"] = configured
    elif source == "profile":
        (home / "profiles.toml").write_text(
            f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{configured}"\n'
        )
    else:
        (tmp_path / "prefect.toml").write_text(f'[api]\nurl = "{configured}"\n')
    port = free_port()
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(port)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert f"decided {configured} False {configured}" in out.stdout, out.stdout + out.stderr
    assert not healthy(f"http://127.0.0.1:{port}/api")


def test_tests_use_a_private_prefect_home() -> None:
    """tests/conftest.py points Prefect (here and in every subprocess) away from the user's
    home: `xopd run` in tests/tasks/test_cli.py once wrote a failed run into it."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_MEMO_STORE_PATH,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
    )

    home = Path(PREFECT_HOME.value()).resolve()
    assert home != (Path.home() / ".prefect").resolve()
    assert Path(os.environ["PREFECT_HOME"]).resolve() == home
    # Where a failed run's exception is persisted, and the server's memo store: in it too.
    for written in (PREFECT_RESULTS_LOCAL_STORAGE_PATH, PREFECT_MEMO_STORE_PATH):
        assert home in Path(written.value()).resolve().parents, written.name
    assert "PREFECT_API_URL" not in os.environ and "PREFECT_PROFILE" not in os.environ


def test_a_round_on_a_work_pool_is_run_by_a_worker(
    tmp_path: Path, flow_params: Params, tiny_world: Path, tiny_teacher, tiny_student
) -> None:
    """`xopd serve --pool NAME` registers the deployments on a (new, process) work pool and
    runs nothing itself; a worker on loopback (`prefect worker start --pool NAME`) picks up
    a round triggered through the API, runs it from the installed package and it completes."""
    work = lay_out_work(tmp_path / "work", tiny_world, tiny_teacher, tiny_student)
    pool = "xopd-test-pool"
    with xopd_serve(tmp_path, flow_params, work, "--pool", pool) as served:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env |= {
            "PREFECT_API_URL": served.api,
            "PREFECT_HOME": str(tmp_path / "worker-home"),
            "PREFECT_WORKER_QUERY_SECONDS": "1",
        }
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool],
                cwd=tmp_path,  # not the repository: the flows come from the package
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            with (
                temporary_settings(updates={PREFECT_API_URL: served.api}),
                get_client(sync_client=True) as client,
            ):
                deployment = client.read_deployment_by_name("xopd-round/round")
                assert deployment.work_pool_name == pool
                assert deployment.entrypoint == "flows.round.xopd_round"
                assert client.read_work_pool(pool).type == "process"
                run = run_deployment("xopd-round/round", timeout=300, poll_interval=1)
            tail = log.read_text(errors="replace")[-3000:]
            assert run.state is not None and run.state.is_completed(), (run.state, tail)
            assert str(run.id) in log.read_text(errors="replace")  # this worker ran it
        finally:
            worker.terminate()
            try:
                worker.wait(60)
            except subprocess.TimeoutExpired:  # still running a flow: no orphan left behind
                worker.kill()
                worker.wait()
    assert (work / "models" / "rounds" / "round1" / "model.safetensors").is_file()
    assert "registered on work pool 'xopd-test-pool'" in served.log.read_text()
