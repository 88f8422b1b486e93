"""The `synth` stage: generate the mini world (audio + train/eval/para_eval manifests)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tasks.layout import DATA
from tasks.progress import utterance_bar
from xopd_core.config import Params
from xopd_core.data.world import WorldSummary, synthesize_world


def synth(
    params: Params, out_dir: Path, progress: Callable[[int, int], None] | None = None
) -> WorldSummary:
    """Write the mini world to `out_dir` (replaced atomically); return its summary."""
    return synthesize_world(params.synth, Path(out_dir), progress=progress)


def run(params: Params, root: Path, progress: bool = False) -> str:
    """The stage on the work folder `root` (dvc.yaml's paths)."""
    summary = synth(params, root / DATA, progress=utterance_bar("synth") if progress else None)
    return f"{summary.describe()} → {root / DATA}"
