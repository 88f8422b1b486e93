"""Text to speech with espeak-ng, resampled to the target rate with sox; WAV I/O via soundfile.

espeak-ng writes 22,050 Hz; sox converts to 16 kHz mono 16-bit with dithering off (`-D`) so
the same text and settings give byte-identical files. torchaudio.load/save are not used: on
CPU machines they need torchcodec, which the set-up removes (DESIGN.md §5).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ESPEAK = "espeak-ng"
SOX = "sox"


class SpeechToolError(RuntimeError):
    """espeak-ng or sox is missing or failed."""


@dataclass(frozen=True)
class Speaker:
    language: str  # espeak-ng voice, e.g. "en-us"
    variant: str  # espeak-ng variant, e.g. "f3" or "whisper"
    rate_wpm: int
    pitch: int  # espeak-ng pitch, 0..99

    @property
    def voice(self) -> str:
        """The voice as the manifests name it, e.g. "en-gb+whisper"."""
        return f"{self.language}+{self.variant}"

    @property
    def espeak_voice(self) -> str:
        """The `-v` argument that really applies the variant: the language's voice file plus
        the variant ("gmw/en+whisper"). espeak-ng 1.51 ignores the variant of
        "en-gb+whisper" — every en-gb variant gave the same audio as plain en-gb — while
        "gmw/en+whisper" whispers (tests/xopd_core/data/test_speech.py)."""
        return f"{voice_file(self.language)}+{self.variant}"


@functools.cache
def voice_file(language: str) -> str:
    """espeak-ng's voice file for a language name (`en-gb` → `gmw/en`): of the voices
    `espeak-ng --voices=<language>` lists for exactly that language, the one of highest
    priority (lowest number)."""
    listing = subprocess.run(
        [ESPEAK, f"--voices={language}"], capture_output=True, check=False, text=True
    )
    rows = [line.split() for line in listing.stdout.splitlines()[1:]]
    found = sorted((int(r[0]), r[4]) for r in rows if len(r) >= 5 and r[1] == language)
    if listing.returncode != 0 or not found:
        raise SpeechToolError(
            f"espeak-ng has no voice for language {language!r} "
            f"(`espeak-ng --voices={language}` lists none for exactly that name)"
        )
    return found[0][1]


def require_speech_tools() -> None:
    missing = [t for t in (ESPEAK, SOX) if shutil.which(t) is None]
    if missing:
        raise SpeechToolError(
            f"missing {', '.join(missing)}: run `make setup` (installs the Debian packages "
            "espeak-ng and sox)"
        )


def _espeak_wav(text: str, speaker: Speaker, name: str) -> bytes:
    voice = ["-v", speaker.espeak_voice, "-s", str(speaker.rate_wpm), "-p", str(speaker.pitch)]
    tts = subprocess.run([ESPEAK, *voice, "--stdout", text], capture_output=True, check=False)
    if tts.returncode != 0 or not tts.stdout:
        raise SpeechToolError(
            f"espeak-ng failed for {name} (voice {speaker.voice}): "
            f"{tts.stderr.decode(errors='replace').strip() or 'no audio produced'}"
        )
    return tts.stdout


def _sox(wav: bytes, out_format: list[str], out: str, name: str) -> bytes:
    conv = subprocess.run(
        [SOX, "-t", "wav", "-", "-D", *out_format, out], input=wav, capture_output=True, check=False
    )
    if conv.returncode != 0:
        raise SpeechToolError(
            f"sox failed for {name}: {conv.stderr.decode(errors='replace').strip()}"
        )
    return conv.stdout


def synthesize_wav(text: str, speaker: Speaker, out_path: Path, sample_rate: int) -> None:
    """Speak `text` into a mono 16-bit WAV at `sample_rate` (overwrites `out_path`)."""
    wav = _espeak_wav(text, speaker, out_path.name)
    out_format = f"-r {sample_rate} -c 1 -b 16 -e signed-integer -t wav".split()
    _sox(wav, out_format, str(out_path), out_path.name)


def speak(text: str, speaker: Speaker, sample_rate: int) -> np.ndarray:
    """Speak `text` into a float32 waveform in [-1, 1) at `sample_rate`, never touching disk:
    the same samples `synthesize_wav` writes, read back as soundfile reads 16-bit PCM."""
    wav = _espeak_wav(text, speaker, repr(text[:40]))
    out_format = f"-r {sample_rate} -c 1 -b 16 -e signed-integer -t raw".split()
    pcm = _sox(wav, out_format, "-", repr(text[:40]))
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0


@functools.cache
def word_phonemes(word: str, language: str) -> tuple[str, ...]:
    """espeak-ng's phonemes of one word as `language` says it (`-x` mnemonics, stress marks
    dropped): ("t", "eI", "k") for "take". The synthesiser speaks from exactly these, so they
    are what the audio carries; spelling is not (e.g. "eight" and "ate")."""
    out = subprocess.run(
        [ESPEAK, "-q", "-x", "--sep=_", "-v", voice_file(language), word],
        capture_output=True,
        check=False,
        text=True,
    )
    phones = tuple(p.strip("',\n ") for p in out.stdout.replace(" ", "_").split("_"))
    phones = tuple(p for p in phones if p)
    if out.returncode != 0 or not phones:
        raise SpeechToolError(
            f"espeak-ng gave no phonemes for {word!r} in {language!r}: {out.stderr.strip()}"
        )
    return phones


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
