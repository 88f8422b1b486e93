from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import tiny_synth_params
from tests.solvers import SOLVERS
from xopd_core.config import Difficulty, IntRange, Params
from xopd_core.data import world as world_mod
from xopd_core.data.manifest import (
    MANIFEST_FIELDS,
    SPEECH_SPLITS,
    TEXT_FIELDS,
    manifest_path,
    read_manifest,
)
from xopd_core.data.world import (
    PARA_TASKS,
    WorldGenerationError,
    plan_world,
    speak_corpus,
    synthesize_world,
)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def all_rows(root: Path) -> list[dict]:
    return [r for s in SPEECH_SPLITS for r in read_manifest(manifest_path(root, s))]


def test_same_seed_gives_byte_identical_manifests_and_audio(
    tiny_world: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    # Different worker count: scheduling must not leak into the output.
    synthesize_world(tiny_synth_params(workers=1), again)
    assert tree_digest(again) == tree_digest(tiny_world)


def test_another_seed_gives_another_world() -> None:
    a = plan_world(tiny_synth_params(seed=1))
    b = plan_world(tiny_synth_params(seed=2))
    assert [i.transcript for i in a] != [i.transcript for i in b]


def test_splits_sizes_and_fields(tiny_world: Path) -> None:
    rows = {s: read_manifest(manifest_path(tiny_world, s)) for s in SPEECH_SPLITS}
    p = tiny_synth_params()
    assert len(rows["eval"]) == 4 * p.eval_per_task
    assert len(rows["para_eval"]) == len(PARA_TASKS) * p.para_eval_per_task
    assert len(rows["dev"]) == 4 * p.dev_per_task
    assert len(rows["para_dev"]) == len(PARA_TASKS) * p.para_dev_per_task
    assert len(rows["train"]) == 4 * p.train_per_task + len(PARA_TASKS) * p.para_train_per_task
    for split, split_rows in rows.items():
        for r in split_rows:
            assert set(r) - {"_line"} == set(MANIFEST_FIELDS)
            assert r["split"] == split
    text = read_manifest(manifest_path(tiny_world, "text_train"))
    assert len(text) == 4 * p.text_train_per_task
    assert all(set(r) - {"_line"} == set(TEXT_FIELDS) for r in text)
    assert not (tiny_world / "audio" / "text_train").exists()


def test_audio_is_16k_mono_and_matches_the_manifest(tiny_world: Path) -> None:
    for r in all_rows(tiny_world):
        path = tiny_world / r["audio_path"]
        info = sf.info(str(path))
        assert (info.samplerate, info.channels) == (16_000, 1)
        assert abs(info.frames / info.samplerate - r["duration_s"]) < 1e-3
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"]
        assert 0.3 < r["duration_s"] < 30


def test_reasoning_answers_are_right_and_no_prompt_crosses_splits(tiny_world: Path) -> None:
    rows = all_rows(tiny_world)
    for r in rows:
        if r["kind"] == "reasoning":
            assert SOLVERS[r["task"]](r["transcript"]) == r["answer"]
    train = {r["transcript"] for r in rows if r["split"] == "train"}
    held_out = {r["transcript"] for r in rows if r["split"] != "train"}
    assert not train & held_out
    assert len({r["transcript"] for r in rows}) == len(rows)
    # The text corpus may repeat itself but never an eval prompt, and its answers are right.
    text = read_manifest(manifest_path(tiny_world, "text_train"))
    assert not {r["transcript"] for r in text} & held_out
    assert all(SOLVERS[r["task"]](r["transcript"]) == r["answer"] for r in text)


def test_paralinguistic_answers_live_only_in_the_speaker_settings() -> None:
    p = tiny_synth_params(para_eval_per_task=40)
    v = p.voices
    items = [i for i in plan_world(p) if i.kind == "paralinguistic"]
    for i in items:
        s = i.speaker
        if i.task == "speaking_rate":
            rng = v.fast_rate_wpm if i.answer == "fast" else v.slow_rate_wpm
            assert rng.min <= s.rate_wpm <= rng.max
        elif i.task == "pitch":
            rng = v.high_pitch if i.answer == "high" else v.low_pitch
            assert rng.min <= s.pitch <= rng.max
        else:
            assert (s.variant == v.whisper_variant) == (i.answer == "whisper")
    # The same text question is asked whatever the answer: the transcript alone cannot tell.
    for task, (question, answers) in PARA_TASKS.items():
        mine = [i for i in items if i.task == task]
        assert {i.answer for i in mine} == set(answers)
        assert all(i.transcript.endswith(question) for i in mine)


def test_fast_and_slow_speech_really_differ_in_rate(tiny_world: Path) -> None:
    rows = [r for r in all_rows(tiny_world) if r["task"] == "speaking_rate"]
    per_word = {"fast": [], "slow": []}
    for r in rows:
        per_word[r["answer"]].append(r["duration_s"] / len(r["transcript"].split()))
    assert per_word["fast"] and per_word["slow"]
    assert max(per_word["fast"]) < min(per_word["slow"])


def test_too_many_items_for_the_difficulty_is_a_clear_error() -> None:
    p = tiny_synth_params(
        train_per_task=200,
        difficulty=Difficulty(boolean_operands=IntRange(min=2, max=2)),  # only 32 prompts exist
    )
    with pytest.raises(WorldGenerationError, match="distinct 'boolean_expressions' prompts"):
        plan_world(p)


def test_a_failed_synthesis_leaves_the_previous_world_untouched(
    world_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = tree_digest(world_copy)
    calls = {"n": 0}
    real = world_mod.synthesize_wav

    def flaky(*args, **kwargs):  # fails half-way through, like a full disk would
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(world_mod, "synthesize_wav", flaky)
    with pytest.raises(OSError, match="disk full"):
        synthesize_world(tiny_synth_params(seed=99), world_copy)
    assert tree_digest(world_copy) == before
    assert not [p for p in world_copy.parent.iterdir() if ".staging-" in p.name]


def test_world_json_records_params_and_counts(tiny_world: Path) -> None:
    meta = json.loads((tiny_world / "world.json").read_text())
    assert meta["params"]["seed"] == 7
    text = read_manifest(manifest_path(tiny_world, "text_train"))
    assert sum(meta["rows_per_split"].values()) == len(all_rows(tiny_world)) + len(text)


def test_the_pretraining_corpus_is_deterministic_and_varied() -> None:
    p = Params().synth
    texts = ["take one step left.", "alice lies. bob tells the truth.", "i have two apples."]
    corpus = speak_corpus(p, texts, 30, seed=3)
    # Spoken in parts (as the student stage does), the corpus is the same utterances.
    again = speak_corpus(p, texts, 12, seed=3) + speak_corpus(p, texts, 18, seed=3, start=12)
    assert len(corpus) == 30
    for a, b in zip(corpus, again, strict=True):
        assert a.heard() == b.heard()
        np.testing.assert_array_equal(a.waveform, b.waveform)
    assert {c.transcript for c in corpus} == set(texts)
    # Ordinary speakers mostly, with some of every extreme a paralinguistic item uses.
    v = p.voices
    assert any(c.speaker.variant == v.whisper_variant for c in corpus)
    assert any(c.speaker.rate_wpm >= v.fast_rate_wpm.min for c in corpus)
    assert any(c.speaker.pitch <= v.low_pitch.max for c in corpus)
    assert len({c.speaker.voice for c in corpus}) > 5
    other = speak_corpus(p, texts, 30, seed=4)
    assert [c.heard() for c in other] != [c.heard() for c in corpus]
    with pytest.raises(WorldGenerationError, match="no texts"):
        speak_corpus(p, [], 2, seed=0)


def test_restate_question_begins_every_worked_solution_with_its_question() -> None:
    """synth.restate_question changes the solutions' text only: the same prompts, answers
    and voices, each reasoning solution prefixed with its question word for word."""
    plain = plan_world(tiny_synth_params())
    restated = plan_world(tiny_synth_params(restate_question=True))
    assert len(plain) == len(restated)
    for a, b in zip(plain, restated, strict=True):
        same = (a.id, a.transcript, a.answer, a.speaker)
        assert same == (b.id, b.transcript, b.answer, b.speaker)
        if a.kind == "reasoning":
            assert b.solution == f"{a.transcript} {a.solution}"
        else:
            assert b.solution == a.solution
