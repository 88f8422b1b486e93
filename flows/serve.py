"""Deployments of the flows, and serving them: what `xopd serve` / `make ui` run.

`deployments()` builds four: `xopd-nightly/nightly` on the cron of `nightly.cron` in
`nightly.timezone`, `xopd-round/round`, `xopd-campaign/campaign` and `xopd-study/study` on
demand, each with a concurrency limit of 1. The nightly, campaign and study deployments carry
the resolved params as their default (the UI renders them as a typed form); the round reads
the work folder's params.yaml, and its form asks only for the round and its `train` and
`gate` settings. `serve()` serves them against the API that `flows.server.ServeApi` decided
before this module (and prefect) was imported: open the printed URL and press Run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import serve as prefect_serve
from prefect.schedules import Cron

from flows.campaign import xopd_campaign
from flows.nightly import xopd_nightly
from flows.round import xopd_round
from flows.server import ServeApi
from flows.study import xopd_study
from xopd_core.config import Params


def deployments(params: Params, workdir: str) -> list[Any]:
    defaults = {"params": params.to_yaml_dict(), "workdir": str(Path(workdir).resolve())}
    return [
        xopd_nightly.to_deployment(
            name="nightly",
            schedules=[Cron(params.nightly.cron, timezone=params.nightly.timezone)],
            parameters={**defaults, "wait_s": params.nightly.wait_s},
            concurrency_limit=1,
            description="One more X-OPD round after the newest, every night.",
            tags=["xopd", "nightly"],
        ),
        xopd_round.to_deployment(  # its form: the round, train, gate; the rest from params.yaml
            name="round",
            parameters={"workdir": defaults["workdir"]},
            concurrency_limit=1,
            description="One X-OPD round: by default the one after the newest on disk.",
            tags=["xopd"],
        ),
        xopd_campaign.to_deployment(
            name="campaign", parameters=defaults, concurrency_limit=1, tags=["xopd"]
        ),
        xopd_study.to_deployment(
            name="study",
            parameters=defaults,
            concurrency_limit=1,
            description="The methods side by side at an equal token budget (README: Study).",
            tags=["xopd"],
        ),
    ]


def serve(params: Params, workdir: str, api: ServeApi) -> None:
    """Serve the deployments until interrupted; the server `api` started stops afterwards."""
    served = deployments(params, workdir)
    try:
        api.wait()
        ui = api.url.removesuffix("/api")
        print(
            f"Prefect UI: {ui}  (deployments: xopd-nightly/nightly, xopd-round/round, "
            "xopd-campaign/campaign, xopd-study/study)",
            flush=True,
        )
        prefect_serve(*served)
    finally:
        api.stop()
