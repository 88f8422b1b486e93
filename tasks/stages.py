"""The pipeline's stages as `dvc.yaml` declares them, read through DVC's own loader: their
order, the params.yaml groups each reads and what each writes. The flows take the stage list
and each stage's params from here rather than restating them.

A stage named NAME is run by `tasks/NAME.py`'s `run(params, root, progress=False) -> str`
(on the work folder `root`, laid out as in tasks/layout.py; returns a line saying what it
wrote); dvc.yaml calls it as `xopd stage NAME` and the campaign calls the same function. A
module may add `built(params, root) -> bool` for when its outputs on disk are not the whole
answer (the rounds: every round of `campaign.rounds`)."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from xopd_core.config import Params

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "dvc.yaml"


@dataclass(frozen=True)
class Stage:
    name: str
    params: tuple[str, ...]  # params.yaml groups, as `Params` names its fields
    outs: tuple[str, ...]  # paths relative to the work folder


@functools.cache
def pipeline(dvc_yaml: Path = PIPELINE_FILE) -> tuple[Stage, ...]:
    """The stages of `dvc_yaml`, in its order (DVC's loader; ~0.5 s once per process)."""
    from dvc.dvcfile import load_file
    from dvc.repo import Repo

    fields = {f.alias or name: name for name, f in Params.model_fields.items()}
    with Repo(str(dvc_yaml.parent)) as repo:
        stages = load_file(repo, str(dvc_yaml)).stages.values()
        return tuple(
            Stage(
                s.name,
                tuple(
                    fields[key.split(".")[0]]
                    for dep in s.deps
                    if hasattr(dep, "params")
                    for key in dep.params
                ),
                tuple(str(out.def_path) for out in s.outs),
            )
            for s in stages
        )


def stage_names(root: Path = PIPELINE_FILE.parent) -> tuple[str, ...]:
    """The stages of the work folder `root` (its dvc.yaml, else the package's)."""
    return tuple(s.name for s in pipeline_of(root))


def pipeline_of(root: Path) -> tuple[Stage, ...]:
    """The work folder's own stages when it has a dvc.yaml, else the package's."""
    own = Path(root) / "dvc.yaml"
    return pipeline(own.resolve()) if own.is_file() else pipeline()


Runner = Callable[..., str]


def _module(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"tasks.{name}")
    except ModuleNotFoundError as err:
        raise ValueError(f"stage {name!r}: no module tasks/{name}.py ({err})") from err


def runner(name: str) -> Runner:
    """`tasks/<name>.py`'s `run`; a ValueError naming what is missing otherwise."""
    run = getattr(_module(name), "run", None)
    if not callable(run):
        raise ValueError(f"stage {name!r}: tasks/{name}.py has no run(params, root)")
    return run  # type: ignore[no-any-return]


def built(stage: Stage, params: Params, root: Path) -> bool:
    """Without DVC: are the stage's outputs on disk (its module's `built`, if it has one)?"""
    check = getattr(_module(stage.name), "built", None)
    if check is not None:
        return bool(check(params, root))
    return all((root / out).exists() for out in stage.outs)
