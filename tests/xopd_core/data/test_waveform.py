"""The one waveform reader: mono samples at the model's rate, or an error naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from xopd_core.data.waveform import read_waveform


def test_reads_mono_at_the_expected_rate(tmp_path: Path) -> None:
    wave = np.linspace(-0.5, 0.5, 1600, dtype=np.float32)
    sf.write(tmp_path / "a.wav", wave, 16_000, subtype="FLOAT")
    got = read_waveform(tmp_path / "a.wav", 16_000)
    assert got.dtype == np.float32 and got.shape == (1600,)
    assert np.array_equal(got, wave)


@pytest.mark.parametrize(
    ("rate", "channels", "message"),
    [(8_000, 1, "got 8000 Hz with 1 channels"), (16_000, 2, "got 16000 Hz with 2 channels")],
)
def test_refuses_another_rate_or_stereo_naming_the_file(
    tmp_path: Path, rate: int, channels: int, message: str
) -> None:
    path = tmp_path / "b.wav"
    sf.write(path, np.zeros((800, channels), dtype=np.float32), rate)
    with pytest.raises(ValueError, match=rf"b\.wav: expected mono 16000 Hz audio, {message}"):
        read_waveform(path, 16_000)


def test_refuses_a_file_that_is_not_audio(tmp_path: Path) -> None:
    path = tmp_path / "c.wav"
    path.write_bytes(b"not audio at all")
    with pytest.raises(ValueError, match=r"c\.wav: cannot decode audio"):
        read_waveform(path, 16_000)


def test_refuses_audio_longer_than_the_feature_window_naming_the_file(tmp_path: Path) -> None:
    """A longer utterance would be cut to the window without a word: refused instead."""
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(3 * 16_000, dtype=np.float32), 16_000)
    assert read_waveform(path, 16_000, window_s=3).shape == (48_000,)
    with pytest.raises(
        ValueError, match=r"long\.wav: 3\.00 s of audio, longer than the student's 2 s feature"
    ):
        read_waveform(path, 16_000, window_s=2)
