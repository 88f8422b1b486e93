"""Checkpoint folders: HF `save_pretrained` (safetensors only) + tokenizer + resolved config.

A folder is written to a staging sibling and swapped in whole, so a crash never leaves half
a checkpoint where a good one was, and never with non-finite weights. Weights load with
safetensors only (never pickle): `require_safetensors_checkpoint` is called before any load.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from xopd_core.atomic import atomic_directory, write_json_atomic
from xopd_core.errors import CheckpointError

WEIGHTS = "model.safetensors"
RESOLVED_CONFIG = "xopd.json"
# transformers 5.17 writes Qwen2-Audio's language model as `language_model.model.model.*`;
# it reloads that, but vLLM 0.31 refuses it ("no module or parameter named 'model'").
# The legacy names load in both (checked in tests/xopd_core/models).
_DOUBLED_PREFIX = "language_model.model.model."
_LEGACY_PREFIX = "language_model.model."
_PICKLED = ("pytorch_model.bin", "model.pt", "model.pth", "pytorch_model.bin.index.json")


def require_safetensors_checkpoint(folder: Path) -> Path:
    """`folder/model.safetensors`, checked before anything loads it: present (a folder with
    only pickled weights is refused, never `torch.load`ed) and whole (its header parses and
    the file is as long as the header says). Cheap: reads the header only."""
    folder = Path(folder)
    path = folder / WEIGHTS
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if not path.is_file():
        pickled = [name for name in _PICKLED if (folder / name).is_file()]
        hint = (
            f" (it holds {', '.join(pickled)}: xopd loads safetensors only, never pickle; "
            "convert it with save_pretrained(safe_serialization=True))"
            if pickled
            else ""
        )
        raise CheckpointError(f"{path}: no safetensors weights{hint}")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"header claims {n} bytes, the file has {size}")
            header = json.loads(f.read(n))
        ends = [
            int(v["data_offsets"][1])
            for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)
        ]
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    expected = 8 + n + max(ends, default=0)
    if size != expected:
        raise CheckpointError(
            f"{path}: truncated or padded safetensors file ({size} bytes, its header "
            f"describes {expected})"
        )
    return path


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return sorted(
        name
        for name, t in tensors.items()
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
    )


def require_finite_weights(folder: Path) -> None:
    """Refuse a checkpoint whose weights hold a NaN or an infinity, naming the file."""
    path = require_safetensors_checkpoint(folder)
    _refuse_non_finite(load_file(str(path)), path)


def _refuse_non_finite(tensors: dict[str, torch.Tensor], where: Path) -> None:
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(
            f"{where}: {len(bad)} weight tensor(s) hold NaN or infinity (e.g. {bad[0]}); "
            "refusing non-finite weights"
        )


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
    tensors = load_file(str(require_safetensors_checkpoint(folder)))
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
        # Never write a checkpoint that cannot be trained or served from (the staging
        # folder is dropped, the previous checkpoint stays).
        _refuse_non_finite(load_file(str(staging / WEIGHTS)), Path(out_dir) / WEIGHTS)
        for s in savers:
            s.save_pretrained(str(staging))
        digest = weights_sha256(staging)
        write_json_atomic(staging / RESOLVED_CONFIG, {"weights_sha256": digest, **resolved_config})
    return digest
