"""The `eval` stage, reused by every round: how well a speech student reasons from speech and
from text, against the teacher's text scores, and whether it still hears what only audio says.

Greedy decoding, strict answer extraction, fixed batch order: deterministic for a fixed
checkpoint. Writes flat metrics JSON (DVC metrics), a Markdown table, and every response
(JSONL) so a score can be traced to the outputs behind it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from tasks.layout import EVAL_METRICS as METRICS
from tasks.layout import EVAL_RESPONSES as RESPONSES
from tasks.layout import data_root, round_checkpoint, round_eval, teacher_reference
from xopd_core.atomic import write_json_atomic, write_text_atomic
from xopd_core.config import Params
from xopd_core.data.manifest import ManifestRow, manifest_path
from xopd_core.data.tasks import answer_sets
from xopd_core.data.validation import read_validated_manifests
from xopd_core.data.waveform import read_waveform, require_audio_fits
from xopd_core.eval.evaluate import (
    ItemResult,
    accuracy_by_task,
    evaluate_speech,
    evaluate_text,
    transcribe,
)
from xopd_core.eval.metrics import AnswerSets, TeacherScoresError, avg_drop, word_error_rate
from xopd_core.models.checkpoint import load_causal_lm, weights_sha256
from xopd_core.models.families import load_student
from xopd_core.models.tokenizer import load_tokenizer

TABLE = "table.md"
TRANSCRIPTS = "transcripts.jsonl"  # what the student heard in each eval utterance
TEACHER_SCORES = "teacher.json"  # the teacher's text accuracy on the same items


@dataclass(frozen=True)
class EvalSummary:
    metrics_path: Path
    table_path: Path
    responses_path: Path
    metrics: dict[str, Any]


def teacher_scores(path: Path) -> dict[str, float]:
    """Per-task text accuracy of the teacher (`text_accuracy_<task>` keys of its metrics)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TeacherScoresError(f"{path}: cannot read the teacher's metrics ({err})") from err
    return _usable(_text_accuracies(data, path), path)


def _text_accuracies(data: dict[str, Any], path: Path) -> dict[str, float]:
    scores = {
        k.removeprefix("text_accuracy_"): float(v)
        for k, v in data.items()
        if k.startswith("text_accuracy_") and k != "text_accuracy_mean"
    }
    if not scores:
        raise TeacherScoresError(f"{path}: no text_accuracy_<task> keys")
    return scores


def _usable(scores: dict[str, float], source: Path) -> dict[str, float]:
    if all(v <= 0 for v in scores.values()):
        raise TeacherScoresError(
            f"{source}: the teacher scores 0 on every task; the Avg-Drop against it is undefined"
        )
    return scores


def measured_teacher_scores(
    params: Params,
    teacher_dir: Path,
    rows: list[ManifestRow],
    answers: AnswerSets,
    records: Sequence[Path] = (),
) -> tuple[dict[str, float], dict[str, Any]]:
    """The teacher's greedy text accuracy per task on `rows` (their transcripts rendered with
    its own chat template), decoded as the student's text answers are, and its record: the
    scores with what they were measured on (weights, items, answer sets, eval settings). The
    first of `records` (earlier records' files) measured on the same is read instead: each
    round reuses round 0's."""
    items = json.dumps([[r.id, r.task, r.transcript, r.answer] for r in rows])
    key = {
        "teacher_weights_sha256": weights_sha256(teacher_dir),
        "items_sha256": hashlib.sha256(items.encode()).hexdigest(),
        "answers": {t: sorted(a) for t, a in sorted(answers.items())},
        "eval": params.eval.model_dump(mode="json"),
    }
    for path in records:
        if path.is_file():
            try:
                recorded = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            if {k: recorded.get(k) for k in key} == key:
                return _text_accuracies(recorded, path), recorded
    p = params.eval
    model = load_causal_lm(teacher_dir)
    tokenizer = load_tokenizer(teacher_dir)
    results = evaluate_text(
        model, tokenizer, rows, p.max_new_tokens, p.batch_size, p.processes, answers
    )
    scores = accuracy_by_task(results)
    return scores, {**key, **{f"text_accuracy_{t}": a for t, a in scores.items()}}


