"""espeak-ng voices: each configured language speaks each variant, whisper included; speech
made in memory equals the written files; words have the phonemes espeak-ng speaks from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from xopd_core.config import Params
from xopd_core.data.speech import (
    Speaker,
    SpeechToolError,
    sha256_file,
    speak,
    synthesize_wav,
    voice_file,
    word_phonemes,
)


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


def test_speech_made_in_memory_equals_the_written_file(tmp_path: Path) -> None:
    speaker = Speaker("en-gb", "f2", 170, 50)
    synthesize_wav("take two steps left.", speaker, tmp_path / "a.wav", 16_000)
    written, rate = sf.read(str(tmp_path / "a.wav"), dtype="float32")
    spoken = speak("take two steps left.", speaker, 16_000)
    assert rate == 16_000 and spoken.dtype == np.float32
    np.testing.assert_array_equal(spoken, written)


def test_word_phonemes_are_espeaks_without_stress_marks() -> None:
    assert word_phonemes("take", "en-us") == ("t", "eI", "k")
    assert word_phonemes("steps", "en-gb") == ("s", "t", "E", "p", "s")
    # Spelling is not sound: two spellings, one pronunciation.
    assert word_phonemes("eight", "en-us") == word_phonemes("ate", "en-us")
