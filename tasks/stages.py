"""The pipeline's stages as `dvc.yaml` declares them, read through DVC's own loader: their
order, the params.yaml groups each reads and what each writes. The flows take the stage list
and each stage's params from here rather than restating them."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

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


def stage_names() -> tuple[str, ...]:
    return tuple(s.name for s in pipeline())


def stage_params(name: str) -> tuple[str, ...]:
    """The params groups `name` reads (none for a stage dvc.yaml does not have)."""
    return next((s.params for s in pipeline() if s.name == name), ())
