"""Where every stage reads and writes, relative to a work folder laid out like the repo.

One table for `dvc.yaml`, the flows and the CLI: round 0 is `inputs.student` (by default
the bootstrapped `models/student`), evaluated by the `eval` stage into `reports/eval`;
round k ≥ 1 lives under `models/rounds/round<k>` and `reports/rounds/round<k>/` (DVC tracks
the two folders as the `rounds` stage's outputs, so their number can come from params.yaml).
The data and the teacher are `inputs.data` and `inputs.teacher`.
"""

from __future__ import annotations

from pathlib import Path

from xopd_core.config import Params

DATA = Path("data/mini")
VALIDATE = Path("reports/validate")
TEACHER = Path("models/teacher")
TEACHER_METRICS = Path("reports/teacher/metrics.json")
STUDENT = Path("models/student")
STUDENT_METRICS = Path("reports/student/metrics.json")
EVAL = Path("reports/eval")
ROUNDS = Path("models/rounds")
ROUND_REPORTS = Path("reports/rounds")
ROUNDS_METRICS = Path("reports/rounds.json")  # per-round eval + gate
HEADLINE = Path("reports/metrics.json")  # champion and latest round: `dvc metrics show`
PLOTS = Path("reports/plots")
CAMPAIGN_TABLE = Path("reports/campaign.md")
RUN_SUMMARY = Path("reports/run.json")  # what the last `xopd run` ran and its timings
STUDY = Path("reports/study")  # the study's table, study.json, plots and per-run evals
STUDY_MODELS = Path("models/study")  # the study's trained checkpoints, <method>/seed<s>
EVAL_METRICS = "metrics.json"  # in every eval folder: the flat metrics (DVC metrics)
EVAL_RESPONSES = "responses.jsonl"  # beside them: every graded response, one JSON per line
CHAMPION = Path("champion.json")  # the champion pointer, tracked in git
LOCK = Path(".xopd.lock")  # one writer per work folder (xopd_core/lock.py)
# Set for the `xopd train` that `train.launcher: torchrun` starts: the stage that launched it
# holds the work folder's lock, which the ranks must not wait for.
LOCK_HELD_ENV = "XOPD_LOCK_HELD"
PUSH_PENDING = Path(".xopd.push-pending")  # a promotion whose push has not gone through yet


def data_root(params: Params, root: Path) -> Path:
    """`inputs.data`, relative to the work folder `root` (data/mini: the synth stage's)."""
    return root / params.inputs.data


def teacher_dir(params: Params, root: Path) -> Path:
    """`inputs.teacher` (models/teacher: the teacher stage's)."""
    return root / params.inputs.teacher


def teacher_reference(params: Params, root: Path) -> Path:
    """What the Avg-Drop is measured against: `inputs.teacher_scores` where given, else the
    teacher's folder (its text accuracy is measured on the eval items)."""
    given = params.inputs.teacher_scores
    return root / given if given else teacher_dir(params, root)


def round_checkpoint(params: Params, root: Path, k: int) -> Path:
    """Round k's student: `inputs.student` for round 0, else models/rounds/round<k>."""
    return root / (params.inputs.student if k == 0 else ROUNDS / f"round{k}")


def round_reports(root: Path, k: int) -> Path:
    return root / ROUND_REPORTS / f"round{k}"


def round_eval(root: Path, k: int) -> Path:
    return root / EVAL if k == 0 else round_reports(root, k) / "eval"


def round_gate(root: Path, k: int) -> Path:
    return round_reports(root, k) / "gate" / "metrics.json"


# One file, or shards: models/checkpoint.py's WEIGHTS and INDEX, named here so that the flows
# can look for a checkpoint without importing torch.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def completed_rounds(root: Path) -> list[int]:
    """Rounds ≥ 1 whose checkpoint is on disk, ascending."""
    found = []
    for p in (root / ROUNDS).glob("round*/model.safetensors"):
        digits = p.parent.name.removeprefix("round")
        if digits.isdigit():
            found.append(int(digits))
    return sorted(found)
