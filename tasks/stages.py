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
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import ModuleType
from typing import Any

import yaml

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


def _overlap(a: str, b: str) -> bool:
    """The same path, or one inside the other (how DVC links an output to a dependency)."""
    pa, pb = PurePosixPath(os.path.normpath(a)), PurePosixPath(os.path.normpath(b))
    return pa == pb or pa in pb.parents or pb in pa.parents


def _links(params: Params, root: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Each stage's (deps, outs) paths in dvc.yaml's order, interpolated with `params` by
    DVC's own resolver."""
    from dvc.parsing.context import Context

    own = Path(root) / "dvc.yaml"
    table = yaml.safe_load((own if own.is_file() else PIPELINE_FILE).read_text())["stages"]
    context = Context(params.to_yaml_dict())

    def paths(entries: list[Any] | None) -> list[str]:
        keys = (e if isinstance(e, str) else next(iter(e)) for e in entries or [])
        return [context.resolve_str(k) for k in keys]

    return {
        name: (paths(t.get("deps")), paths(t.get("outs")) + paths(t.get("metrics")))
        for name, t in table.items()
    }


def _feeds(links: dict[str, tuple[list[str], list[str]]], a: str, b: str) -> bool:
    """Does stage `a` write something stage `b` reads?"""
    return any(_overlap(o, d) for o in links[a][1] for d in links[b][0])


def needed(params: Params, root: Path) -> tuple[str, ...]:
    """The stages a run needs, in order: the pipeline's ends (the stages nothing reads from
    with the default `inputs`: the report, and any stage added after it) and each stage
    that writes what a needed stage reads, with the run's params. So `inputs` pointed at
    your own data and models leave the mini world's builders (synth, teacher, student) out,
    as `dvc repro report` does."""
    default = params.model_copy(update={"inputs": type(params.inputs)()})
    plain, links = _links(default, root), _links(params, root)
    names = list(links)
    wanted = {n for n in names if not any(_feeds(plain, n, m) for m in names if m != n)}
    for name in reversed(names):
        if any(_feeds(links, name, w) for w in wanted if w != name):
            wanted.add(name)
    return tuple(n for n in names if n in wanted)


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
