"""espeak-ng voices: each configured language speaks each variant, whisper included."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from xopd_core.config import Params
from xopd_core.data.speech import Speaker, SpeechToolError, sha256_file, synthesize_wav, voice_file


def _periodicity(path: Path) -> float:
    """Mean peak of the normalised autocorrelation at pitch lags (2.5-20 ms) over 40 ms frames
    that are not silent: voiced speech is periodic, a whisper is noise."""
    wave, rate = sf.read(str(path), dtype="float32")
    size = int(0.04 * rate)
    peaks = []
    for start in range(0, len(wave) - size, size):
        x = wave[start : start + size] - wave[start : start + size].mean()
        if np.sqrt(np.mean(x**2)) < 0.01:
            continue
        ac = np.correlate(x, x, "full")[size - 1 :]
        peaks.append(float(ac[int(0.0025 * rate) : int(0.02 * rate)].max() / ac[0]))
    return float(np.mean(peaks))


@pytest.mark.parametrize("language", Params().synth.voices.languages)
def test_every_variant_of_every_language_is_heard(language: str, tmp_path: Path) -> None:
    """Two voice variants and the whisper give three different recordings, and the whisper
    is far less periodic than a voiced variant. Naming the voice "en-gb+<variant>" failed
    this: espeak-ng 1.51 spoke plain en-gb for every variant, whisper included."""
    out = {}
    for variant in ("f2", "m3", "whisper"):
        out[variant] = tmp_path / f"{variant}.wav"
        speaker = Speaker(language, variant, rate_wpm=160, pitch=50)
        synthesize_wav("alice lies. does bob tell the truth?", speaker, out[variant], 16_000)
    assert len({sha256_file(p) for p in out.values()}) == 3
    voiced = min(_periodicity(out["f2"]), _periodicity(out["m3"]))
    # Measured at 22 kHz: whispers 0.20, voiced 0.49-0.63.
    assert _periodicity(out["whisper"]) < 0.6 * voiced


def test_an_unknown_language_is_named() -> None:
    with pytest.raises(SpeechToolError, match="no voice for language 'xx-nowhere'"):
        voice_file("xx-nowhere")
