"""The one way xopd reads an utterance for a model: mono float32 samples at the rate the
model's feature extractor expects, or a clear error naming the file (the validate stage's
suite checks whole datasets first; this guards every reader that comes after it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from xopd_core.errors import AudioError


def read_waveform(path: Path | str, sample_rate: int, window_s: float | None = None) -> np.ndarray:
    """`path`'s samples as a 1-D float32 array; refused unless mono at `sample_rate` Hz and,
    with `window_s`, no longer than the model's feature window (which would hear only the
    window's worth: the rest of the question would be silently cut)."""
    try:
        wave, rate = sf.read(str(path), dtype="float32")
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"{path}: cannot decode audio ({err})") from None
    if rate != sample_rate or wave.ndim != 1:
        channels = 1 if wave.ndim == 1 else wave.shape[1]
        raise AudioError(
            f"{path}: expected mono {sample_rate} Hz audio, got {rate} Hz with {channels} channels"
        )
    if window_s is not None and len(wave) > window_s * sample_rate:
        raise AudioError(f"{path}: {too_long(len(wave) / sample_rate, window_s)}")
    return wave


def too_long(duration_s: float, window_s: float) -> str:
    return (
        f"{duration_s:.2f} s of audio, longer than the student's {window_s:g} s feature window "
        "(its encoder hears one window); cut the utterance, or give the student a longer "
        "window (student.audio.chunk_length_s for the mini world's)"
    )


def require_audio_fits(
    rows: Sequence[Any], manifest: Path, *, window_s: float, sample_rate: int
) -> None:
    """Refuse, before any step, a manifest row the student cannot hear as it is: audio at
    another sample rate than its feature extractor's (the validated `sample_rate` field), or
    longer than its feature window (the validated `duration_s`), naming the manifest, the row
    and its audio file."""
    for line, r in enumerate(rows, start=1):
        where = f"{manifest} row {line} (id {r.id}, {r.audio_path})"
        if r.sample_rate is not None and r.sample_rate != sample_rate:
            raise AudioError(
                f"{where}: {r.sample_rate} Hz audio, but the student's feature extractor "
                f"takes {sample_rate} Hz; resample the data (or validate.sample_rate)"
            )
        if r.duration_s is not None and r.duration_s > window_s:
            raise AudioError(f"{where}: {too_long(r.duration_s, window_s)}")
