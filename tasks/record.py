"""Recording what a Prefect run produced, so that DVC knows it and it can be reproduced.

- `record`: `dvc commit --force` on the stages a run wrote, which stores their outputs in
  the DVC cache and writes their hashes (with the deps' and params' values) to `dvc.lock`.
  The flows ran the very functions the stages' commands call, with params.yaml's values
  (checked first by `params_in_sync`), so a following `dvc repro` is a no-op and
  `dvc repro --force` rebuilds the same checkpoint hashes.
- `advance_rounds`: the nightly deployment adds one round to the campaign, so it sets
  `campaign.rounds` in params.yaml to the rounds on disk (that one line edited). Otherwise
  params.yaml would describe fewer rounds than the folder holds, and `dvc repro` would
  delete them.
- `commit_lineage`: one commit per promoted nightly round on a dedicated branch
  (`xopd/lineage` by default) holding the code that ran plus that round's params.yaml,
  dvc.lock and champion.json. It is built with git plumbing on a private index, so neither
  the work tree, the index nor HEAD move. Reproduce with
  `git worktree add ../repro <commit> && cd ../repro && dvc repro` (or `dvc pull`).
- `not_recorded_advice`, `git_to_commit`, `git_commit_line`: what a run that could not record
  should tell its user to run, and the git command that keeps what it recorded.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tasks.remote import dvc
from tasks.stages import needed
from xopd_core.config import Params, load_params

PARAMS_FILE = "params.yaml"
LINEAGE_FILES = ("params.yaml", "dvc.lock", "champion.json")


class RecordError(RuntimeError):
    """DVC or git refused to record a run; the message carries their last words."""


def is_dvc_repo(root: Path) -> bool:
    return (root / ".dvc").is_dir() and (root / "dvc.yaml").is_file()


def params_in_sync(root: Path, params: Params, *, ignore_rounds: bool = False) -> bool:
    """Do the params a flow ran with equal the work folder's params.yaml?"""
    path = root / PARAMS_FILE
    if not path.is_file():
        return False
    on_disk = load_params(path)
    if ignore_rounds:
        on_disk = on_disk.model_copy(update={"campaign": params.campaign})
    return on_disk == params


def advance_rounds(root: Path, rounds: int) -> None:
    """Set `campaign.rounds` in params.yaml by editing that one line (comments, layout and
    every other value stay as the user wrote them); the result must load."""
    from xopd_core.atomic import write_text_atomic

    path = root / PARAMS_FILE
    text = path.read_text()
    block = re.search(r"^campaign:[^\n]*\n((?:[ \t]+[^\n]*\n|\n)*)", text, re.MULTILINE)
    line = block and re.search(r"^([ \t]+rounds:[ \t]*)(\d+)", block.group(1), re.MULTILINE)
    if not block or not line:
        raise RecordError(f"{path}: no `campaign.rounds` line to advance")
    at = block.start(1) + line.start(2)
    new = text[:at] + str(rounds) + text[block.start(1) + line.end(2) :]
    _check_loads(new, path)
    write_text_atomic(path, new)


def _check_loads(text: str, path: Path) -> None:
    """Refuse to write a params file that would not load."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / PARAMS_FILE
        probe.write_text(text)
        try:
            load_params(probe)
        except Exception as err:  # any load failure; re-raised naming the real file
            raise RecordError(f"{path}: the updated params would not load ({err})") from err


def _target(root: Path, stage: str) -> str:
    """A stage as an in-process DVC call must name it: DVC resolves a bare stage name
    against the current directory's dvc.yaml, which need not be `root`'s."""
    return f"{Path(root).resolve() / 'dvc.yaml'}:{stage}"


def record(root: Path, stages: list[str]) -> str:
    """`dvc commit --force <stages>`: cache their outputs and write their hashes to dvc.lock.
    (The CLI, run in `root`: DVC's in-process commit resolves paths against the current
    directory.)"""
    out = dvc(root, "commit", "--force", *stages)
    if out.returncode != 0:
        raise RecordError(f"dvc commit {' '.join(stages)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def stage_changes(root: Path, stage: str) -> dict[str, Any]:
    """What `dvc status <stage>` reports (empty when the stage is up to date), asked
    in-process: each `dvc` command costs ~1 s of start-up on 2 cores, the in-process call
    0.1–0.3 s after a one-off ~0.6 s import. A fresh `Repo` each time, as each CLI call
    would be: a stage that just ran has changed what DVC must look at."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            return dict(repo.status(targets=[_target(root, stage)]))
    except DvcException as err:
        raise RecordError(f"dvc status {stage} failed: {err}") from err


