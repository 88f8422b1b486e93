"""Deployments served for real: a serve loop in its own process against the test server,
a run triggered through the API the UI uses, completed, with its artifacts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL
from prefect.utilities.callables import parameter_schema

from flows.nightly import xopd_nightly
from flows.serve import deployments
from xopd_core.config import Params

REPO = Path(__file__).resolve().parents[2]
SERVE = """
import sys
from prefect import serve
from flows.nightly import xopd_nightly
from flows.serve import deployments
from xopd_core.config import load_params
serve(*deployments(load_params(sys.argv[1]), sys.argv[2]))
"""


def test_deployments_carry_the_schedule_params_and_a_concurrency_limit(tmp_path: Path) -> None:
    params = Params.model_validate({"nightly": {"cron": "30 3 * * 1"}})
    nightly, round_, campaign, study = deployments(params, str(tmp_path))
    assert [d.name for d in (nightly, round_, campaign, study)] == [
        "nightly",
        "round",
        "campaign",
        "study",
    ]
    assert nightly.schedules[0].schedule.cron == "30 3 * * 1"
    assert nightly.parameters["params"]["nightly"]["cron"] == "30 3 * * 1"
    assert all(d.concurrency_limit == 1 for d in (nightly, round_, campaign, study))
    # The UI renders a typed form for the params from the flow's parameter schema.
    schema = parameter_schema(xopd_nightly).model_dump()
    assert schema["properties"]["params"]["$ref"].endswith("/Params")
    assert "TrainParams" in schema["definitions"] and "lmbda" in str(schema["definitions"])


def test_a_run_triggered_through_the_api_completes_with_artifacts(
    prefect_server, flow_params: Params, work: Path, tmp_path: Path
) -> None:
    params = flow_params
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params.to_yaml_dict()))
    env = {
        **os.environ,
        "PREFECT_API_URL": str(PREFECT_API_URL.value()),
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
        "PYTHONPATH": str(REPO),
    }
    server = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(params_file), str(work)], cwd=REPO, env=env
    )
    try:
        with get_client(sync_client=True) as client:  # wait for the serve loop to register
            deadline = time.monotonic() + 180
            while True:
                assert server.poll() is None, "the serve process exited"
                try:
                    client.read_deployment_by_name("xopd-nightly/nightly")
                    break
                except ObjectNotFound:
                    assert time.monotonic() < deadline, "deployments never registered"
                    time.sleep(0.5)
            before = {r.id for r in client.read_flow_runs()}
        run = run_deployment("xopd-nightly/nightly", timeout=600, poll_interval=1)
        assert run.state is not None and run.state.is_completed(), run.state
        with get_client(sync_client=True) as client:
            ours = {r.id for r in client.read_flow_runs()} - before  # the run and its subflow
            keys = {a.key for a in client.read_artifacts() if a.flow_run_id in ours}
        assert run.id in ours and {"round-1", "validation-report"} <= keys
        assert (work / "models" / "rounds" / "round1" / "model.safetensors").is_file()
    finally:
        server.terminate()
        server.wait(30)


def test_serve_starts_a_local_server_when_none_is_configured(monkeypatch, tmp_path: Path) -> None:
    import socket

    from flows.serve import ensure_server
    from flows.server import healthy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = f"http://127.0.0.1:{port}/api"
    # setenv first, so that the URL ensure_server writes is undone after the test (a bare
    # delenv of an absent variable records nothing, and the dead server's URL would leak).
    monkeypatch.setenv("PREFECT_API_URL", "")
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))  # the server's database goes here
    proc = ensure_server(api, timeout_s=120)
    try:
        assert proc is not None and healthy(api)
        assert os.environ["PREFECT_API_URL"] == api
        assert ensure_server(api) is None  # already configured: nothing more is started
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
