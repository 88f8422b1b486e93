"""The temporary Prefect server of `xopd run`, started as the process starts.

With no API configured, Prefect starts a temporary server when a flow first needs one and
waits for it: ~10 s on 2 cores (half of it the server importing itself) in which the run does
nothing else. `xopd run` starts a server the public way (`prefect server start`, API only)
before it imports torch, transformers and the stages, so both proceed at once on the two
cores; the campaign then runs against it, and it stops when the run ends. Where an API is configured
(PREFECT_API_URL, a profile, prefect.toml) or temporary servers are turned off, it is stopped
unused and Prefect does what it is configured to do.

`ServeApi` is the API of `xopd serve`: the one Prefect is configured with, or else one
`prefect server start` on loopback (UI and scheduler included), decided and exported as
PREFECT_API_URL before prefect is imported, since Prefect fixes its settings at import.

Nothing here imports prefect at module level: that import is part of what the start overlaps.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

from xopd_core.runtime import die_with_parent

# `prefect server start` as Prefect's own temporary server runs: API only (no UI, no
# background services), analytics off. Timed against Prefect's private start-up path (uvicorn
# on `prefect.server.api.server:create_app`), both came up in 9.2–10.4 s on 2 busy cores.
SERVER_OPTIONS = ("--no-ui", "--no-services", "--analytics-off", "--log-level", "ERROR")
RELAUNCHES = 3  # a port taken between choosing it and binding it: try another


def _server_dies_with_parent() -> None:
    """In the server child, before exec: SIGTERM it when its parent dies, so a killed
    `xopd run` (kill -9: no atexit) leaves no orphaned server."""
    die_with_parent(signal.SIGTERM)


def healthy(api: str, timeout_s: float = 2.0) -> bool:
    """Does a Prefect API answer its health check at `api` (loopback)?"""
    try:
        with urllib.request.urlopen(f"{api}/health", timeout=timeout_s) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def _port_taken(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EarlyServer:
    """A Prefect API server on a free loopback port, started unless PREFECT_API_URL is set."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.api = ""
        self.port = 0
        if not os.environ.get("PREFECT_API_URL"):
            self._launch()
            atexit.register(self.stop)

    def _launch(self) -> None:
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        command = ["server", "start", "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(  # stdout: its banner, which is not for `xopd run`'s user
            [sys.executable, "-m", "prefect", *command, *SERVER_OPTIONS],
            stdout=subprocess.DEVNULL,
            preexec_fn=_server_dies_with_parent,
        )

    def wait(self, timeout_s: float) -> None:
        """Until the server answers; a port taken meanwhile means a fresh start on another."""
        deadline = time.monotonic() + timeout_s
        relaunches = 0
        while not healthy(self.api, timeout_s=1.0):
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None and relaunches < RELAUNCHES and _port_taken(self.port):
                relaunches += 1
                self._launch()
            elif code is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the temporary Prefect server did not come up at {self.api} "
                    f"({'exit status ' + str(code) if code is not None else 'timed out'}); "
                    "set PREFECT_API_URL to use a running server"
                )
            time.sleep(0.1)

    @contextlib.contextmanager
    def serving(self) -> Iterator[str | None]:
        """Prefect pointed at this server inside the block (yields its API URL), or at what
        Prefect is configured to use (yields None); the server stops on leaving."""
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            temporary_settings,
        )

        try:
            configured = PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value()
            if self.proc is None or configured:
                self.stop()
                yield None
                return
            # Prefect's own start-up timeout, or a minute: this machine can be slow.
            self.wait(max(60.0, float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())))
            with temporary_settings(updates={PREFECT_API_URL: self.api}):
                try:
                    yield self.api
                finally:
                    _drain_to_server()
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def _drain_to_server(timeout_s: float = 30.0) -> None:
    """Send the run's queued logs and events before the server goes (as Prefect's test
    harness does): stopped first, Prefect retried them against the closed port at exit (over
    a minute in one profiled tiny run) and then dropped them ("Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)


def configured_api_url() -> str | None:
    """The API URL Prefect is configured with: PREFECT_API_URL in the environment, the active
    profile, or prefect.toml / pyproject.toml's [tool.prefect] in the current folder. Read by
    Prefect's own settings loader in a child process, so that this one has not imported
    prefect when the URL is decided."""
    if url := os.environ.get("PREFECT_API_URL"):
        return url
    probe = "from prefect.settings import get_current_settings as s; print('api=', s().api.url)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False
    )
    urls = [line[5:] for line in out.stdout.splitlines() if line.startswith("api= ")]
    if out.returncode != 0 or not urls:
        raise RuntimeError(f"could not read Prefect's settings: {out.stderr.strip()[-2000:]}")
    return None if urls[-1] in ("", "None") else urls[-1]


class ServeApi:
    """The Prefect API that `xopd serve` registers its deployments with and its flow runs
    report to: the configured one, else a server already answering on 127.0.0.1:`port`,
    else one `prefect server start` there (stopped by `stop`). Exported as PREFECT_API_URL
    before prefect is imported: imported first, Prefect would start a temporary server of
    its own for this process while the flow runs it spawns talked to this one, and every
    deployment run was cancelled ("Deployment concurrency slot lost during provisioning")."""

    def __init__(self, port: int = 4200) -> None:
        if "prefect" in sys.modules:
            raise RuntimeError("ServeApi must decide the API before prefect is imported")
        self.proc: subprocess.Popen[bytes] | None = None
        configured = configured_api_url()
        self.url = configured or f"http://127.0.0.1:{port}/api"
        self.started = False
        if not configured and not healthy(self.url):
            command = ["server", "start", "--host", "127.0.0.1", "--port", str(port)]
            # The UI finds its API from these settings, not from the command line: without
            # them a UI served on another port than 4200 asked 4200 and showed nothing.
            env = {
                **os.environ,
                "PREFECT_SERVER_API_HOST": "127.0.0.1",
                "PREFECT_SERVER_API_PORT": str(port),
            }
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "prefect", *command],
                env=env,
                preexec_fn=_server_dies_with_parent,
            )
            self.started = True
        os.environ["PREFECT_API_URL"] = self.url

    def wait(self, timeout_s: float = 180.0) -> None:
        """Until the server started here answers (a configured one is Prefect's business)."""
        deadline = time.monotonic() + timeout_s
        while self.proc is not None and not healthy(self.url, timeout_s=1.0):
            code = self.proc.poll()
            if code is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the Prefect server did not come up at {self.url} "
                    f"({'exit status ' + str(code) if code is not None else 'timed out'}); "
                    "is the port taken? Set PREFECT_API_URL to use a running server"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop the server started here (idempotent)."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
