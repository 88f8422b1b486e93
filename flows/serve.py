"""Deployments of the flows, and serving them: what `xopd serve` / `make ui` run.

`deployments()` builds four: `xopd-nightly/nightly` on the cron of `nightly.cron`,
`xopd-round/round`, `xopd-campaign/campaign` and `xopd-study/study` on demand. Each carries
the resolved params as its default (the UI renders them as a typed form) and a concurrency
limit of 1. `serve()` starts a local Prefect server on loopback when no API is configured,
then serves them: open the printed URL and press Run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from prefect import serve as prefect_serve

from flows.campaign import xopd_campaign
from flows.nightly import xopd_nightly
from flows.round import xopd_round
from flows.server import healthy
from flows.study import xopd_study
from xopd_core.config import Params

LOCAL_API = "http://127.0.0.1:4200/api"


def deployments(params: Params, workdir: str) -> list[Any]:
    defaults = {"params": params.to_yaml_dict(), "workdir": str(Path(workdir).resolve())}
    return [
        xopd_nightly.to_deployment(
            name="nightly",
            cron=params.nightly.cron,
            parameters={**defaults, "wait_s": params.nightly.wait_s},
            concurrency_limit=1,
            description="One more X-OPD round after the newest, every night.",
        ),
        xopd_round.to_deployment(
            name="round", parameters={**defaults, "round": 1}, concurrency_limit=1
        ),
        xopd_campaign.to_deployment(name="campaign", parameters=defaults, concurrency_limit=1),
        xopd_study.to_deployment(
            name="study",
            parameters=defaults,
            concurrency_limit=1,
            description="The methods side by side at an equal token budget (README: Study).",
        ),
    ]


def ensure_server(api: str = LOCAL_API, timeout_s: float = 60.0) -> subprocess.Popen[bytes] | None:
    """Start `prefect server start` on loopback unless PREFECT_API_URL is set or a server
    already answers at `api`; returns the process it started (or None)."""
    if os.environ.get("PREFECT_API_URL") or healthy(api):
        os.environ.setdefault("PREFECT_API_URL", api)
        return None
    port = str(urllib.parse.urlsplit(api).port or 4200)
    command = ["prefect", "server", "start", "--host", "127.0.0.1", "--port", port]
    proc = subprocess.Popen([sys.executable, "-m", *command])
    deadline = time.monotonic() + timeout_s
    while not healthy(api):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the local Prefect server did not come up at {api}")
        time.sleep(0.5)
    os.environ["PREFECT_API_URL"] = api
    return proc


def serve(params: Params, workdir: str) -> None:
    server = ensure_server()
    ui = os.environ["PREFECT_API_URL"].removesuffix("/api")
    print(
        f"Prefect UI: {ui}  (deployments: xopd-nightly/nightly, xopd-round/round, "
        "xopd-campaign/campaign, xopd-study/study)",
        flush=True,
    )
    try:
        prefect_serve(*deployments(params, workdir))
    finally:
        if server is not None:
            server.terminate()
