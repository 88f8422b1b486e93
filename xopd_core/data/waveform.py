"""The one way xopd reads an utterance for a model: mono float32 samples at the rate the
model's feature extractor expects, or a clear error naming the file (the validate stage's
suite checks whole datasets first; this guards every reader that comes after it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf


def read_waveform(path: Path | str, sample_rate: int) -> np.ndarray:
    """`path`'s samples as a 1-D float32 array; refused unless mono at `sample_rate` Hz."""
    try:
        wave, rate = sf.read(str(path), dtype="float32")
    except (sf.LibsndfileError, RuntimeError) as err:
        raise ValueError(f"{path}: cannot decode audio ({err})") from None
    if rate != sample_rate or wave.ndim != 1:
        channels = 1 if wave.ndim == 1 else wave.shape[1]
        raise ValueError(
            f"{path}: expected mono {sample_rate} Hz audio, got {rate} Hz with {channels} channels"
        )
    return wave
