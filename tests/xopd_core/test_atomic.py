"""Atomic writes: standard JSON only, and what a killed writer left behind is cleared (or, for
the only whole copy, put back) by the next writer."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from xopd_core.atomic import atomic_directory, write_json_atomic


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_json_with_a_non_finite_number_is_refused_naming_the_key(tmp_path: Path, bad) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"loss": 1.0})
    with pytest.raises(ValueError, match=r"metrics\.json: refusing .* \(history\.1\.loss = "):
        write_json_atomic(path, {"history": [{"loss": 1.0}, {"loss": bad}]})
    assert json.loads(path.read_text()) == {"loss": 1.0}  # the previous file stands
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def _killed_writer_leftover(parent: Path, name: str) -> Path:
    """A staging folder as a writer killed with SIGKILL leaves it (its pid is gone)."""
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from xopd_core.atomic import atomic_directory\n"
        "with atomic_directory(Path(sys.argv[1])) as staging:\n"
        "    (staging / 'part.wav').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(parent / name)], check=False)
    (left,) = [p for p in parent.iterdir() if p.name.startswith(f".{name}.staging-")]
    return left


def test_a_killed_writers_staging_folder_is_cleared_by_the_next_write(tmp_path: Path) -> None:
    left = _killed_writer_leftover(tmp_path, "mini")
    legacy = tmp_path / ".mini.staging-abc123"  # a name from before pids were recorded
    legacy.mkdir()
    with atomic_directory(tmp_path / "mini") as staging:
        (staging / "manifest.jsonl").write_text("{}\n")
    assert not left.exists() and not legacy.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mini"]


def test_a_live_writers_staging_folder_is_left_alone(tmp_path: Path) -> None:
    with atomic_directory(tmp_path / "mini") as outer:
        (outer / "a").write_text("a")
        with atomic_directory(tmp_path / "mini") as inner:  # another writer of the same path
            (inner / "b").write_text("b")
        assert outer.is_dir()  # its writer (this process) is alive: not stale
    assert (tmp_path / "mini" / "a").read_text() == "a"


def test_a_swap_killed_between_its_renames_gets_its_previous_version_back(
    tmp_path: Path,
) -> None:
    old = tmp_path / ".ckpt.old-999999999-x1"  # pid that cannot exist
    old.mkdir()
    (old / "model.safetensors").write_text("good")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "ckpt"):
        raise RuntimeError("the new version failed")
    assert (tmp_path / "ckpt" / "model.safetensors").read_text() == "good"
