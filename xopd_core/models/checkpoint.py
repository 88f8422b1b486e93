"""Checkpoint folders: HF `save_pretrained` (safetensors only) + tokenizer + resolved config.

A folder is written to a staging sibling and swapped in whole, so a crash never leaves half
a checkpoint where a good one was. Weights load with safetensors only (never pickle).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from xopd_core.atomic import atomic_directory, write_json_atomic

WEIGHTS = "model.safetensors"
RESOLVED_CONFIG = "xopd.json"
# transformers 5.17 writes Qwen2-Audio's language model as `language_model.model.model.*`;
# it reloads that, but vLLM 0.31 refuses it ("no module or parameter named 'model'").
# The legacy names load in both (checked in tests/xopd_core/models).
_DOUBLED_PREFIX = "language_model.model.model."
_LEGACY_PREFIX = "language_model.model."


def normalise_weight_names(folder: Path) -> None:
    path = folder / WEIGHTS
    tensors = load_file(str(path))
    if not any(k.startswith(_DOUBLED_PREFIX) for k in tensors):
        return
    fixed = {
        (_LEGACY_PREFIX + k[len(_DOUBLED_PREFIX) :] if k.startswith(_DOUBLED_PREFIX) else k): v
        for k, v in tensors.items()
    }
    save_file(fixed, str(path), metadata={"format": "pt"})


def weights_sha256(folder: Path) -> str:
    """Hash of the tensors (names, dtypes, shapes, bytes), independent of file metadata."""
    h = hashlib.sha256()
    tensors = load_file(str(Path(folder) / WEIGHTS))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    model: PreTrainedModel,
    out_dir: Path,
    *,
    savers: list[Any],
    resolved_config: dict[str, Any],
) -> str:
    """Save `model` and each of `savers` (tokenizer, processor: anything with
    `save_pretrained`) into `out_dir` atomically; returns the weights' sha256."""
    with atomic_directory(Path(out_dir)) as staging:
        model.save_pretrained(str(staging), safe_serialization=True)
        if not (staging / WEIGHTS).is_file():
            raise RuntimeError(f"expected a single {WEIGHTS}; the model was saved sharded")
        normalise_weight_names(staging)
        for s in savers:
            s.save_pretrained(str(staging))
        digest = weights_sha256(staging)
        write_json_atomic(staging / RESOLVED_CONFIG, {"weights_sha256": digest, **resolved_config})
    return digest
