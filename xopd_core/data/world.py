"""The mini world's generator: reasoning and paralinguistic items, spoken by espeak-ng.

Builds `train`, `dev`, `para_dev`, `eval` and `para_eval` manifests plus 16 kHz mono audio
under one data root (DESIGN.md §4). Every item's randomness comes from its own seeded
stream, so the same params give byte-identical manifests and audio. No prompt appears in
more than one split.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from xopd_core.atomic import atomic_directory, write_json_atomic
from xopd_core.config import IntRange, SynthParams
from xopd_core.data.manifest import (
    AUDIO_DIR,
    TEXT_FIELDS,
    TEXT_SPLITS,
    ManifestRow,
    manifest_path,
    write_manifest,
)
from xopd_core.data.reasoning import (
    NAMES,
    NUMBER_WORDS,
    OBJECTS,
    REASONING_TASKS,
    count_phrase,
    steps_phrase,
    truth_word,
)
from xopd_core.data.speech import (
    Speaker,
    require_speech_tools,
    sha256_file,
    speak,
    synthesize_wav,
)

# Paralinguistic tasks: (question, {answer: which speaker setting carries it}).
PARA_TASKS: dict[str, tuple[str, tuple[str, str]]] = {
    "speaking_rate": ("is this said fast or slow?", ("fast", "slow")),
    "pitch": ("is the voice high or low?", ("high", "low")),
    "whisper": ("is the voice a whisper or normal?", ("whisper", "normal")),
}
# Every task's possible answers (what the strict answer extractor and the dataset suite accept).
ANSWER_SETS: dict[str, frozenset[str]] = {
    "navigate": frozenset({"yes", "no"}),
    "web_of_lies": frozenset({"yes", "no"}),
    "boolean_expressions": frozenset({"true", "false"}),
    "object_counting": frozenset(NUMBER_WORDS),
    **{task: frozenset(answers) for task, (_, answers) in PARA_TASKS.items()},
}
MAX_DUPLICATE_RETRIES = 2000


class WorldGenerationError(RuntimeError):
    """The requested sizes cannot be generated (e.g. too few distinct prompts)."""


@dataclass(frozen=True)
class PlannedItem:
    id: str
    split: str
    task: str
    kind: str  # "reasoning" | "paralinguistic"
    transcript: str
    answer: str
    solution: str
    speaker: Speaker


@dataclass
class WorldSummary:
    data_root: str
    rows_per_split: dict[str, int]
    rows_per_task: dict[str, dict[str, int]]
    audio_seconds: dict[str, float]
    max_duration_s: float
    min_duration_s: float
    seconds: float
    manifests: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        spoken = sum(n for s, n in self.rows_per_split.items() if s not in TEXT_SPLITS)
        text = sum(n for s, n in self.rows_per_split.items() if s in TEXT_SPLITS)
        return f"{spoken} utterances + {text} text-only items in {self.seconds:.1f} s"


def _pick(rng: random.Random, r: IntRange) -> int:
    return rng.randint(r.min, r.max)


def _ordinary_speaker(rng: random.Random, p: SynthParams) -> Speaker:
    v = p.voices
    return Speaker(
        rng.choice(v.languages),
        rng.choice(v.variants),
        _pick(rng, v.normal_rate_wpm),
        _pick(rng, v.normal_pitch),
    )


def _carrier_sentence(rng: random.Random, p: SynthParams) -> str:
    """A neutral sentence from the reasoning vocabulary; the question follows it."""
    kind = rng.randrange(3)
    if kind == 0:
        cat = rng.choice(sorted(OBJECTS))
        s, pl = rng.choice(OBJECTS[cat])
        return f"i have {count_phrase(rng.randint(1, 3), s, pl)}."
    if kind == 1:
        return f"{rng.choice(NAMES)} {truth_word(rng.random() < 0.5)}."
    d = rng.choice(["forward", "backward", "left", "right"])
    return steps_phrase(rng.randint(1, p.difficulty.navigate_max_step), d)


def _para_item(rng: random.Random, p: SynthParams, task: str) -> tuple[str, str, Speaker]:
    question, (a_pos, a_neg) = PARA_TASKS[task]
    answer = a_pos if rng.random() < 0.5 else a_neg
    v = p.voices
    speaker = _ordinary_speaker(rng, p)
    if task == "speaking_rate":
        rate = _pick(rng, v.fast_rate_wpm if answer == "fast" else v.slow_rate_wpm)
        speaker = Speaker(speaker.language, speaker.variant, rate, speaker.pitch)
    elif task == "pitch":
        pitch = _pick(rng, v.high_pitch if answer == "high" else v.low_pitch)
        speaker = Speaker(speaker.language, speaker.variant, speaker.rate_wpm, pitch)
    elif answer == "whisper":
        speaker = Speaker(speaker.language, v.whisper_variant, speaker.rate_wpm, speaker.pitch)
    carrier = " ".join(_carrier_sentence(rng, p) for _ in range(2))
    return f"{carrier} {question}", answer, speaker


def _plan_split(
    p: SynthParams,
    split: str,
    tasks: list[str],
    per_task: int,
    make: Callable[[random.Random, str], tuple[str, str, str, Speaker]],
    kind: str,
    blocked: set[str],
    distinct: bool = True,
) -> list[PlannedItem]:
    """`per_task` items per task whose prompts avoid `blocked`. With `distinct`, each new
    prompt is added to `blocked` (no repeats anywhere); without, repeats within the split
    are allowed (a large text corpus over a small prompt space)."""
    items = []
    for task in tasks:
        made = 0
        attempt = 0
        misses = 0
        while made < per_task:
            # One stream per (seed, split, task, attempt): independent of worker scheduling.
            rng = random.Random(f"xopd-world:{p.seed}:{split}:{task}:{attempt}")
            attempt += 1
            transcript, answer, solution, speaker = make(rng, task)
            key = " ".join(transcript.split())
            if key in blocked:
                misses += 1
                if misses > MAX_DUPLICATE_RETRIES:
                    raise WorldGenerationError(
                        f"cannot find {per_task} distinct '{task}' prompts for split '{split}' "
                        f"(only {made} after {attempt} tries): raise synth.difficulty or lower "
                        f"the per-task counts"
                    )
                continue
            misses = 0
            if distinct:
                blocked.add(key)
            item_id = f"{split}-{task}-{made:05d}"
            items.append(
                PlannedItem(item_id, split, task, kind, transcript, answer, solution, speaker)
            )
            made += 1
    return items


def plan_world(p: SynthParams) -> list[PlannedItem]:
    """All items, text only. Eval splits are planned first so train never repeats them."""

    def reasoning(rng: random.Random, task: str) -> tuple[str, str, str, Speaker]:
        item = REASONING_TASKS[task](rng, p.difficulty)
        solution = f"{item.prompt} {item.solution}" if p.restate_question else item.solution
        return item.prompt, item.answer, solution, _ordinary_speaker(rng, p)

    def para(rng: random.Random, task: str) -> tuple[str, str, str, Speaker]:
        transcript, answer, speaker = _para_item(rng, p, task)
        return transcript, answer, f"the answer is {answer}.", speaker

    seen: set[str] = set()
    rtasks, ptasks = list(REASONING_TASKS), list(PARA_TASKS)
    eval_items = _plan_split(p, "eval", rtasks, p.eval_per_task, reasoning, "reasoning", seen)
    para_eval = _plan_split(
        p, "para_eval", ptasks, p.para_eval_per_task, para, "paralinguistic", seen
    )
    dev = _plan_split(p, "dev", rtasks, p.dev_per_task, reasoning, "reasoning", seen)
    dev += _plan_split(p, "para_dev", ptasks, p.para_dev_per_task, para, "paralinguistic", seen)
    held_out = set(seen)
    train = _plan_split(p, "train", rtasks, p.train_per_task, reasoning, "reasoning", seen)
    train += _plan_split(p, "train", ptasks, p.para_train_per_task, para, "paralinguistic", seen)
    text = _plan_split(
        p,
        "text_train",
        rtasks,
        p.text_train_per_task,
        reasoning,
        "reasoning",
        held_out,
        distinct=False,
    )
    return eval_items + para_eval + dev + train + text


def _text_row(item: PlannedItem) -> dict[str, Any]:
    return {k: getattr(item, k) for k in TEXT_FIELDS}


def _render(item: PlannedItem, root: Path, sample_rate: int) -> dict[str, Any]:
    rel = Path(AUDIO_DIR) / item.split / f"{item.id}.wav"
    out = root / rel
    synthesize_wav(item.transcript, item.speaker, out, sample_rate)
    info = sf.info(str(out))
    return {
        **_text_row(item),
        "audio_path": rel.as_posix(),
        "voice": item.speaker.voice,
        "rate_wpm": item.speaker.rate_wpm,
        "pitch": item.speaker.pitch,
        "duration_s": round(info.frames / info.samplerate, 4),
        "sample_rate": info.samplerate,
        "sha256": sha256_file(out),
    }


def synthesize_world(
    p: SynthParams,
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> WorldSummary:
    """Generate the mini world into `out_dir`, replacing it atomically when complete."""
    require_speech_tools()
    start = time.perf_counter()
    items = plan_world(p)
    spoken = [i for i in items if i.split not in TEXT_SPLITS]
    with atomic_directory(Path(out_dir)) as staging:
        for split in {i.split for i in spoken}:
            (staging / AUDIO_DIR / split).mkdir(parents=True, exist_ok=True)
        rows = []
        with ThreadPoolExecutor(max_workers=p.workers) as pool:
            for n, row in enumerate(pool.map(lambda i: _render(i, staging, p.sample_rate), spoken)):
                rows.append(row)
                if progress is not None:
                    progress(n + 1, len(spoken))
        rows += [_text_row(i) for i in items if i.split in TEXT_SPLITS]
        by_split: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            by_split.setdefault(row["split"], []).append(row)
        for split, split_rows in by_split.items():
            write_manifest(manifest_path(staging, split), split_rows)
        durations = [r["duration_s"] for r in rows if "duration_s" in r]
        summary = WorldSummary(
            data_root=str(out_dir),
            rows_per_split={s: len(r) for s, r in sorted(by_split.items())},
            rows_per_task={
                s: {t: sum(1 for x in r if x["task"] == t) for t in sorted({x["task"] for x in r})}
                for s, r in sorted(by_split.items())
            },
            audio_seconds={
                s: round(sum(x["duration_s"] for x in r), 2)
                for s, r in sorted(by_split.items())
                if s not in TEXT_SPLITS
            },
            max_duration_s=max(durations),
            min_duration_s=min(durations),
            seconds=0.0,
            manifests={s: str(manifest_path(Path(out_dir), s)) for s in sorted(by_split)},
        )
        write_json_atomic(
            staging / "world.json",
            {"params": p.model_dump(mode="json", exclude={"workers"}), **_counts_only(summary)},
        )
    summary.seconds = round(time.perf_counter() - start, 2)
    return summary


def _counts_only(s: WorldSummary) -> dict[str, Any]:
    """The deterministic part of the summary (no paths, no timings) for world.json."""
    return {k: v for k, v in asdict(s).items() if k not in ("data_root", "seconds", "manifests")}


def _varied_speaker(rng: random.Random, p: SynthParams) -> Speaker:
    """Any speaker the world has: mostly ordinary, sometimes slow, fast, low, high or
    whispered (each about as often as in the paralinguistic items), so an encoder
    pre-trained on these hears every voice it will meet."""
    v = p.voices
    speaker = _ordinary_speaker(rng, p)
    rate, pitch, variant = speaker.rate_wpm, speaker.pitch, speaker.variant
    roll = rng.random()
    if roll < 0.1:
        rate = _pick(rng, v.slow_rate_wpm)
    elif roll < 0.2:
        rate = _pick(rng, v.fast_rate_wpm)
    roll = rng.random()
    if roll < 0.1:
        pitch = _pick(rng, v.low_pitch)
    elif roll < 0.2:
        pitch = _pick(rng, v.high_pitch)
    if rng.random() < 0.1:
        variant = v.whisper_variant
    return Speaker(speaker.language, variant, rate, pitch)


@dataclass(frozen=True)
class HeardUtterance:
    """What the encoder's pre-training reads of an utterance besides its audio: the words
    and the speaker (voice `language+variant`, rate, pitch)."""

    transcript: str
    voice: str
    rate_wpm: float
    pitch: float

    @classmethod
    def of(cls, row: ManifestRow) -> HeardUtterance:
        """A speech split's row (validated: its speaker fields are present)."""
        assert row.voice is not None and row.rate_wpm is not None and row.pitch is not None
        return cls(row.transcript, row.voice, row.rate_wpm, row.pitch)


