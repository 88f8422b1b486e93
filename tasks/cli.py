"""`xopd`: the command line. dvc.yaml calls these same entries, one per stage.

Exit codes: 0 success; 1 the data broke a validation rule; 2 bad input (params, paths,
unreadable manifest) or a missing tool.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks import layout
from xopd_core.runtime import apply_offline_env

log = logging.getLogger("xopd")

# The stage commands (`xopd stage NAME`: what `dvc repro` runs) and the others that write hold
# the work folder's lock (`--workdir`, else the current folder, where dvc.yaml runs them) while
# they run, so none reads or writes beside `xopd run` or another stage. `run` and `serve` lock
# inside their flows.
LOCKED_COMMANDS = frozenset({"stage", "validate", "eval", "train", "gate", "study"})

DEFAULT_DATA = layout.DATA
DEFAULT_VALIDATE_OUT = layout.VALIDATE
DEFAULT_TEACHER = layout.TEACHER
DEFAULT_STUDENT = layout.STUDENT
DEFAULT_EVAL_OUT = layout.EVAL


def cmd_validate(args: argparse.Namespace) -> int:
    from tasks.validate import validate
    from xopd_core.config import load_params

    params = load_params(args.params)
    summary = validate(params, args.targets, args.out, data_root=args.data_root)
    print(
        f"validate: passed, {summary.n_rows} rows in {summary.seconds:.1f} s → "
        f"{summary.report_html}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from tasks.eval import evaluate
    from xopd_core.config import load_params

    params = load_params(args.params)
    summary = evaluate(params, args.data, args.model, args.teacher, args.out, split=args.split)
    print(summary.table_path.read_text())
    print(f"eval: → {summary.metrics_path}")
    return 0


def _token_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: comma-separated token counts") from None
    if any(n < 1 for n in counts) or list(counts) != sorted(counts):
        raise argparse.ArgumentTypeError(f"{text!r}: positive token counts in rising order")
    return counts


def cmd_train(args: argparse.Namespace) -> int:
    from tasks.train import train
    from xopd_core.config import load_params

    params = load_params(args.params)
    summary = train(
        params,
        args.data,
        args.student,
        args.teacher,
        args.out,
        args.metrics,
        live_dir=args.live,
        snapshot_tokens=args.snapshot_tokens,
        snapshot_dir=args.snapshot_dir,
    )
    m = summary.metrics
    print(
        f"train: {m['method']} {m['steps']} steps in {m['seconds']:.0f} s "
        f"({m['student_tokens']} student / {m['teacher_tokens']} teacher tokens) → {args.out}"
    )
    return 0


def cmd_gate(args: argparse.Namespace) -> int:
    from tasks.gate import describe, gate
    from xopd_core.config import load_params

    summary = gate(
        load_params(args.params),
        args.candidate_metrics,
        args.candidate,
        args.champion,
        args.out,
        args.round,
    )
    print(describe(summary))
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from tasks.study import StudyPaths, study
    from xopd_core.config import load_params

    params = load_params(args.params)
    summary = study(params, StudyPaths.of(params, args.workdir))
    print(summary.table)
    plots = ", ".join(map(str, summary.plots))
    print(f"study: {summary.seconds:.0f} s → {summary.table_path}, {summary.summary_path}, {plots}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from tasks.stages import runner, stage_names
    from xopd_core.config import load_params

    names = stage_names(args.workdir)
    if args.name not in names:
        print(
            f"xopd stage: error: no stage {args.name!r} in dvc.yaml ({', '.join(names)})",
            file=sys.stderr,
        )
        return 2
    params = load_params(args.params)
    print(f"{args.name}: {runner(args.name)(params, args.workdir, progress=True)}")
    return 0


def add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--params",
        type=Path,
        default=None,
        help="params file (default: $XOPD_PARAMS or ./params.yaml)",
    )


def build_parser(
    extra: Callable[[Any], None] | None = None,
) -> argparse.ArgumentParser:
    """The `xopd` parser; `extra(subparsers)` lets the layer above (flows/cli.py) add its
    commands without this module importing it."""
    parser = argparse.ArgumentParser(prog="xopd", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate manifests + audio; non-zero exit on failure")
    add_params(p)
    p.add_argument(
        "targets",
        type=Path,
        nargs="+",
        help="dataset folders (with manifests/) or manifest .jsonl files",
    )
    p.add_argument(
        "--data-root",
        type=Path,
        default=None,
        help="folder audio paths are relative to (default: the manifests' dataset)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_VALIDATE_OUT,
        help="where validation.json and validation.html go",
    )
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("eval", help="accuracy by task and modality, Avg-Drop, paralinguistics")
    add_params(p)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data root (eval splits)")
    p.add_argument("--model", type=Path, default=DEFAULT_STUDENT, help="student checkpoint")
    p.add_argument(
        "--teacher",
        "--teacher-metrics",
        dest="teacher",
        type=Path,
        default=DEFAULT_TEACHER,
        help="the teacher's folder (its text accuracy on the split, measured here, is the "
        "Avg-Drop reference) or a metrics JSON with its text_accuracy_<task> scores",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_EVAL_OUT,
        help="folder for metrics.json, table.md, responses.jsonl, transcripts.jsonl",
    )
    p.add_argument(
        "--split",
        choices=("eval", "dev"),
        default="eval",
        help="held-out items to score: eval (+ para_eval), or dev (+ para_dev) for tuning "
        "(the Avg-Drop reference stays the teacher's eval scores)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="one round of X-OPD (or a baseline) from a student")
    add_params(p)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="data root (train split)")
    p.add_argument("--student", type=Path, default=DEFAULT_STUDENT, help="starting checkpoint")
    p.add_argument("--teacher", type=Path, default=DEFAULT_TEACHER, help="teacher checkpoint")
    p.add_argument(
        "--out", type=Path, default=Path("models/rounds/round1"), help="trained checkpoint"
    )
    p.add_argument(
        "--metrics", type=Path, default=Path("reports/train/metrics.json"), help="summary JSON"
    )
    p.add_argument(
        "--live", type=Path, default=Path("reports/train/live"), help="dvclive per-step logs"
    )
    p.add_argument(
        "--snapshot-tokens",
        type=_token_counts,
        default=(),
        metavar="N,N,…",
        help="save a loadable checkpoint when the trained student tokens first reach each count",
    )
    p.add_argument(
        "--snapshot-dir", type=Path, default=None, help="where (default: OUT.snapshots/point<i>)"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "export-thinker",
        help="a whole Qwen2.5-Omni / Qwen3-Omni checkpoint's thinker as a student folder",
    )
    p.add_argument("source", type=Path, help="the whole Omni checkpoint folder")
    p.add_argument("out", type=Path, help="the student folder to write")
    p.set_defaults(func=cmd_export_thinker)

    p = sub.add_parser("gate", help="promote a round's candidate to champion, or keep it")
    add_params(p)
    p.add_argument("--candidate", type=Path, required=True, help="candidate checkpoint")
    p.add_argument(
        "--candidate-metrics", type=Path, required=True, help="the candidate's eval metrics"
    )
    p.add_argument("--round", type=int, required=True, help="the candidate's round number")
    p.add_argument(
        "--champion", type=Path, default=Path("champion.json"), help="the champion pointer"
    )
    p.add_argument(
        "--out", type=Path, default=Path("reports/gate/metrics.json"), help="decision JSON"
    )
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser(
        "study", help="every method from the round-0 student at an equal token budget, compared"
    )
    add_params(p)
    p.add_argument("--workdir", type=Path, default=Path("."), help="the work folder")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser(
        "stage", help="run one dvc.yaml stage on the work folder (as dvc repro does)"
    )
    add_params(p)
    p.add_argument("name", help="the stage, as dvc.yaml names it (synth, validate, teacher, …)")
    p.add_argument("--workdir", type=Path, default=Path("."), help="the work folder")
    p.set_defaults(func=cmd_stage)

    if extra is not None:
        extra(sub)
    return parser


def cmd_export_thinker(args: argparse.Namespace) -> int:
    from xopd_core.models.families import export_thinker

    files = export_thinker(args.source, args.out)
    print(f"export-thinker: {len(files)} weight file(s) → {args.out}")
    return 0


def main(argv: list[str] | None = None, extra: Callable[[Any], None] | None = None) -> int:
    apply_offline_env()
    args = build_parser(extra).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from tasks.record import RecordError
    from tasks.remote import RemoteError
    from tasks.report import ReportInputError
    from tasks.study import StudyError
    from xopd_core.config import ConfigError
    from xopd_core.data.manifest import ManifestError
    from xopd_core.data.speech import SpeechToolError
    from xopd_core.data.validation import DataValidationError
    from xopd_core.data.world import WorldGenerationError
    from xopd_core.errors import (
        AudioError,
        CheckpointError,
        NonFiniteTrainingError,
        ResumeStateError,
    )
    from xopd_core.eval.metrics import TeacherScoresError
    from xopd_core.gate import GateInputError
    from xopd_core.lock import Busy, exclusive
    from xopd_core.runtime import launched_rank

    try:
        launched = launched_rank()
        if (
            args.command in LOCKED_COMMANDS
            and (launched is None or launched[0] == 0)
            and not os.environ.get(layout.LOCK_HELD_ENV)
        ):
            # Of a launcher's ranks, rank 0 writes the outputs (xopd_core/distributed.py); the
            # ranks `train.launcher: torchrun` starts work for a stage that holds the lock.
            workdir = Path(getattr(args, "workdir", None) or ".")
            note = f"xopd {args.command}"
            with exclusive(workdir / layout.LOCK, what="xopd command", note=note):
                return int(args.func(args))
        return int(args.func(args))
    except DataValidationError as err:
        print(f"xopd {args.command}: {err}", file=sys.stderr)
        return 1
    except (
        ConfigError,
        ManifestError,
        SpeechToolError,
        WorldGenerationError,
        TeacherScoresError,
        GateInputError,
        ReportInputError,
        StudyError,
        CheckpointError,
        AudioError,
        ResumeStateError,
        NonFiniteTrainingError,
        RecordError,
        RemoteError,
        Busy,
        FileNotFoundError,
    ) as err:
        print(f"xopd {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
