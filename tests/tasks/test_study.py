"""The `study` stage's own logic: its paired tests and table checked against numbers
recomputed here from per-item responses, its params, a run that cannot meet its budget, and
the CLI. The whole study on the tiny world runs in tests/flows/test_study.py."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import yaml
from dvc.parsing.context import Context

from tasks.cli import main
from tasks.layout import EVAL_RESPONSES
from tasks.study import (
    StudyError,
    StudyPaths,
    curve_tokens,
    paired_test,
    run_folder,
    run_method,
    write_study,
)
from xopd_core.config import (
    ConfigError,
    Params,
    StudyMethod,
    StudyParams,
    load_params,
    parse_params,
)

REPO = Path(__file__).resolve().parents[2]
TASKS = ("navigate", "object_counting", "web_of_lies", "boolean_expressions")
ITEMS = [f"item{i}" for i in range(30)]


def two_sided_mcnemar(a: dict[str, bool], b: dict[str, bool]) -> float:
    """Exact binomial two-sided p over the discordant pairs, from the definition."""
    wins = sum(a[i] and not b[i] for i in a)
    losses = sum(b[i] and not a[i] for i in a)
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def shown(p: float) -> str:
    """How the table prints a p-value: three decimals, or two significant digits below 0.001."""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def fake_eval(folder: Path, correct: dict[str, bool], drop: float) -> dict[str, float]:
    """An eval folder as tasks/eval.py writes it: responses of every modality, metrics."""
    folder.mkdir(parents=True)
    rows = [
        {"modality": modality, "id": i, "correct": ok if modality == "speech" else not ok}
        for modality in ("speech", "text", "paralinguistic")
        for i, ok in correct.items()
    ]
    (folder / EVAL_RESPONSES).write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = {
        "avg_drop_speech": drop,
        "avg_drop_text": drop / 10,
        "paralinguistic_accuracy": 0.9,
        "asr_wer": 0.05,
        "speech_accuracy_mean": sum(correct.values()) / len(correct),
        **{f"speech_accuracy_{t}": 0.5 for t in TASKS},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def test_paired_test_matches_hand_computed_cases() -> None:
    right = {str(i): True for i in range(5)}
    wrong = {str(i): False for i in range(5)}
    # 5 discordant items, all won: one-sided p = 1/32, two-sided 2/32.
    assert paired_test(right, wrong, "x") == {"wins": 5, "losses": 0, "p_value": 2 / 32}
    assert paired_test(wrong, right, "x") == {"wins": 0, "losses": 5, "p_value": 2 / 32}
    assert paired_test(right, right, "x") == {"wins": 0, "losses": 0, "p_value": 1.0}
    with pytest.raises(StudyError, match="different speech items"):
        paired_test(right, {"9": True}, "x")


def test_table_means_spreads_and_p_values_match_a_recomputation(tmp_path: Path) -> None:
    """Two seeds of three arms with varied per-item results, written as eval folders: every
    p-value in study.json and the table equals one recomputed from the responses files."""
    arms = [
        StudyMethod(name="xopd_l0.5", method="xopd"),
        StudyMethod(name="sft", method="sft"),
        StudyMethod(name="grpo", method="grpo"),
    ]
    params = Params(study=StudyParams(methods=arms, seeds=[3, 4], student_tokens=500))
    paths = StudyPaths(*(tmp_path / n for n in ("d", "s", "t", "m.json", "out", "models")))
    rng = random.Random(0)
    base = {i: rng.random() < 0.3 for i in ITEMS}
    round0 = {
        "eval": fake_eval(paths.out / "round0" / "eval", base, 40.0),
        "dev": {"speech_accuracy_mean": 0.3},
        "seconds": 5.0,
    }
    runs, drops = [], {}
    for k, arm in enumerate(arms):
        for seed in params.study.seeds:
            correct = {i: rng.random() < 0.3 + 0.2 * k for i in ITEMS}
            drops[(arm.name, seed)] = 30.0 - 5 * k + seed
            metrics = fake_eval(
                run_folder(paths.out, arm.name, seed) / "eval", correct, drops[(arm.name, seed)]
            )
            runs.append(
                {
                    "name": arm.name,
                    "seed": seed,
                    "train": {"steps": 10 + k, "student_tokens": 500, "teacher_tokens": 0},
                    "eval": metrics,
                    "curve": [
                        {"step": 5, "student_tokens": 250, "speech_accuracy": 0.4},
                        {"step": 10 + k, "student_tokens": 500, "speech_accuracy": 0.5},
                    ],
                    "seconds": 2.0,
                }
            )
    summary = write_study(params, paths, round0, runs, seconds=7.0)
    data = json.loads(summary.summary_path.read_text())
    rows = [line.split(" | ") for line in summary.table.splitlines() if line.startswith("| ")]
    assert [r[0] for r in rows] == ["| method", "| round 0", "| X-OPD λ=0.5", "| SFT", "| GRPO"]
    assert rows[0][-1] == "p vs X-OPD λ=0.5 |"
    assert data["run_seconds"] == 5.0 + 6 * 2.0 and "17 s of training and evaluation" in (
        summary.table
    )

    def responses(name: str, seed: int) -> dict[str, bool]:
        lines = (run_folder(paths.out, name, seed) / "eval" / EVAL_RESPONSES).read_text()
        rows = [json.loads(x) for x in lines.splitlines()]
        return {r["id"]: r["correct"] for r in rows if r["modality"] == "speech"}

    p_values = set()
    for row, arm in zip(rows[2:], arms, strict=True):
        (method,) = [m for m in data["methods"] if m["name"] == arm.name]
        runs_of = method["runs"]
        vs0 = [two_sided_mcnemar(responses(arm.name, s), base) for s in (3, 4)]
        assert [r["vs_round0"]["p_value"] for r in runs_of] == pytest.approx(vs0)
        assert row[-2] == ", ".join(map(shown, vs0))
        if arm.name == "xopd_l0.5":
            assert row[-1] == "— |"
        else:
            vsref = [
                two_sided_mcnemar(responses(arm.name, s), responses("xopd_l0.5", s)) for s in (3, 4)
            ]
            assert [r["vs_reference"]["p_value"] for r in runs_of] == pytest.approx(vsref)
            assert row[-1] == ", ".join(map(shown, vsref)) + " |"
        p_values |= set(vs0)
        # Speech Avg-Drop: the mean over the two seeds ± half their range (seeds differ by 1).
        mean = (drops[(arm.name, 3)] + drops[(arm.name, 4)]) / 2
        assert row[1] == f"{mean:.2f} ± 0.50"
    assert len(p_values) > 2 and min(p_values) < 0.05  # the items really differ
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in summary.plots)


def test_curve_points_are_evenly_spaced_in_the_budget() -> None:
    assert curve_tokens(40, 2) == [20]
    assert curve_tokens(10, 3) == [4, 7]
    assert curve_tokens(115_000, 1) == []


def test_study_params_are_checked() -> None:
    assert Params().study.reference == "xopd_l0.5" and len(Params().study.methods) == 7
    for bad, needle in (
        ({"reference": "nope"}, "study.reference 'nope' is not one of"),
        ({"seeds": [1, 1]}, "study.seeds must be distinct"),
        ({"curve_points": 0}, "study.curve_points"),
        ({"methods": [{"name": "a", "method": "sft"}] * 2, "reference": "a"}, "unique"),
        ({"methods": [{"name": "a b", "method": "sft"}], "reference": "a b"}, "name"),
    ):
        with pytest.raises(ConfigError, match=needle):
            parse_params({"study": bad})


def test_a_run_that_cannot_meet_its_budget_stops_the_study(
    tiny_world: Path, tiny_pipeline_params: Params, tiny_teacher, tiny_student, tmp_path: Path
) -> None:
    params = tiny_pipeline_params.model_copy(
        update={"study": StudyParams(student_tokens=10_000, max_steps=1, curve_points=1)}
    )
    paths = StudyPaths(
        tiny_world,
        tiny_student.summary.checkpoint,
        tiny_teacher.checkpoint,
        tiny_teacher.metrics_path,
        tmp_path / "out",
        tmp_path / "models",
    )
    (sft,) = [m for m in params.study.methods if m.name == "sft"]
    with pytest.raises(StudyError, match=r"not the budget of 10000 .*raise study.max_steps"):
        run_method(params, paths, sft, 0)


def test_cli_study_without_a_student_says_to_run_the_pipeline_first(tmp_path: Path, capsys) -> None:
    assert main(["study", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "xopd study: error:" in err and "run `make run` first" in err


def test_the_dvc_stage_runs_the_study_on_what_the_pipeline_makes() -> None:
    """study/dvc.yaml (its own file: a plain `dvc repro` stays the root pipeline's): the same
    command, every dependency a repo file or an output of a root stage, real params groups."""
    stage = yaml.safe_load((REPO / "study" / "dvc.yaml").read_text())["stages"]["study"]
    assert (stage["cmd"], stage["wdir"]) == ("xopd study", "..")
    produced = {
        next(iter(out)) if isinstance(out, dict) else out
        for s in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values()
        for out in [*s.get("outs", []), *s.get("metrics", [])]
    }
    # `${inputs.*}` read from the root params.yaml (the file's `vars`), as DVC resolves them.
    context = Context(load_params(REPO / "params.yaml").to_yaml_dict())
    deps = [context.resolve_str(d) for d in stage["deps"]]
    for dep in deps:
        assert (REPO / dep).exists() or dep in produced, dep
    assert {"models/student", "models/teacher", "data/mini", "tasks/study.py"} <= set(deps)
    groups = {p.split(".")[0] for p in stage["params"]}
    assert groups == {"study", "train", "eval", "inputs", "validate"}
    assert groups - {"validate"} <= set(Params.model_fields)
    assert set(stage["outs"]) == {"reports/study", "models/study"}
