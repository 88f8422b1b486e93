"""Prefect flow `xopd-nightly`: one more round, the next after the newest one on disk.

Only one run may write a work folder at a time: the nightly run takes the folder's lock
(`.xopd.lock`, see xopd_core/lock.py), waits up to `wait_s` for a run in progress, and
otherwise stops with a message naming the holder — it never writes beside another run.

The nightly round extends the campaign: afterwards it sets `campaign.rounds` in the work
folder's params.yaml to the rounds on disk (so params.yaml, dvc.lock and the folder agree and
`dvc repro` keeps the rounds), records them in DVC, commits the lineage of a promoted round
to `nightly.lineage_branch`, and pushes it to the remote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from flows.publish import publish
from flows.round import next_round, run_name, tag_run, xopd_round
from tasks.layout import LOCK
from tasks.record import advance_rounds, is_dvc_repo, params_in_sync
from xopd_core.config import CampaignParams, Params
from xopd_core.lock import exclusive


def nightly_run_name() -> str:
    return run_name("nightly")


@flow(name="xopd-nightly", flow_run_name=nightly_run_name)
def xopd_nightly(
    params: Params,
    workdir: str = ".",
    wait_s: float = 0.0,
) -> dict[str, Any]:
    """One more round after the newest on disk, recorded in DVC, its lineage committed and
    pushed when it is promoted.

    Args:
        params: The settings (params.yaml); the round reads `train`, `eval` and `gate`.
        workdir: The work folder, laid out like the repository (data/, models/, reports/).
        wait_s: How long to wait for a run that holds the work folder before giving up.
    """
    root = Path(workdir)
    with exclusive(root / LOCK, timeout_s=wait_s, what="xopd run"):
        k = next_round(root)
        tag_run("nightly", f"round-{k}", f"method-{params.train.method}")
        result = xopd_round(params=params, round=k, workdir=workdir, lock=False, record=False)
        ran_with = params.model_copy(update={"campaign": CampaignParams(rounds=k)})
        if is_dvc_repo(root) and params_in_sync(root, params, ignore_rounds=True):
            advance_rounds(root, k)
        promoted = bool(result["promoted"])
        lineage = k if promoted else None
        out = publish(ran_with, root, promoted, lineage_round=lineage, one_round=True)
    return {**result, **out}
