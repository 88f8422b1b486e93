"""Session fixtures: a tiny mini world synthesised once (real espeak-ng + sox)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from xopd_core.config import Params, SynthParams
from xopd_core.data.world import synthesize_world
from xopd_core.runtime import apply_offline_env

apply_offline_env()


def tiny_synth_params(**overrides: object) -> SynthParams:
    base: dict[str, object] = {
        "seed": 7,
        "train_per_task": 4,
        "eval_per_task": 3,
        "para_train_per_task": 3,
        "para_eval_per_task": 2,
        "dev_per_task": 2,
        "para_dev_per_task": 1,
        "text_train_per_task": 25,
        "workers": 2,
    }
    base.update(overrides)
    return SynthParams.model_validate(base)


@pytest.fixture(scope="session")
def tiny_params() -> Params:
    return Params(synth=tiny_synth_params())


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory, tiny_params: Params) -> Path:
    root = tmp_path_factory.mktemp("world") / "mini"
    synthesize_world(tiny_params.synth, root)
    return root


@pytest.fixture()
def world_copy(tiny_world: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny world that a test may corrupt."""
    dst = tmp_path / "mini"
    shutil.copytree(tiny_world, dst)
    return dst


from tests.pipeline_fixtures import tiny_pipeline_params, tiny_student, tiny_teacher  # noqa: E402

__all__ = ["tiny_pipeline_params", "tiny_student", "tiny_teacher"]