@dataclass(frozen=True)
class SpokenText:
    """One utterance of the encoder's pre-training corpus (never written to disk)."""

    transcript: str
    speaker: Speaker
    waveform: np.ndarray

    def heard(self) -> HeardUtterance:
        """The utterance without its waveform (what is kept once its features are taken)."""
        s = self.speaker
        return HeardUtterance(self.transcript, s.voice, s.rate_wpm, s.pitch)


def speak_corpus(
    p: SynthParams, texts: list[str], n: int, seed: int, workers: int = 2, start: int = 0
) -> list[SpokenText]:
    """Utterances `start` … `start + n - 1` of the encoder's pre-training corpus: texts drawn
    from `texts`, each by a speaker drawn as `_varied_speaker` does; audio as cheap as TTS
    makes it (real speech encoders hear because they are pre-trained on far more audio than
    any reasoning set). Deterministic: utterance k has its own seeded stream, so speaking
    the corpus in parts gives the same utterances as speaking it at once."""
    if n == 0:
        return []
    if not texts:
        raise WorldGenerationError("no texts to speak for the pre-training corpus")
    require_speech_tools()
    plan = []
    for k in range(start, start + n):
        rng = random.Random(f"xopd-pretrain:{seed}:{k}")
        plan.append((rng.choice(texts), _varied_speaker(rng, p)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        waves = list(pool.map(lambda ts: speak(ts[0], ts[1], p.sample_rate), plan))
    return [SpokenText(t, s, w) for (t, s), w in zip(plan, waves, strict=True)]