def _table(
    teacher: dict[str, float],
    speech: dict[str, float],
    text: dict[str, float],
    para: dict[str, float],
    metrics: dict[str, Any],
) -> str:
    excluded = sorted(t for t, v in teacher.items() if v <= 0)
    lines = [
        "| task | teacher (text) | student (speech) | student (text) |",
        "|---|---|---|---|",
    ]
    for task in sorted(teacher):
        lines.append(f"| {task} | {teacher[task]:.3f} | {speech[task]:.3f} | {text[task]:.3f} |")
    lines += [
        "",
        f"Avg-Drop, speech input: {metrics['avg_drop_speech']:.2f} %  ",
        f"Avg-Drop, text input: {metrics['avg_drop_text']:.2f} %  ",
        f"Word error rate of the student's own transcripts: {metrics['asr_wer']:.4f}",
        *(
            [f"(left out of the Avg-Drops, the teacher scores 0 on: {', '.join(excluded)})"]
            if excluded
            else []
        ),
        "",
    ]
    if para:
        lines += [
            "| paralinguistic task | accuracy |",
            "|---|---|",
            *(f"| {task} | {acc:.3f} |" for task, acc in sorted(para.items())),
            f"| **mean** | **{metrics['paralinguistic_accuracy']:.3f}** |",
            "",
        ]
    return "\n".join(lines)