def default_remote(root: Path) -> str | None:
    """The name of the repository's default DVC remote (`core.remote`), or None."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        name = repo.config["core"].get("remote")
    return str(name) if name else None


def _git(root: Path, *args: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        ["git", *args], cwd=root, capture_output=True, text=True, env=env, timeout=120
    )
    if out.returncode != 0:
        raise RecordError(f"git {' '.join(args[:2])} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def commit_lineage(root: Path, branch: str, message: str) -> str:
    """Commit HEAD's tree + the work folder's params.yaml, dvc.lock and champion.json onto
    `branch` (created on first use; parents: its previous tip and HEAD). Returns the sha."""
    head = _git(root, "rev-parse", "HEAD")
    dirty = _git(
        root, "status", "--porcelain", "--untracked-files=no", "--", ".",
        *(f":(exclude){f}" for f in LINEAGE_FILES),
    )  # fmt: skip
    if dirty:
        message += "\n\nThe work tree differed from HEAD in:\n" + dirty
    ref = f"refs/heads/{branch}"
    previous = subprocess.run(
        ["git", "rev-parse", "--verify", "-q", ref], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "GIT_INDEX_FILE": str(Path(tmp) / "index"),
            "GIT_AUTHOR_NAME": os.environ.get("GIT_AUTHOR_NAME", "xopd"),
            "GIT_AUTHOR_EMAIL": os.environ.get("GIT_AUTHOR_EMAIL", "xopd@localhost"),
            "GIT_COMMITTER_NAME": os.environ.get("GIT_COMMITTER_NAME", "xopd"),
            "GIT_COMMITTER_EMAIL": os.environ.get("GIT_COMMITTER_EMAIL", "xopd@localhost"),
        }
        _git(root, "read-tree", head, env=env)
        for name in LINEAGE_FILES:
            if (root / name).is_file():
                blob = _git(root, "hash-object", "-w", "--", name)
                _git(root, "update-index", "--add", "--cacheinfo", f"100644,{blob},{name}", env=env)
        tree = _git(root, "write-tree", env=env)
        parents = [p for p in (previous, head) if p]
        sha = _git(
            root, "commit-tree", tree, *(a for p in parents for a in ("-p", p)), "-m", message,
            env=env,
        )  # fmt: skip
    _git(root, "update-ref", ref, sha, *([previous] if previous else []))
    return sha


def param_differences(recorded: Params, ran: Params) -> list[str]:
    """`group.key: <ran> (params.yaml: <recorded>)` for each setting that differs."""

    def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(tree, dict):
            return {prefix: tree}
        found: dict[str, Any] = {}
        for key, value in tree.items():
            found |= leaves(value, f"{prefix}.{key}" if prefix else str(key))
        return found

    old, new = leaves(recorded.to_yaml_dict()), leaves(ran.to_yaml_dict())
    return [
        f"{key}: {new.get(key)!r} (params.yaml: {old.get(key)!r})"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def dvc_command(root: Path, *args: str) -> str:
    """A shell line running `dvc <args>` in `root` with this environment's `dvc` and `xopd`
    (which the stages' commands call) first on PATH."""
    where = shlex.quote(str(Path(root).resolve()))
    path = shlex.quote(str(Path(sys.executable).parent))
    return f"cd {where} && PATH={path}:$PATH dvc {' '.join(args)}"


def not_recorded_advice(root: Path, ran: Params, *, one_round: bool) -> str:
    """Why dvc.lock was left alone after a run whose params differ from params.yaml, and the
    exact commands that make DVC agree with the folder again. `one_round`: the run retrained
    one round (a round or nightly run), not every stage that reads the changed settings."""
    diff = param_differences(load_params(Path(root) / PARAMS_FILE), ran)
    shown = "; ".join(diff[:6]) + (f"; and {len(diff) - 6} more" if len(diff) > 6 else "")
    repro = dvc_command(root, "repro")
    lines = [
        f"dvc.lock left as it was: this run's settings differ from params.yaml ({shown}), so "
        "recording it would claim outputs that params.yaml's settings did not make.",
        "`dvc status` now shows the stages that read those settings as changed, and `dvc repro` "
        "would rebuild them under params.yaml, replacing what this run wrote.",
        f"To make DVC consistent again, rebuild under params.yaml: {repro}",
    ]
    if one_round:
        lines.append(
            "or, to train every round with this run's settings, write them into params.yaml "
            "and run the same command."
        )
    else:
        commit = dvc_command(root, "commit", "--force", *needed(ran, root))
        lines.append(
            "or, to keep what this run made (every stage that reads those settings ran with "
            f"them), write them into params.yaml and record it: {commit}"
        )
    return "\n".join(lines)


def git_to_commit(root: Path) -> list[str] | None:
    """What a recorded run changed that belongs in git and is not committed: params.yaml,
    dvc.lock, champion.json and any .gitignore DVC wrote, relative to `root`. None when
    `root` is not in a git work tree."""
    out = subprocess.run(
        [
            "git", "-c", "status.relativePaths=true", "status", "--short",
            "--untracked-files=all", "--", *LINEAGE_FILES, ":(glob)**/.gitignore",
        ],
        cwd=root, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if out.returncode != 0:
        return None
    return sorted(line[3:] for line in out.stdout.splitlines() if line.strip())


def git_commit_line(root: Path, files: list[str], message: str) -> str:
    """`git add <files> && git commit -m <message>`, run from `root` (a `cd` first when that
    is not the current folder)."""
    cd = "" if Path(root).resolve() == Path.cwd().resolve() else f"cd {shlex.quote(str(root))} && "
    added = " ".join(shlex.quote(f) for f in files)
    return f"{cd}git add {added} && git commit -m {shlex.quote(message)}"
