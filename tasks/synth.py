"""The `synth` stage: generate the mini world (audio + train/eval/para_eval manifests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from xopd_core.config import Params
from xopd_core.data.world import WorldSummary, synthesize_world


def synth(
    params: Params, out_dir: Path, progress: Callable[[int, int], None] | None = None
) -> WorldSummary:
    """Write the mini world to `out_dir` (replaced atomically); return its summary."""
    return synthesize_world(params.synth, Path(out_dir), progress=progress)
