"""Process-wide settings every entry point applies first: no telemetry, no hub downloads.

Only loopback traffic is allowed at run time (DESIGN.md §5); these variables make the
libraries we use behave accordingly. Existing values win, so a user can still opt in.
"""

from __future__ import annotations

import os

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
