"""The `xopd` entry point as dvc.yaml and users call it: real subprocesses, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.cli import main
from tests.conftest import tiny_synth_params

REPO = Path(__file__).resolve().parents[2]


def xopd(*args: str, cwd: Path, entry: str = "tasks.cli") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", entry, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_tiny_params(path: Path) -> None:
    import yaml

    from tests.pipeline_fixtures import TINY_STUDENT
    from tests.tasks.test_teacher import TINY

    path.write_text(
        yaml.safe_dump(
            {
                "synth": tiny_synth_params(seed=11).model_dump(mode="json"),
                "teacher": TINY.model_dump(mode="json"),
                "student": TINY_STUDENT.model_dump(mode="json"),
                "eval": {"max_new_tokens": 16},
            }
        )
    )


def test_run_chains_every_stage_and_stops_on_an_undefined_avg_drop(tmp_path: Path) -> None:
    """`xopd run` (the campaign flow, through Prefect's own temporary server) runs every
    stage on the tiny settings; a 40-step teacher answers nothing right, so the Avg-Drop
    against it is undefined and eval stops the run with exit 2, naming the file.
    (tests/tasks/test_eval.py covers eval's success path, tests/flows the rounds.)"""
    write_tiny_params(tmp_path / "params.yaml")
    proc = xopd("run", "--workdir", str(tmp_path), cwd=tmp_path, entry="flows.cli")
    assert (tmp_path / "reports" / "validate" / "validation.html").is_file(), proc.stderr
    assert (tmp_path / "data" / "mini" / "manifests" / "train.jsonl").is_file()
    assert (tmp_path / "models" / "teacher" / "model.safetensors").is_file()
    teacher = json.loads((tmp_path / "reports" / "teacher" / "metrics.json").read_text())
    assert teacher["text_accuracy_mean"] == 0.0
    assert (tmp_path / "models" / "student" / "model.safetensors").is_file()
    assert proc.returncode == 2
    assert "models/teacher: the teacher scores 0 on every task" in proc.stderr
    assert not (tmp_path / "reports" / "eval").exists()  # nothing half-written
    assert not (tmp_path / "models" / "rounds").exists()


@pytest.mark.usefixtures("in_tmp_path")
def test_validate_exit_codes(
    tiny_world: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # In this process (`main` returns the exit code; ~5 s of imports a subprocess saved),
    # then once as a real process.
    assert main(["validate", str(tiny_world), "--out", str(tmp_path / "ok")]) == 0
    # A single manifest file works too; its data root is found from the layout.
    one = tiny_world / "manifests" / "eval.jsonl"
    assert main(["validate", str(one), "--out", str(tmp_path / "one")]) == 0

    bad_root = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(tiny_world), str(bad_root)], check=True)
    manifest = bad_root / "manifests" / "eval.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    rows[0]["answer"] = ""
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main(["validate", str(bad_root), "--out", str(tmp_path / "bad-report")]) == 1
    err = capsys.readouterr().err
    assert "eval.jsonl:1" in err and "answer_not_blank" in err

    missing = xopd("validate", str(tmp_path / "nowhere.jsonl"), cwd=tmp_path)
    assert missing.returncode == 2 and "manifest not found" in missing.stderr


def test_validate_does_not_import_torch(tiny_world: Path, tmp_path: Path) -> None:
    """Data validation needs no model code: importing torch and transformers cost a `xopd
    validate` ~9 s of its ~12 s on the 2-core machine (measured 2026-11-30)."""
    code = (
        "import sys\n"
        "from tasks.cli import main\n"
        f"rc = main(['validate', {str(tiny_world)!r}, '--out', {str(tmp_path / 'r')!r}])\n"
        "print(rc, sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,  # the command locks its work folder (.): not the repository
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stderr[-2000:]


def test_bad_params_exit_2_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("synth:\n  workers: 0\n")
    proc = xopd("stage", "synth", cwd=tmp_path)
    assert proc.returncode == 2
    assert "synth.workers" in proc.stderr
    assert not (tmp_path / "data").exists()


HOLD_AS_RUN = """
import sys, time
from xopd_core.lock import exclusive
with exclusive(sys.argv[1], what="xopd run"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_stage_commands_refuse_to_run_beside_a_run_holding_the_folder(
    tmp_path: Path,
) -> None:
    """`xopd report` beside a campaign read a file the campaign had just deleted: stage
    commands (report, and each that `dvc repro` runs) take the work folder's lock."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_AS_RUN, str(tmp_path / ".xopd.lock")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        for args in (
            ("stage", "report", "--workdir", str(tmp_path)),
            ("gate", "--candidate", "c", "--candidate-metrics", "m.json", "--round", "1"),
        ):
            out = xopd(*args, cwd=tmp_path)
            assert out.returncode == 2, out.stderr
            assert f"another xopd command holds {tmp_path}/.xopd.lock" in out.stderr or (
                "another xopd command holds .xopd.lock" in out.stderr
            )
            assert f"(pid {holder.pid} since" in out.stderr and "xopd run)" in out.stderr
            assert len(out.stderr.strip().splitlines()) == 1
            assert not (tmp_path / "reports").exists()
    finally:
        holder.kill()
        holder.wait()
    out = xopd("stage", "report", "--workdir", str(tmp_path), cwd=tmp_path)
    assert "another" not in out.stderr  # the lock went with its holder


def test_train_refuses_snapshot_counts_it_cannot_read(capsys) -> None:
    import pytest

    from tasks.cli import main

    for bad, why in [("5,x", "comma-separated"), ("9,5", "rising order"), ("0", "positive")]:
        with pytest.raises(SystemExit) as stop:
            main(["train", "--snapshot-tokens", bad])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and f"'{bad}': " in err and why in err, err
