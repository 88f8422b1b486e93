"""Typed manifest rows: read in one place, a wrong type named by file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xopd_core.data.manifest import ManifestError, read_rows

ROW = {
    "id": "train-navigate-00000",
    "split": "train",
    "task": "navigate",
    "kind": "reasoning",
    "audio_path": "audio/train/a.wav",
    "transcript": "take one step left. do you return to the starting point?",
    "answer": "no",
    "solution": "start at x zero, y zero. left one: … the answer is no.",
    "voice": "en-us+f3",
    "rate_wpm": 156,
    "pitch": 46,
    "duration_s": 3.2,
    "sample_rate": 16000,
    "sha256": "0" * 64,
}


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_are_typed_with_their_line_and_extra_keys_ignored(tmp_path: Path) -> None:
    text_row = {k: ROW[k] for k in ("id", "split", "task", "kind", "transcript", "answer")}
    text_row |= {"solution": "s", "split": "text_train", "id": "t1", "source": "mine"}
    first, second = read_rows(write(tmp_path / "m.jsonl", [ROW, text_row]))
    assert (first.line, first.rate_wpm, first.sample_rate, first.audio_path) == (
        1,
        156.0,
        16000,
        "audio/train/a.wav",
    )
    assert (second.line, second.audio_path, second.voice) == (2, None, None)
    with pytest.raises(ValueError, match="frozen"):
        first.answer = "yes"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("change", "field"),
    [({"rate_wpm": "fast"}, "rate_wpm"), ({"answer": None}, "answer"), ({"id": 7}, "id")],
)
def test_a_wrong_type_names_the_file_line_and_field(
    tmp_path: Path, change: dict, field: str
) -> None:
    path = write(tmp_path / "m.jsonl", [ROW, ROW | change])
    with pytest.raises(ManifestError, match=rf"m\.jsonl:2: field '{field}'"):
        read_rows(path)


def test_a_missing_field_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "m.jsonl", [{k: v for k, v in ROW.items() if k != "solution"}])
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: field 'solution': Field required"):
        read_rows(path)
