"""Session fixtures: a tiny mini world synthesised once (real espeak-ng + sox), and a
private Prefect home for the whole session."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from xopd_core.config import Params, SynthParams
from xopd_core.data.world import synthesize_world
from xopd_core.runtime import apply_offline_env

apply_offline_env()


def _private_prefect_home() -> None:
    """Point Prefect, here and in every subprocess the tests start, at a throwaway home with
    no profile and no API URL, so that no test writes into the user's Prefect history or
    talks to their server. Before any test module imports prefect: it reads its settings
    once, at import."""
    if "prefect" in sys.modules:
        raise RuntimeError("prefect was imported before tests/conftest.py could isolate it")
    home = tempfile.mkdtemp(prefix="xopd-tests-prefect-home-")
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["PREFECT_HOME"] = home
    # Prefect 3.7.7 keeps persisted results and the memo store under ~/.prefect even with
    # PREFECT_HOME set (its defaults do not see the home setting): name them too.
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(Path(home) / "storage")
    os.environ["PREFECT_MEMO_STORE_PATH"] = str(Path(home) / "memo_store.toml")
    for key in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        os.environ.pop(key, None)


_private_prefect_home()


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
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The test runs in its tmp_path: a command run in-process locks its work folder (`.`),
    which must not be the repository, where another pytest worker's command may hold the
    lock (`make test` runs two)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture()
def world_copy(tiny_world: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny world that a test may corrupt."""
    dst = tmp_path / "mini"
    shutil.copytree(tiny_world, dst)
    return dst


from tests.browser import page  # noqa: E402
from tests.pipeline_fixtures import tiny_pipeline_params, tiny_student, tiny_teacher  # noqa: E402
from tests.remote_fixtures import aws_env, dvc_repo, s3  # noqa: E402

__all__ = [
    "aws_env",
    "dvc_repo",
    "page",
    "s3",
    "tiny_pipeline_params",
    "tiny_student",
    "tiny_teacher",
]
