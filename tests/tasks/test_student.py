from __future__ import annotations

import json
from pathlib import Path

import soundfile as sf
import torch
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from tasks.student import student
from tasks.teacher import TeacherSummary
from tests.pipeline_fixtures import TINY_STUDENT, TinyStudent
from xopd_core.config import Params
from xopd_core.data.manifest import manifest_path, read_manifest
from xopd_core.models.checkpoint import RESOLVED_CONFIG, weights_sha256
from xopd_core.models.prompts import speech_prompt_ids
from xopd_core.models.tokenizer import AUDIO, token_id


def test_student_stage_learns_in_every_phase(tiny_student: TinyStudent) -> None:
    assert set(tiny_student.losses) == {"ctc", "align", "read", "instruct"}
    for phase, losses in tiny_student.losses.items():
        assert len(losses) == getattr(TINY_STUDENT, phase).steps
        assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, phase


def test_student_checkpoint_reloads_with_its_processor(
    tiny_student: TinyStudent, tiny_teacher: TeacherSummary, tiny_world: Path
) -> None:
    summary = tiny_student.summary
    out = summary.checkpoint
    assert summary.weights_sha256 == weights_sha256(out)
    resolved = json.loads((out / RESOLVED_CONFIG).read_text())
    assert resolved["teacher_weights_sha256"] == tiny_teacher.weights_sha256
    assert resolved["params"]["instruct"]["steps"] == TINY_STUDENT.instruct.steps
    metrics = json.loads(summary.metrics_path.read_text())
    rows = read_manifest(manifest_path(tiny_world, "train"))
    assert metrics["train_utterances"] == len(rows)
    assert metrics["pretrain_utterances"] == TINY_STUDENT.pretrain_utterances > 0
    assert metrics["ctc_units"] > 20  # phonemes and the word boundary
    assert metrics["mix_asr"] == TINY_STUDENT.instruct.asr_items
    assert metrics["read_text_replay"] == TINY_STUDENT.read.text_replay_items > 0
    assert metrics["weights_sha256"] == summary.weights_sha256

    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(out)).eval()
    processor = AutoProcessor.from_pretrained(str(out))
    wave = sf.read(str(tiny_world / rows[0]["audio_path"]), dtype="float32")[0]
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = processor(text=text, audio=[wave], sampling_rate=16000, return_tensors="pt")
    n_audio = int((inputs["input_ids"] == token_id(processor.tokenizer, AUDIO)).sum())
    assert inputs["input_ids"][0].tolist() == speech_prompt_ids(processor.tokenizer, n_audio)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert torch.isfinite(logits).all()


def test_student_stage_is_deterministic(
    tiny_world: Path, tiny_teacher: TeacherSummary, tmp_path: Path
) -> None:
    short = TINY_STUDENT.model_copy(
        update={
            name: getattr(TINY_STUDENT, name).model_copy(update={"steps": 2})
            for name in ("ctc", "align", "instruct")
        }
    )
    digests = [
        student(
            Params(student=short),
            tiny_world,
            tiny_teacher.checkpoint,
            tmp_path / run / "student",
            tmp_path / run / "metrics.json",
        ).weights_sha256
        for run in ("a", "b")
    ]
    assert digests[0] == digests[1]


def test_corpus_prompts_join_the_spoken_reasoning_items_of_the_instruction_phase(
    tiny_world: Path, tiny_teacher: TeacherSummary, tmp_path: Path
) -> None:
    def run(corpus_items: int, read_steps: int) -> dict:
        short = TINY_STUDENT.model_copy(
            update={
                "ctc": TINY_STUDENT.ctc.model_copy(update={"steps": 2}),
                "align": TINY_STUDENT.align.model_copy(update={"steps": 2}),
                "read": TINY_STUDENT.read.model_copy(update={"steps": read_steps}),
                "instruct": TINY_STUDENT.instruct.model_copy(
                    update={"steps": 2, "corpus_items": corpus_items}
                ),
            }
        )
        out = tmp_path / f"{corpus_items}-{read_steps}"
        student(Params(student=short), tiny_world, tiny_teacher.checkpoint, out / "s", out / "m")
        return json.loads((out / "m").read_text())

    plain, more = run(0, 2), run(4, 2)
    assert more["mix_speech_solution"] == plain["mix_speech_solution"] + 4
    assert more["mix_paralinguistic"] == plain["mix_paralinguistic"]
    assert more["weights_sha256"] != plain["weights_sha256"]
    no_reading = run(4, 0)  # the corpus states are cached without the reading phase too
    assert no_reading["mix_speech_solution"] == more["mix_speech_solution"]
