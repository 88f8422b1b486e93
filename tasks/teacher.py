"""The `teacher` stage (mini world only): tokenizer + tiny Qwen2 text LM on worked solutions.

Trains on the train split's reasoning items read as text, evaluates greedy text accuracy on
the eval split, and saves a checkpoint folder (safetensors, tokenizer, resolved config)
plus metrics for DVC.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.layout import DATA, TEACHER, TEACHER_METRICS
from tasks.progress import step_bar
from xopd_core.atomic import write_json_atomic
from xopd_core.config import Params
from xopd_core.data.validation import read_validated_manifests
from xopd_core.eval.evaluate import accuracy_by_task, evaluate_text
from xopd_core.models.build import build_teacher
from xopd_core.models.checkpoint import save_checkpoint
from xopd_core.models.prompts import text_prompts_ids
from xopd_core.models.tokenizer import IM_END, PAD, token_id, train_tokenizer
from xopd_core.train.sft import SftExample, train_sft, weighted_by_group


@dataclass(frozen=True)
class TeacherSummary:
    checkpoint: Path
    metrics_path: Path
    metrics: dict[str, Any]
    weights_sha256: str


def teacher(
    params: Params,
    data_root: Path,
    out_dir: Path,
    metrics_path: Path,
    on_step: Callable[[int, float], None] | None = None,
) -> TeacherSummary:
    p = params.teacher
    start = time.perf_counter()
    rows = read_validated_manifests(data_root, ["train", "text_train", "eval"], params.validate_)
    speech_train, text_train, eval_rows = rows["train"], rows["text_train"], rows["eval"]
    # The vocabulary covers every training text, the paralinguistic items' too: the student
    # shares this tokenizer and must be able to say "fast" or "whisper".
    tokenizer = train_tokenizer(
        t for r in speech_train + text_train for t in (r.transcript, r.solution)
    )
    eos = token_id(tokenizer, IM_END)
    # The teacher is a text LLM: it learns from the text corpus only.
    prompts = text_prompts_ids(tokenizer, [r.transcript for r in text_train])
    solutions = tokenizer([r.solution for r in text_train])["input_ids"]
    examples = [
        SftExample(prompt, [*solution, eos])
        for prompt, solution in zip(prompts, solutions, strict=True)
    ]
    tasks = [r.task for r in text_train]
    if p.task_weights is not None:
        try:
            order = weighted_by_group(tasks, p.task_weights, p.seed)
        except ValueError as err:
            raise ValueError(f"params teacher.task_weights: {err}") from err
        examples = [examples[i] for i in order]
        tasks = [tasks[i] for i in order]
    mix = Counter(tasks)
    model = build_teacher(p.model, tokenizer, seed=p.seed)
    losses = train_sft(
        model,
        examples,
        pad_id=token_id(tokenizer, PAD),
        steps=p.steps,
        batch_size=p.batch_size,
        lr=p.lr,
        warmup=p.warmup_steps,
        seed=p.seed,
        weight_decay=p.weight_decay,
        precision=p.precision,
        micro_batch_size=p.micro_batch_size,
        processes=p.processes,
        on_step=on_step,
    )
    train_s = time.perf_counter() - start
    results = evaluate_text(
        model, tokenizer, eval_rows, max_new_tokens=p.max_new_tokens, processes=p.processes
    )
    acc = accuracy_by_task(results)
    metrics: dict[str, Any] = {
        "text_accuracy_mean": sum(acc.values()) / len(acc),
        **{f"text_accuracy_{t}": a for t, a in acc.items()},
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "parameters": sum(t.numel() for t in model.parameters()),
        "vocab_size": len(tokenizer),
        "train_examples": len(examples),
        **{f"train_examples_{t}": n for t, n in sorted(mix.items())},
        "eval_items": len(results),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    digest = save_checkpoint(
        model,
        out_dir,
        savers=[tokenizer],
        resolved_config={"stage": "teacher", "params": params.teacher.model_dump(mode="json")},
    )
    metrics["weights_sha256"] = digest
    write_json_atomic(Path(metrics_path), metrics)
    return TeacherSummary(Path(out_dir), Path(metrics_path), metrics, digest)


def run(params: Params, root: Path, progress: bool = False) -> str:
    """The stage on the work folder `root` (dvc.yaml's paths)."""
    bar = step_bar("teacher", params.teacher.steps) if progress else None
    m = teacher(params, root / DATA, root / TEACHER, root / TEACHER_METRICS, on_step=bar).metrics
    return f"text accuracy {m['text_accuracy_mean']:.3f} in {m['total_seconds']:.0f} s → {TEACHER}"
