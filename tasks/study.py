"""The `study` stage: X-OPD's λ ablation and its baselines side by side, from one student.

Each arm of `study.methods` trains from the same round-0 student once per seed, on exactly
the same budget of student tokens (`study.student_tokens`), and is scored on the eval split by
the `eval` stage's `evaluate`; snapshots evenly spaced in the budget, scored on the dev split,
give each run's learning curve. Writes a table in the form of the paper's Tables 1-2 (arXiv
2603.24596) with per-item exact McNemar tests, `study.json` (every number) and two PNG plots.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.layout import (
    EVAL_RESPONSES,
    STUDY,
    STUDY_MODELS,
    WEIGHT_FILES,
    data_root,
    round_checkpoint,
    teacher_dir,
    teacher_reference,
)
from tasks.report import png_bytes
from xopd_core.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from xopd_core.config import Params, StudyMethod, TrainParams
from xopd_core.data.validation import read_validated_manifests
from xopd_core.eval.metrics import mcnemar_exact_p
from xopd_core.gate import paired_counts

# The training and eval stages (torch, transformers) are imported where a run needs them:
# the CLI imports this module for `StudyError` on every command.

TABLE, SUMMARY, RUN, STARTED = "table.md", "study.json", "run.json", "started.json"
AVG_DROP_PLOT, CURVE_PLOT = "avg_drop.png", "curve.png"


class StudyError(RuntimeError):
    """A run ended under its token budget, or two evals did not score the same items."""


@dataclass(frozen=True)
class StudyPaths:
    """What the study reads (data, the round-0 student, the teacher and its text scores:
    its folder, where they are measured, or a metrics file) and the two folders it writes
    (reports, checkpoints)."""

    data: Path
    student: Path
    teacher: Path
    teacher_metrics: Path
    out: Path
    models: Path

    @classmethod
    def of(cls, params: Params, root: Path) -> StudyPaths:
        """The paths of a work folder laid out like the repo (tasks/layout.py), with the
        data and models of `params.inputs`."""
        return cls(
            data_root(params, root),
            round_checkpoint(params, root, 0),
            teacher_dir(params, root),
            teacher_reference(params, root),
            root / STUDY,
            root / STUDY_MODELS,
        )


@dataclass(frozen=True)
class StudySummary:
    table_path: Path
    summary_path: Path
    plots: list[Path]
    table: str
    seconds: float


def run_params(params: Params, arm: StudyMethod, seed: int) -> Params:
    """The params of one run: the `train` group with the arm's method, λ and β, the seed,
    the study's budget and its step cap (validated, so a bad combination fails here)."""
    s = params.study
    train = TrainParams.model_validate(
        params.train.model_dump()
        | {
            "method": arm.method,
            "lmbda": arm.lmbda,
            "gkd_beta": arm.gkd_beta,
            "seed": seed,
            "steps": s.max_steps,
            "student_tokens": s.student_tokens,
        }
    )
    return params.model_copy(update={"train": train})


def curve_tokens(budget: int, points: int) -> list[int]:
    """Where a run saves its snapshots: i/points of the budget for i = 1..points−1 (point
    `points` is the trained model itself)."""
    return [math.ceil(budget * i / points) for i in range(1, points)]


