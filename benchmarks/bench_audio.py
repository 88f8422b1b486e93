"""The student's audio path: cropped encoder pass (training) against the full 30 s window
(what serving pays), on the same batch, back to back in one run; and feature extraction
with tight padding against the processor's full-window extraction.

Uses real mini-world speech (a small synthesised set) and the default encoder shape.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import soundfile as sf
import torch

from xopd_core.config import Params
from xopd_core.data.manifest import manifest_path, read_manifest
from xopd_core.data.world import synthesize_world
from xopd_core.models.audio import AudioFeatures, encoder_states, extract_features
from xopd_core.models.build import build_teacher
from xopd_core.models.student import build_processor, build_student
from xopd_core.models.tokenizer import train_tokenizer

BATCH = 32
REPEATS = 3


def _best(fn: Any) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run() -> dict[str, Any]:
    defaults = Params()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mini"
        synth = defaults.synth.model_copy(
            update={
                "train_per_task": 8,
                "eval_per_task": 2,
                "para_train_per_task": 3,
                "para_eval_per_task": 2,
                "text_train_per_task": 8,
            }
        )
        synthesize_world(synth, root)
        rows = read_manifest(manifest_path(root, "train"))[:BATCH]
        waves = [sf.read(str(root / r["audio_path"]), dtype="float32")[0] for r in rows]
    tok = train_tokenizer(t for r in rows for t in (r["transcript"], r["solution"]))
    shape = defaults.student.audio
    model = build_student(build_teacher(defaults.teacher.model, tok, 0), tok, shape, 0)
    processor = build_processor(tok, shape)
    extractor: Any = processor.feature_extractor

    feats = extract_features(processor, waves)
    full_inputs = extractor(
        waves, sampling_rate=16000, return_attention_mask=True, return_tensors="pt"
    )
    # The same encoder pass on the uncropped 30 s window: what serving pays per utterance.
    full = [
        AudioFeatures(mel, f.frames)
        for mel, f in zip(full_inputs["input_features"], feats, strict=True)
    ]

    def full_pass() -> None:
        with torch.no_grad():
            encoder_states(model, full)

    def cropped_pass() -> None:
        with torch.no_grad():
            encoder_states(model, feats)

    full_s, cropped_s = _best(full_pass), _best(cropped_pass)
    feat_full_s = _best(lambda: extractor(waves, sampling_rate=16000, return_attention_mask=True))
    feat_tight_s = _best(lambda: extract_features(processor, waves))
    seconds = sum(len(w) for w in waves) / 16000
    return {
        "batch": len(waves),
        "audio_seconds": round(seconds, 1),
        "encoder_full_window_s": round(full_s, 3),
        "encoder_cropped_s": round(cropped_s, 3),
        "encoder_speedup": round(full_s / cropped_s, 2),
        "features_full_window_s": round(feat_full_s, 3),
        "features_tight_s": round(feat_tight_s, 3),
        "features_speedup": round(feat_full_s / feat_tight_s, 2),
        "targets": [
            {
                "what": "cropped encoder pass at least 2x cheaper than the 30 s window",
                "met": full_s / cropped_s >= 2.0,
            }
        ],
    }
