"""Deployments of the flows, and serving them: what `xopd serve` / `make ui` run.

`deployments()` builds four: `xopd-nightly/nightly` on the cron of `nightly.cron` in
`nightly.timezone`, `xopd-round/round`, `xopd-campaign/campaign` and `xopd-study/study` on
demand, each with a concurrency limit of 1. The nightly, campaign and study deployments carry
the resolved params as their default (the UI renders them as a typed form); the round reads
the work folder's params.yaml, and its form asks only for the round and its `train` and
`gate` settings. `serve()` serves them against the API that `flows.server.ServeApi` decided
before this module (and prefect) was imported: open the printed URL and press Run.
`register()` puts the same deployments on a work pool instead, for workers elsewhere
(`xopd serve --pool NAME`; infra/k8s-work-pool.yaml is a Kubernetes pool's job template).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

from prefect import serve as prefect_serve
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from flows.campaign import xopd_campaign
from flows.nightly import xopd_nightly
from flows.round import xopd_round
from flows.server import ServeApi
from flows.study import xopd_study
from xopd_core.config import Params


def deployments(params: Params, workdir: str) -> list[Any]:
    defaults = {"params": params.to_yaml_dict(), "workdir": str(Path(workdir).resolve())}
    # Entrypoints by module (flows.round.xopd_round): a worker anywhere with xopd installed
    # finds them, whatever its working directory.
    by_module = {"entrypoint_type": EntrypointType.MODULE_PATH}
    return [
        xopd_nightly.to_deployment(
            name="nightly",
            **by_module,
            schedules=[Cron(params.nightly.cron, timezone=params.nightly.timezone)],
            parameters={**defaults, "wait_s": params.nightly.wait_s},
            concurrency_limit=1,
            description="One more X-OPD round after the newest, every night.",
            tags=["xopd", "nightly"],
        ),
        xopd_round.to_deployment(  # its form: the round, train, gate; the rest from params.yaml
            name="round",
            **by_module,
            parameters={"workdir": defaults["workdir"]},
            concurrency_limit=1,
            description="One X-OPD round: by default the one after the newest on disk.",
            tags=["xopd"],
        ),
        xopd_campaign.to_deployment(
            name="campaign", parameters=defaults, concurrency_limit=1, tags=["xopd"], **by_module
        ),
        xopd_study.to_deployment(
            name="study",
            **by_module,
            parameters=defaults,
            concurrency_limit=1,
            description="The methods side by side at an equal token budget (README: Study).",
            tags=["xopd"],
        ),
    ]


def register(params: Params, workdir: str, pool: str) -> list[str]:
    """The deployments on work pool `pool`, for its workers to run; a pool of that name is
    created as a `process` pool if there is none (one of another type, e.g. a Kubernetes
    pool made from infra/k8s-work-pool.yaml, is used as it is). Returns their names."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
    names = []
    for deployment in deployments(params, workdir):
        deployment.apply(work_pool_name=pool)
        names.append(f"{deployment.flow_name}/{deployment.name}")
    return names


def serve(params: Params, workdir: str, api: ServeApi, pool: str | None = None) -> None:
    """Serve the deployments until interrupted; the server `api` started stops afterwards.
    With `pool`, register them on that work pool instead (`register`) and, if the server
    is this process's, keep it up until interrupted for the pool's workers."""
    try:
        api.wait()
        if pool is None:
            served = deployments(params, workdir)
            ui = api.url.removesuffix("/api")
            print(
                f"Prefect UI: {ui}  (deployments: xopd-nightly/nightly, xopd-round/round, "
                "xopd-campaign/campaign, xopd-study/study)",
                flush=True,
            )
            prefect_serve(*served)
            return
        names = register(params, workdir, pool)
        print(
            f"registered on work pool {pool!r}: {', '.join(names)}\n"
            f"run them with a worker: PREFECT_API_URL={api.url} prefect worker start "
            f"--pool {pool}",
            flush=True,
        )
        # The workers report to this process's server: keep it until Ctrl-C or SIGTERM
        # (which then stops it through `finally`, as prefect's serve loop does).
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        while api.started:
            time.sleep(3600)
    finally:
        api.stop()
