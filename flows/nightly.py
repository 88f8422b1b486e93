"""Prefect flow `xopd-nightly`: one more round, the next after the newest one on disk.

Only one run may write a work folder at a time: the nightly run takes the folder's lock
(`.xopd.lock`, see xopd_core/lock.py), waits up to `wait_s` for a run in progress, and
otherwise stops with a message naming the holder — it never writes beside another run.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from prefect import flow

from flows.round import LOCK, xopd_round
from xopd_core.config import Params
from xopd_core.lock import exclusive


def next_round(workdir: Path) -> int:
    """1 + the newest completed round's number (a round is complete once its checkpoint is)."""
    done = [
        int(m.group(1))
        for p in (workdir / "models").glob("round*/model.safetensors")
        if (m := re.fullmatch(r"round(\d+)", p.parent.name))
    ]
    return max(done, default=0) + 1


@flow(name="xopd-nightly")
def xopd_nightly(
    params: Params,
    workdir: str = ".",
    engine: Literal["hf", "vllm"] = "hf",
    wait_s: float = 0.0,
) -> dict[str, Any]:
    root = Path(workdir)
    with exclusive(root / LOCK, timeout_s=wait_s, what="xopd run"):
        k = next_round(root)
        return xopd_round(params, round=k, workdir=workdir, engine=engine, lock=False)
