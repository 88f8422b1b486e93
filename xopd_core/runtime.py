"""Process-wide settings every entry point applies first: no telemetry, no hub downloads.

Only loopback traffic is allowed at run time (DESIGN.md §5); these variables make the
libraries we use behave accordingly. Existing values win, so a user can still opt in.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping

OFFLINE_ENV: dict[str, str] = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "AWS_EC2_METADATA_DISABLED": "true",
    # Not network: keeps transformers' per-load "Loading weights" bars out of run logs.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def apply_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """In a child process: ask Linux to send it `sig` when the thread that forked it exits,
    so a parent killed without clean-up (kill -9, the OOM killer) leaves no orphan holding
    its memory. Exits at once if the parent is already gone. No-op off Linux."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)
    if os.getppid() != parent or parent == 1:  # it died before the request took hold
        os._exit(1)


def launched_rank() -> tuple[int, int] | None:
    """(rank, world size) when a launcher started this process as one rank of several
    (torchrun, or any launcher that sets RANK and WORLD_SIZE, such as a Kubernetes
    PyTorchJob); None otherwise."""
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError) as err:
        raise RuntimeError(
            f"RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: a "
            "launcher sets both as integers (torchrun does); unset both to run alone"
        ) from err


# What a launcher (torchrun) sets for each rank it starts.
_LAUNCHER_VARS = frozenset(
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
     "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")
)  # fmt: skip


def without_launcher(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less a launcher's rank variables (torchrun's and TORCHELASTIC_*), for a process
    that is not one of its ranks: a vLLM engine, or a new launch."""
    return {
        k: v
        for k, v in env.items()
        if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")
    }