def run_folder(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed{seed}"


def _scores_sha256(path: Path) -> str:
    """The teacher's scores' identity: its weights' hash, or its metrics file's."""
    if Path(path).is_dir():
        from xopd_core.models.checkpoint import weights_sha256

        return weights_sha256(path)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _fingerprint(params: Params, paths: StudyPaths, **extra: Any) -> dict[str, Any]:
    """What a recorded result depends on besides its folder: a run whose record carries the
    same fingerprint is reused (a study resumed after a crash, or re-run by its flow)."""
    from xopd_core.models.checkpoint import weights_sha256

    return {
        "eval": params.eval.model_dump(mode="json"),
        "student_sha256": weights_sha256(paths.student),
        "teacher_scores_sha256": _scores_sha256(paths.teacher_metrics),
        **extra,
    }


def _recorded(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    return record if record.get("fingerprint") == fingerprint else None


def eval_round0(params: Params, paths: StudyPaths) -> dict[str, Any]:
    """Round 0, the starting student: its eval metrics and its dev metrics (the curves'
    first point)."""
    from tasks.eval import evaluate

    for need in (paths.student, paths.teacher):
        if not any((need / name).is_file() for name in WEIGHT_FILES):
            raise StudyError(
                f"{need}: no checkpoint; the study starts from the mini world's teacher and "
                "round-0 student: run `make run` first"
            )
    # Every split a run reads, checked before the first run (a recorded run is reused
    # without reading them again).
    splits = ["train", "eval", "dev"]
    read_validated_manifests(paths.data, splits, params.validate_, ["para_eval", "para_dev"])
    folder = paths.out / "round0"
    fingerprint = _fingerprint(params, paths)
    if (record := _recorded(folder / RUN, fingerprint)) is not None:
        return record
    start = time.perf_counter()
    args = (params, paths.data, paths.student, paths.teacher_metrics)
    record = {
        "fingerprint": fingerprint,
        "eval": evaluate(*args, folder / "eval").metrics,
        "dev": evaluate(*args, folder / "dev", split="dev").metrics,
    }
    record["seconds"] = round(time.perf_counter() - start, 1)
    write_json_atomic(folder / RUN, record)
    return record


def run_method(params: Params, paths: StudyPaths, arm: StudyMethod, seed: int) -> dict[str, Any]:
    """One (arm, seed): train at the budget, evaluate on the eval split, score the curve's
    snapshots and the trained model on the dev split. An interrupted run resumes (the
    trainer's state, the snapshots already saved); a completed one is reused."""
    from tasks.eval import evaluate
    from tasks.train import train

    p = run_params(params, arm, seed)
    budget = params.study.student_tokens
    points = curve_tokens(budget, params.study.curve_points)
    folder = run_folder(paths.out, arm.name, seed)
    fingerprint = _fingerprint(
        params, paths, train=p.train.model_dump(mode="json"), curve_tokens=points
    )
    if (record := _recorded(folder / RUN, fingerprint)) is not None:
        return record
    start = time.perf_counter()
    checkpoint = paths.models / arm.name / f"seed{seed}"
    snapshots = checkpoint.with_name(checkpoint.name + ".snapshots")
    if _recorded(folder / STARTED, fingerprint) is None:  # nothing of this run to resume
        for stale in (folder, snapshots, checkpoint.with_name(checkpoint.name + ".state")):
            shutil.rmtree(stale, ignore_errors=True)
        write_json_atomic(folder / STARTED, {"fingerprint": fingerprint})
    trained = train(
        p,
        paths.data,
        paths.student,
        paths.teacher,
        checkpoint,
        folder / "train" / "metrics.json",
        snapshot_tokens=points,
        snapshot_dir=snapshots,
    )
    tokens = trained.metrics["student_tokens"]
    if tokens != budget:
        raise StudyError(
            f"{arm.name}, seed {seed}: {tokens} student tokens trained in "
            f"{trained.metrics['steps']} steps, not the budget of {budget} "
            "(study.student_tokens): raise study.max_steps"
        )
    args = (params, paths.data)
    evaluated = evaluate(*args, checkpoint, paths.teacher_metrics, folder / "eval").metrics
    curve = []
    ends = [(x.checkpoint, x.step, x.student_tokens) for x in trained.snapshots]
    ends.append((checkpoint, trained.metrics["steps"], tokens))
    for i, (path, step, n_tokens) in enumerate(ends):
        dev = folder / "dev" / f"point{i + 1}"
        m = evaluate(*args, path, paths.teacher_metrics, dev, split="dev").metrics
        curve.append(
            {"step": step, "student_tokens": n_tokens, "speech_accuracy": m["speech_accuracy_mean"]}
        )
    shutil.rmtree(snapshots, ignore_errors=True)  # scored; the trained model stays
    record = {
        "fingerprint": fingerprint,
        "name": arm.name,
        "seed": seed,
        "train": trained.metrics,
        "eval": evaluated,
        "curve": curve,
        "seconds": round(time.perf_counter() - start, 1),  # train + evals (of this attempt)
    }
    write_json_atomic(folder / RUN, record)
    (folder / STARTED).unlink()
    return record


# -- the table, the tests, the plots ----------------------------------------------------
def paired_test(candidate: dict[str, bool], baseline: dict[str, bool], what: str) -> dict[str, Any]:
    """Two-sided exact McNemar test over paired items: `wins` only the candidate gets right,
    `losses` only the baseline; p = min(1, 2 · the smaller one-sided p)."""
    if set(candidate) != set(baseline):
        raise StudyError(f"{what}: the two evals scored different speech items")
    wins, losses = paired_counts(candidate, baseline, what)
    one_sided = min(mcnemar_exact_p(wins, losses), mcnemar_exact_p(losses, wins))
    return {"wins": wins, "losses": losses, "p_value": min(1.0, 2 * one_sided)}


def columns(round0_eval: dict[str, Any]) -> list[tuple[str, str]]:
    """(metric key, header) of the table's numeric columns, in order."""
    tasks = sorted(
        k.removeprefix("speech_accuracy_")
        for k in round0_eval
        if k.startswith("speech_accuracy_") and k != "speech_accuracy_mean"
    )
    return [
        ("avg_drop_speech", "speech Avg-Drop (%)"),
        ("avg_drop_text", "text Avg-Drop (%)"),
        *((f"speech_accuracy_{t}", t.replace("_", " ")) for t in tasks),
        *(
            [("paralinguistic_accuracy", "paralinguistic")]
            if "paralinguistic_accuracy" in round0_eval
            else []
        ),
        ("asr_wer", "ASR WER"),
    ]


def label(arm: StudyMethod) -> str:
    if arm.method == "xopd":
        return f"X-OPD λ={arm.lmbda:g}"
    if arm.method == "gkd":
        return "GKD (forward KL)" if arm.gkd_beta == 0 else f"GKD β={arm.gkd_beta:g}"
    return {"sft": "SFT", "offline_kd": "offline KD", "grpo": "GRPO"}[arm.method]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def summarise(
    params: Params, paths: StudyPaths, round0: dict[str, Any], runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Every number of the study: round 0, then per arm each seed's metrics, paired tests
    and curve, and the mean and spread (half the range) over seeds."""
    from tasks.gate import speech_results

    s = params.study
    cols = [k for k, _ in columns(round0["eval"])]
    base = speech_results(paths.out / "round0" / "eval" / EVAL_RESPONSES)
    by_arm = {(r["name"], r["seed"]): r for r in runs}

    def correct(name: str, seed: int) -> dict[str, bool]:
        return speech_results(run_folder(paths.out, name, seed) / "eval" / EVAL_RESPONSES)

    methods: list[dict[str, Any]] = []  # a list: study.json is written with sorted keys
    for arm in s.methods:
        seeds = []
        for seed in s.seeds:
            r = by_arm[(arm.name, seed)]
            mine = correct(arm.name, seed)
            where = f"{arm.name}, seed {seed}"
            seeds.append(
                {
                    "seed": seed,
                    "steps": r["train"]["steps"],
                    "student_tokens": r["train"]["student_tokens"],
                    "teacher_tokens": r["train"]["teacher_tokens"],
                    "seconds": r["seconds"],
                    "metrics": {k: r["eval"][k] for k in cols},
                    "vs_round0": paired_test(mine, base, f"{where} vs round 0"),
                    "vs_reference": None
                    if arm.name == s.reference
                    else paired_test(mine, correct(s.reference, seed), f"{where} vs {s.reference}"),
                    "curve": r["curve"],
                }
            )
        values = {k: [x["metrics"][k] for x in seeds] for k in cols}
        methods.append(
            {
                "label": label(arm),
                **arm.model_dump(mode="json"),
                "mean": {k: _mean(v) for k, v in values.items()},
                "spread": {k: (max(v) - min(v)) / 2 for k, v in values.items()},
                "runs": seeds,
            }
        )
    return {
        "student_tokens_budget": s.student_tokens,
        "seeds": s.seeds,
        "reference": s.reference,
        "speech_items": len(base),
        "run_seconds": round(round0["seconds"] + sum(r["seconds"] for r in runs), 1),
        "round0": {
            **{k: round0["eval"][k] for k in cols},
            "dev_speech_accuracy": round0["dev"]["speech_accuracy_mean"],
        },
        "methods": methods,
    }


def study_table(summary: dict[str, Any], headers: list[tuple[str, str]]) -> str:
    ref = summary["reference"]
    (ref_label,) = [m["label"] for m in summary["methods"] if m["name"] == ref]
    head = [
        "method",
        *(h for _, h in headers),
        "steps",
        "p vs round 0",
        f"p vs {ref_label}",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(key: str, x: float) -> str:
        return f"{x:.2f}" if key.startswith("avg_drop") else f"{x:.3f}"

    r0 = summary["round0"]
    lines.append("| round 0 | " + " | ".join(fmt(k, r0[k]) for k, _ in headers) + " | 0 | — | — |")
    for m in summary["methods"]:
        name = m["name"]
        cells = [f"{fmt(k, m['mean'][k])} ± {fmt(k, m['spread'][k])}" for k, _ in headers]
        steps = _mean([r["steps"] for r in m["runs"]])
        vs0 = ", ".join(_p(r["vs_round0"]["p_value"]) for r in m["runs"])
        vsref = (
            "—" if name == ref else ", ".join(_p(r["vs_reference"]["p_value"]) for r in m["runs"])
        )
        lines.append(f"| {m['label']} | " + " | ".join(cells) + f" | {steps:g} | {vs0} | {vsref} |")
    seeds = ", ".join(map(str, summary["seeds"]))
    lines += [
        "",
        f"Each run trained on exactly {summary['student_tokens_budget']:,} student tokens, from "
        f"the same round-0 student; seeds {seeds}. A method's cells are the mean over seeds ± "
        "half their range; the task columns are speech-input accuracy on the eval split; "
        "steps is the mean number of steps the budget took.",
        f"p: two-sided exact McNemar test over the {summary['speech_items']} paired speech "
        f"eval items, one per seed (in seed order).",
        "",
    ]
    return "\n".join(lines)


def _plots(out: Path, summary: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = summary["methods"]
    names = ["round 0", *(m["label"] for m in methods)]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    width, top = 0.4, 1.0
    for j, (key, what) in enumerate((("avg_drop_speech", "speech"), ("avg_drop_text", "text"))):
        ys = [summary["round0"][key], *(m["mean"][key] for m in methods)]
        errs = [0.0, *(m["spread"][key] for m in methods)]
        xs = [i + (j - 0.5) * width for i in range(len(names))]
        ax.bar(xs, ys, width, yerr=errs, capsize=3, label=f"{what} input")
        top = max(top, *(y + e for y, e in zip(ys, errs, strict=True)))
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel="Avg-Drop (%)", title="Avg-Drop vs the text teacher (mean ± half-range)")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylim(top=top * 1.2)  # room for the legend above the bars
    ax.legend(loc="upper right", ncols=2)
    fig.tight_layout()
    paths = [out / AVG_DROP_PLOT, out / CURVE_PLOT]
    write_bytes_atomic(paths[0], png_bytes(fig))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 3.8))
    start = summary["round0"]["dev_speech_accuracy"]
    for m in methods:
        curves = [r["curve"] for r in m["runs"]]
        steps = [0.0, *(_mean([c[i]["step"] for c in curves]) for i in range(len(curves[0])))]
        acc = [
            start,
            *(_mean([c[i]["speech_accuracy"] for c in curves]) for i in range(len(curves[0]))),
        ]
        ax.plot(steps, acc, marker="o", label=m["label"])
    ax.set(
        xlabel="training step (mean over seeds; points evenly spaced in the token budget)",
        ylabel="speech accuracy (dev)",
        title="dev speech accuracy by training step",
    )
    ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    write_bytes_atomic(paths[1], png_bytes(fig))
    plt.close(fig)
    return paths


def write_study(
    params: Params,
    paths: StudyPaths,
    round0: dict[str, Any],
    runs: list[dict[str, Any]],
    seconds: float,
) -> StudySummary:
    """The table, `study.json` and the plots from round 0's record and every run's."""
    summary = summarise(params, paths, round0, runs)
    summary["seconds"] = round(seconds, 1)
    table = study_table(summary, columns(round0["eval"]))
    table += (
        f"Time: {summary['run_seconds']:.0f} s of training and evaluation (round 0 and every "
        f"run, each timed when it ran); this invocation took {seconds:.0f} s.\n"
    )
    write_text_atomic(paths.out / TABLE, table)
    write_json_atomic(paths.out / SUMMARY, summary)
    plots = _plots(paths.out, summary)
    return StudySummary(paths.out / TABLE, paths.out / SUMMARY, plots, table, seconds)


def study(params: Params, paths: StudyPaths) -> StudySummary:
    """Round 0 evaluated, every (arm, seed) run, then the table, `study.json` and plots."""
    start = time.perf_counter()
    round0 = eval_round0(params, paths)
    runs = [
        run_method(params, paths, arm, seed)
        for arm in params.study.methods
        for seed in params.study.seeds
    ]
    return write_study(params, paths, round0, runs, time.perf_counter() - start)
