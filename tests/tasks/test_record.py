"""params.yaml edits by the nightly flow keep the file's comments and never write a file
that would not load; what a run tells its user to run in git and DVC works as printed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tasks.record import (
    RecordError,
    advance_rounds,
    git_commit_line,
    git_to_commit,
    not_recorded_advice,
    params_in_sync,
)
from xopd_core.config import load_params

REPO = Path(__file__).resolve().parents[2]


def test_advance_rounds_keeps_comments_and_other_values(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()
    original = load_params(tmp_path / "params.yaml")
    advance_rounds(tmp_path, 7)
    after = (tmp_path / "params.yaml").read_text()
    assert load_params(tmp_path / "params.yaml").campaign.rounds == 7
    changed = [
        (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 1 and "rounds: 7" in changed[0][1] and "#" in changed[0][1]
    assert params_in_sync(tmp_path, original, ignore_rounds=True)
    assert not params_in_sync(tmp_path, original)


def test_advance_rounds_refuses_a_value_the_params_reject(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_bytes()
    with pytest.raises(RecordError, match=r"params\.yaml: the updated params would not load"):
        advance_rounds(tmp_path, -1)
    assert (tmp_path / "params.yaml").read_bytes() == before


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=root, check=True, capture_output=True, text=True
    ).stdout.strip()


def test_the_printed_git_line_commits_what_a_recorded_run_left(tmp_path: Path) -> None:
    """After `make run`: dvc.lock and champion.json new, params.yaml edited (a nightly), a
    .gitignore DVC wrote; the line run as printed commits exactly those, nothing else."""
    assert git_to_commit(tmp_path) is None  # not a git work tree: nothing to advise
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "test@localhost")
    _git(root, "config", "user.name", "test")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "notes.txt").write_text("the user's own work in progress\n")
    _git(root, "add", "params.yaml")
    _git(root, "commit", "-q", "-m", "start")
    assert git_to_commit(root) == []
    advance_rounds(root, 3)
    for name in ("dvc.lock", "champion.json", "models/.gitignore"):
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(f"{name}\n")
    files = git_to_commit(root)
    assert files == ["champion.json", "dvc.lock", "models/.gitignore", "params.yaml"]
    line = git_commit_line(root, files, "xopd run: record it")
    assert line.startswith(f"cd {root} && git add champion.json dvc.lock ")
    subprocess.run(["bash", "-c", line], check=True, capture_output=True)
    assert git_to_commit(root) == []
    assert _git(root, "log", "-1", "--format=%s") == "xopd run: record it"
    assert _git(root, "status", "--short") == "?? notes.txt"  # left to its owner


def test_a_run_that_cannot_record_names_the_settings_and_the_commands(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    on_disk = load_params(tmp_path / "params.yaml")
    steps = on_disk.train.steps
    ran = on_disk.model_copy(update={"train": on_disk.train.model_copy(update={"steps": 4})})
    advice = not_recorded_advice(tmp_path, ran, one_round=True)
    assert f"train.steps: 4 (params.yaml: {steps})" in advice
    assert f"cd {tmp_path.resolve()} && PATH=" in advice and ":$PATH dvc repro" in advice
    whole = not_recorded_advice(tmp_path, ran, one_round=False)
    assert "dvc commit --force synth validate teacher student eval rounds report" in whole
