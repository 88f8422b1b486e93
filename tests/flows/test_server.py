"""`xopd run`'s temporary Prefect server: started before the heavy imports, used by the
campaign when nothing else is configured, left alone when something is, always stopped."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from uuid import UUID

import pytest
from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings

import flows.server
from flows.server import EarlyServer, healthy
from tests.orphans import child_outlives_a_killed_parent


@flow(name="early-server-probe")
def _probe() -> str:
    ctx = FlowRunContext.get()
    assert ctx is not None and ctx.flow_run is not None
    get_run_logger().info("probe ran")
    return str(ctx.flow_run.id)


def test_the_early_server_runs_the_flows_and_stops(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "")
    monkeypatch.delenv("PREFECT_API_URL")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))  # the server's database goes here
    server = EarlyServer()
    proc = server.proc
    assert proc is not None and server.api.startswith("http://127.0.0.1:")
    # Nothing configured, even if another test's harness is still up in this session.
    with temporary_settings(restore_defaults={PREFECT_API_URL}), server.serving() as api:
        assert api == server.api and healthy(api)
        run_id = _probe()
        with get_client(sync_client=True) as client:  # the run is recorded on this server
            assert str(client.api_url).rstrip("/") == api
            state = client.read_flow_run(UUID(run_id)).state
            assert state is not None and state.is_completed()
    assert server.proc is None and proc.poll() is not None
    # Its logs reached the server before it stopped (its database outlives it).
    with sqlite3.connect(tmp_path / "prefect.db") as db:
        (logged,) = db.execute(
            "SELECT count(*) FROM log WHERE flow_run_id = ?", (run_id,)
        ).fetchone()
    assert logged >= 1
    assert not healthy(server.api)


def test_a_configured_api_is_left_to_prefect(monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    server = EarlyServer()
    assert server.proc is None  # nothing started
    with server.serving() as api:
        assert api is None


def test_an_api_set_in_prefect_settings_stops_the_early_server(monkeypatch, prefect_server) -> None:
    """The test harness configures its API through Prefect's settings, as a profile or
    prefect.toml would, not the environment: the early server is stopped unused."""
    monkeypatch.setenv("PREFECT_API_URL", "")
    monkeypatch.delenv("PREFECT_API_URL")
    server = EarlyServer()
    proc = server.proc
    assert proc is not None
    with server.serving() as api:
        assert api is None
        assert proc.poll() is not None  # stopped before the block ran


def test_xopd_run_starts_the_server_before_the_imports() -> None:
    """The point of it: `xopd run` has launched the server before torch is imported."""
    code = (
        "import sys, flows.cli as c, flows.server as s\n"
        "seen = []\n"
        "class Probe(s.EarlyServer):\n"
        "    def _launch(self):\n"
        "        seen.append('torch' in sys.modules)\n"
        "        raise SystemExit(0 if seen == [False] else 1)\n"
        "s.EarlyServer = Probe\n"
        "c.main(['run'])\n"
    )
    repo = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=repo,
        env={**os.environ, "PREFECT_API_URL": "", "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr


def test_a_server_that_dies_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "")
    monkeypatch.delenv("PREFECT_API_URL")
    server = EarlyServer()
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait()
    server.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
    with pytest.raises(RuntimeError, match=r"did not come up .*exit status 1.*PREFECT_API_URL"):
        server.wait(timeout_s=30)
    assert server.proc is None


def test_a_port_taken_before_the_server_binds_it_is_exchanged_for_another(monkeypatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = [taken.getsockname()[1]]
    real_free_port = flows.server._free_port
    monkeypatch.setattr(
        flows.server, "_free_port", lambda: ports.pop() if ports else real_free_port()
    )
    server = EarlyServer()
    try:
        assert server.api.endswith(f":{taken.getsockname()[1]}/api")
        server.wait(timeout_s=120)  # the first start fails on the taken port; the second binds
        assert healthy(server.api) and not server.api.endswith(f":{taken.getsockname()[1]}/api")
    finally:
        server.stop()
        taken.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_killed_run_takes_its_server_with_it() -> None:
    """kill -9 of `xopd run` runs no atexit: the server must not stay behind, orphaned."""
    code = (
        "import time\n"
        "from flows.server import EarlyServer\n"
        "s = EarlyServer()\n"
        "print(s.proc.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    assert not child_outlives_a_killed_parent(code, {"PREFECT_API_URL": ""}), (
        "the server outlived the run that started it"
    )