def evaluate(
    params: Params,
    data_root: Path,
    student_dir: Path,
    teacher: Path,
    out_dir: Path,
    split: Literal["eval", "dev"] = "eval",
    reuse_teacher_scores: Path | None = None,
) -> EvalSummary:
    """`split`: the held-out items to score, `eval` (+ `para_eval` where the data has it) or,
    for tuning, `dev` (+ `para_dev`). `teacher`: the teacher's folder, whose text accuracy
    on the split is measured here (into `teacher.json`, unless `reuse_teacher_scores` holds
    it), or a metrics file with its `text_accuracy_<task>`."""
    p = params.eval
    start = time.perf_counter()
    answers = answer_sets(params.validate_)
    # The hash also checks the checkpoint is whole safetensors before anything loads it; the
    # gate compares it with the candidate's, so metrics cannot be pinned on other weights.
    digest = weights_sha256(student_dir)
    manifests = read_validated_manifests(
        data_root, [split], params.validate_, optional=[f"para_{split}"]
    )
    eval_rows, para_rows = manifests[split], manifests.get(f"para_{split}", [])
    if Path(teacher).is_dir():
        measured, teacher_record = measured_teacher_scores(
            params,
            Path(teacher),
            eval_rows,
            answers,
            [p for p in (reuse_teacher_scores, Path(out_dir) / TEACHER_SCORES) if p is not None],
        )
        teacher_acc = _usable(measured, Path(teacher))
    else:
        teacher_acc = teacher_scores(teacher)
        teacher_record = {
            "from": str(teacher),
            **{f"text_accuracy_{t}": a for t, a in teacher_acc.items()},
        }
    # A relative drop from 0 is undefined: such a task is left out of both Avg-Drops, and
    # the table and `avg_drop_tasks` say so (only tiny test teachers score 0 anywhere).
    reference = {t: v for t, v in teacher_acc.items() if v > 0}
    model, processor = load_student(student_dir)

    extractor = processor.feature_extractor
    for name, rows in manifests.items():
        require_audio_fits(
            rows,
            manifest_path(data_root, name),
            window_s=extractor.chunk_length,
            sample_rate=extractor.sampling_rate,
        )

    def waves(rows: list[ManifestRow]) -> list[Any]:
        rate, window = extractor.sampling_rate, extractor.chunk_length
        return [read_waveform(data_root / str(r.audio_path), rate, window) for r in rows]

    def spoken(rows: list[ManifestRow]) -> list[ItemResult]:
        if not rows:
            return []
        return evaluate_speech(
            model,
            processor,
            rows,
            waves(rows),
            p.max_new_tokens,
            p.batch_size,
            p.processes,
            answers,
        )

    speech, para = spoken(eval_rows), spoken(para_rows)
    text = evaluate_text(
        model, processor.tokenizer, eval_rows, p.max_new_tokens, p.batch_size, p.processes, answers
    )
    # Hearing: the student's own transcript of each eval utterance against the real one.
    heard = transcribe(
        model, processor, waves(eval_rows), p.max_new_tokens, p.batch_size, p.processes
    )
    asr_wer = word_error_rate(heard, [r.transcript for r in eval_rows])
    speech_acc, text_acc, para_acc = (accuracy_by_task(r) for r in (speech, text, para))
    missing = sorted(set(teacher_acc) - set(speech_acc))
    if missing:
        raise TeacherScoresError(
            f"{teacher}: teacher scores tasks {missing} that the eval split lacks"
        )
    metrics: dict[str, Any] = {
        "avg_drop_speech": avg_drop(reference, speech_acc),
        "avg_drop_text": avg_drop(reference, text_acc),
        "avg_drop_tasks": len(reference),
        "asr_wer": asr_wer,
        # Only where the data has paralinguistic items (the gate then keeps them).
        **({"paralinguistic_accuracy": sum(para_acc.values()) / len(para_acc)} if para_acc else {}),
        "speech_accuracy_mean": sum(speech_acc.values()) / len(speech_acc),
        "text_accuracy_mean": sum(text_acc.values()) / len(text_acc),
        **{f"speech_accuracy_{t}": a for t, a in speech_acc.items()},
        **{f"text_accuracy_{t}": a for t, a in text_acc.items()},
        **{f"paralinguistic_accuracy_{t}": a for t, a in para_acc.items()},
        **{f"teacher_text_accuracy_{t}": a for t, a in teacher_acc.items()},
        "split": split,
        "weights_sha256": digest,
        "eval_items": len(eval_rows),
        "para_eval_items": len(para_rows),
        "seconds": round(time.perf_counter() - start, 1),
    }
    out_dir = Path(out_dir)
    responses = "".join(
        json.dumps({"modality": modality, **asdict(r), "correct": r.correct}) + "\n"
        for modality, results in (("speech", speech), ("text", text), ("paralinguistic", para))
        for r in results
    )
    write_text_atomic(out_dir / RESPONSES, responses)
    transcripts = "".join(
        json.dumps({"id": r.id, "transcript": r.transcript, "heard": h}) + "\n"
        for r, h in zip(eval_rows, heard, strict=True)
    )
    write_text_atomic(out_dir / TRANSCRIPTS, transcripts)
    write_json_atomic(out_dir / TEACHER_SCORES, teacher_record)
    table = _table(teacher_acc, speech_acc, text_acc, para_acc, metrics)
    write_text_atomic(out_dir / TABLE, table)
    write_json_atomic(out_dir / METRICS, metrics)
    return EvalSummary(out_dir / METRICS, out_dir / TABLE, out_dir / RESPONSES, metrics)


def eval_round(params: Params, root: Path, k: int) -> EvalSummary:
    """Round `k`'s student on the work folder `root` (round 0: `inputs.student`), scored
    against `inputs.teacher`'s text accuracy on the same items."""
    student_dir, out_dir = round_checkpoint(params, root, k), round_eval(root, k)
    return evaluate(
        params,
        data_root(params, root),
        student_dir,
        teacher_reference(params, root),
        out_dir,
        reuse_teacher_scores=round_eval(root, 0) / TEACHER_SCORES,
    )


def run(params: Params, root: Path, progress: bool = False) -> str:
    """The stage on the work folder `root` (dvc.yaml's paths): round 0, the student."""
    s = eval_round(params, root, 0)
    return f"{s.table_path.read_text()}\n→ {s.metrics_path}"
