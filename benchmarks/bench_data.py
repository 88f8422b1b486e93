"""The data stages at their default size: synth (target < 60 s on 2 cores) and validate.

Absolute seconds are reported for the target the issue sets; the comparison that does not
depend on the machine's mood is the ratio of 2-worker to 1-worker synthesis on one subset,
measured back to back in this run.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from xopd_core.config import Params, ValidateParams
from xopd_core.data.manifest import manifest_path
from xopd_core.data.validation import validate_dataset
from xopd_core.data.world import synthesize_world

SYNTH_BUDGET_S = 60.0


def _timed_synth(params: Any, out: Path) -> float:
    start = time.perf_counter()
    synthesize_world(params, out)
    return time.perf_counter() - start


def run() -> dict[str, Any]:
    defaults = Params()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subset = defaults.synth.model_copy(
            update={
                "train_per_task": 40,
                "eval_per_task": 10,
                "para_train_per_task": 10,
                "para_eval_per_task": 10,
            }
        )
        one = _timed_synth(subset.model_copy(update={"workers": 1}), root / "w1")
        two = _timed_synth(subset.model_copy(update={"workers": 2}), root / "w2")

        full = _timed_synth(defaults.synth, root / "full")
        manifests = [manifest_path(root / "full", s) for s in ("train", "eval", "para_eval")]
        start = time.perf_counter()
        report = validate_dataset(manifests, root / "full", ValidateParams())
        validate_s = time.perf_counter() - start
        n = report.n_rows
    return {
        "cpus": os.cpu_count(),
        "default_world_utterances": n,
        "synth_seconds": round(full, 2),
        "synth_utterances_per_s": round(n / full, 1),
        "synth_speedup_2_workers_vs_1": round(one / two, 2),
        "validate_seconds": round(validate_s, 2),
        "validate_rows_per_s": round(n / validate_s, 1),
        "validation_passed": report.success,
        "targets": [
            {
                "what": "default synth under 60 s",
                "value": round(full, 2),
                "met": full < SYNTH_BUDGET_S,
            },
        ],
    }
