from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

import tasks.eval
from tasks.eval import (
    METRICS,
    TEACHER_SCORES,
    TeacherScoresError,
    evaluate,
    measured_teacher_scores,
    teacher_scores,
)
from tests.pipeline_fixtures import TinyStudent
from xopd_core.config import EvalParams, Params
from xopd_core.data.manifest import manifest_path, read_manifest
from xopd_core.data.validation import read_validated_manifests
from xopd_core.data.world import ANSWER_SETS
from xopd_core.eval.metrics import edit_distance
from xopd_core.models.checkpoint import weights_sha256

TASKS = ("boolean_expressions", "navigate", "object_counting", "web_of_lies")
PARA = ("pitch", "speaking_rate", "whisper")
FAST = Params(eval=EvalParams(max_new_tokens=24))


# The tiny teacher scores 0 on some tasks (Avg-Drop undefined), so the reference scores here
# are written by hand; the eval stage reads nothing else from the teacher.
TEACHER = {"boolean_expressions": 0.8, "navigate": 0.9, "object_counting": 0.5, "web_of_lies": 1.0}


def test_eval_scores_both_modalities_against_the_teacher(
    tiny_student: TinyStudent, tiny_world: Path, tmp_path: Path
) -> None:
    reference = tmp_path / "teacher_metrics.json"
    scores = {f"text_accuracy_{t}": v for t, v in TEACHER.items()}
    reference.write_text(json.dumps({"text_accuracy_mean": 0.8, **scores}))
    student_dir = tiny_student.summary.checkpoint
    summary = evaluate(FAST, tiny_world, student_dir, reference, tmp_path / "eval")
    tmp_path = tmp_path / "eval"
    m = json.loads((tmp_path / METRICS).read_text())
    assert m == json.loads(json.dumps(summary.metrics))
    for key in ("avg_drop_speech", "avg_drop_text", "paralinguistic_accuracy"):
        assert isinstance(m[key], float)
    # Recompute every score from the saved responses, independently of the evaluator.
    lines = [json.loads(x) for x in (tmp_path / "responses.jsonl").read_text().splitlines()]
    eval_rows = read_manifest(manifest_path(tiny_world, "eval"))
    para_rows = read_manifest(manifest_path(tiny_world, "para_eval"))
    by = defaultdict(list)
    for x in lines:
        by[(x["modality"], x["task"])].append(x["predicted"] == x["answer"])
    assert len(lines) == 2 * len(eval_rows) + len(para_rows)
    teacher = teacher_scores(reference)
    assert teacher == TEACHER
    for modality in ("speech", "text"):
        acc = {t: sum(by[(modality, t)]) / len(by[(modality, t)]) for t in TASKS}
        for t in TASKS:
            assert m[f"{modality}_accuracy_{t}"] == pytest.approx(acc[t])
        drops = [(teacher[t] - acc[t]) / teacher[t] * 100 for t in TASKS]
        assert m[f"avg_drop_{modality}"] == pytest.approx(sum(drops) / len(drops))
    para = [sum(by[("paralinguistic", t)]) / len(by[("paralinguistic", t)]) for t in PARA]
    assert m["paralinguistic_accuracy"] == pytest.approx(sum(para) / len(para))
    assert m["avg_drop_tasks"] == len(TASKS)
    assert "| navigate |" in summary.table_path.read_text()
    # Hearing: the saved transcripts, scored independently, give the reported WER.
    heard = [json.loads(x) for x in (tmp_path / "transcripts.jsonl").read_text().splitlines()]
    assert [h["id"] for h in heard] == [r["id"] for r in eval_rows]
    edits = words = 0
    for h in heard:
        ref, hyp = h["transcript"].replace(".", " ").split(), h["heard"].replace(".", " ").split()
        edits += edit_distance([w.strip(",?") for w in hyp], [w.strip(",?") for w in ref])
        words += len(ref)
    assert m["asr_wer"] == pytest.approx(edits / words)

    again = evaluate(FAST, tiny_world, student_dir, reference, tmp_path / "again")
    strip = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
    assert strip(again.metrics) == strip(summary.metrics)  # greedy: deterministic


def test_eval_names_a_bad_teacher_metrics_file(tmp_path: Path) -> None:
    bad = tmp_path / "teacher.json"
    bad.write_text(json.dumps({"text_accuracy_mean": 0.9}))
    with pytest.raises(TeacherScoresError, match=r"teacher\.json: no text_accuracy_<task>"):
        teacher_scores(bad)
    bad.write_text(json.dumps({"text_accuracy_navigate": 0, "text_accuracy_web_of_lies": 0}))
    with pytest.raises(TeacherScoresError, match=r"teacher\.json: the teacher scores 0 on every"):
        teacher_scores(bad)
    bad.write_text("{not json")
    with pytest.raises(TeacherScoresError, match=r"teacher\.json: cannot read"):
        teacher_scores(bad)


def test_the_teacher_is_measured_on_the_eval_items_once_a_campaign(
    tiny_teacher, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given its folder, the eval stage measures the teacher's text accuracy itself (your
    own teacher has no teacher-stage metrics): the same numbers the teacher stage measured
    in memory after training, written with what they were measured on, and reused by a
    later evaluation of the same teacher, items and settings (each round reuses round 0's)."""
    params = Params(eval=EvalParams(max_new_tokens=24))  # the tiny teacher stage's length
    rows = read_validated_manifests(tiny_world, ["eval"], params.validate_)["eval"]
    out = tmp_path / "round0" / TEACHER_SCORES
    calls, real = [], tasks.eval.evaluate_text

    def spy(model, tokenizer, rows, *args):  # the tiny teacher answers nothing right: show
        calls.append((model.config.model_type, tokenizer.name_or_path, len(rows), args))
        return real(model, tokenizer, rows, *args)

    monkeypatch.setattr(tasks.eval, "evaluate_text", spy)  # what it decodes, and how
    measured, recorded = measured_teacher_scores(params, tiny_teacher.checkpoint, rows, ANSWER_SETS)
    monkeypatch.undo()
    assert calls == [("qwen2", str(tiny_teacher.checkpoint), len(rows), (24, 64, 2, ANSWER_SETS))]
    by_stage = {
        k.removeprefix("text_accuracy_"): v
        for k, v in tiny_teacher.metrics.items()
        if k.startswith("text_accuracy_") and k != "text_accuracy_mean"
    }
    assert measured == by_stage
    assert recorded["teacher_weights_sha256"] == weights_sha256(tiny_teacher.checkpoint)
    assert recorded["text_accuracy_navigate"] == by_stage["navigate"]
    # A record of the same teacher, items and settings is read, not measured again (shown
    # by a score no measurement gave); it is what the round's own eval writes beside it.
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps({**recorded, "text_accuracy_navigate": 0.625}))
    reused, again_recorded = measured_teacher_scores(
        params, tiny_teacher.checkpoint, rows, ANSWER_SETS, [out]
    )
    assert reused["navigate"] == 0.625 == again_recorded["text_accuracy_navigate"]
    # Other eval settings: measured again.
    longer = Params(eval=EvalParams(max_new_tokens=25))
    again, _ = measured_teacher_scores(longer, tiny_teacher.checkpoint, rows, ANSWER_SETS, [out])
    assert again["navigate"] == by_stage["navigate"]
