"""Manifests: one JSON object per line describing an utterance and its text counterpart.

A row pairs the speech prompt S (`audio_path`, relative to the data root) with its text form
T (`transcript`), the exact `answer` and a worked reference `solution`. Reading reports the
file and line of anything malformed; writing is atomic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from xopd_core.atomic import write_text_atomic

TEXT_FIELDS: tuple[str, ...] = ("id", "split", "task", "kind", "transcript", "answer", "solution")
AUDIO_FIELDS: tuple[str, ...] = (
    "audio_path",
    "voice",
    "rate_wpm",
    "pitch",
    "duration_s",
    "sample_rate",
    "sha256",
)
MANIFEST_FIELDS: tuple[str, ...] = (
    *TEXT_FIELDS[:4],
    "audio_path",
    *TEXT_FIELDS[4:],
    *AUDIO_FIELDS[1:],
)
# Speech splits pair every prompt with audio; text-only splits hold the text LLM's corpus
# (text is cheap to have in abundance, speech is not: the same holds for real corpora).
# dev/para_dev are held out like eval/para_eval, for tuning (never tune on eval).
SPEECH_SPLITS = ("train", "dev", "para_dev", "eval", "para_eval")
TEXT_SPLITS = ("text_train",)
SPLITS = SPEECH_SPLITS + TEXT_SPLITS
TRAIN_SPLITS = ("train", "text_train")
MANIFEST_DIR = "manifests"
AUDIO_DIR = "audio"


class ManifestError(ValueError):
    """A manifest file cannot be parsed; the message names the file and line."""


def manifest_path(data_root: Path, split: str) -> Path:
    return Path(data_root) / MANIFEST_DIR / f"{split}.jsonl"


def default_data_root(manifest: Path) -> Path:
    """`<root>/manifests/x.jsonl` → `<root>`; any other layout → the manifest's folder."""
    manifest = Path(manifest)
    parent = manifest.parent
    return parent.parent if parent.name == MANIFEST_DIR else parent


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL manifest; each gets `_line` (1-based line number) for error reports."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise ManifestError(
                f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
            )
        row["_line"] = lineno
        rows.append(row)
    if not rows:
        raise ManifestError(f"{path}: manifest has no rows")
    return rows


class ManifestRow(BaseModel):
    """One manifest row as the stages use it, after the dataset passed validation: a text item
    (every split) and, in speech splits, its utterance. Extra keys a user's manifest carries
    are ignored; `line` is the row's 1-based line in its file."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    id: str
    split: str
    task: str
    kind: str
    transcript: str
    answer: str
    solution: str
    audio_path: str | None = None
    voice: str | None = None
    rate_wpm: float | None = None
    pitch: float | None = None
    duration_s: float | None = None
    sample_rate: int | None = None
    sha256: str | None = None
    line: int = Field(default=0, alias="_line")


def typed_rows(path: Path, rows: list[dict[str, Any]]) -> list[ManifestRow]:
    """`read_manifest`'s rows of `path` as ManifestRows; a wrong type is a ManifestError naming
    the file, line and field."""
    out = []
    for row in rows:
        try:
            out.append(ManifestRow.model_validate(row))
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(x) for x in first["loc"])
            raise ManifestError(
                f"{path}:{row.get('_line', '?')}: field '{field}': {first['msg']}"
            ) from None
    return out


def read_rows(path: Path) -> list[ManifestRow]:
    """A manifest's rows, typed (for data that need not pass the validation suite first:
    tests, benchmarks; the stages read through `read_validated_manifests`)."""
    return typed_rows(Path(path), read_manifest(path))


def fields_for_split(split: str) -> tuple[str, ...]:
    return TEXT_FIELDS if split in TEXT_SPLITS else MANIFEST_FIELDS


def write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    lines = [
        json.dumps({k: row[k] for k in fields_for_split(row["split"])}, ensure_ascii=False)
        for row in rows
    ]
    write_text_atomic(Path(path), "\n".join(lines) + "\n")
