"""Engines over the tiny random teacher/student of `parts` and the tiny world's audio."""

from __future__ import annotations

from pathlib import Path

import pytest

from xopd_core.data.manifest import manifest_path, read_manifest
from xopd_core.engines.base import Prompt


def prompts_of(world: Path, split: str = "eval") -> list[Prompt]:
    return [
        Prompt(r["id"], r["transcript"], world / r["audio_path"], r["task"], r["answer"])
        for r in read_manifest(manifest_path(world, split))
    ]


@pytest.fixture(scope="session")
def prompts(tiny_world: Path) -> list[Prompt]:
    """Prompts of different lengths (four task families)."""
    return prompts_of(tiny_world)
