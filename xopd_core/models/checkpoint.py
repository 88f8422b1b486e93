"""Checkpoint folders: HF `save_pretrained` (safetensors only) + tokenizer + resolved config.

A folder is written to a staging sibling and swapped in whole, so a crash never leaves half
a checkpoint where a good one was, and never with non-finite weights. Weights load with
safetensors only (never pickle): `require_safetensors_checkpoint` is called before any load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion
from transformers.modeling_utils import remove_tied_weights_from_state_dict
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from xopd_core.atomic import atomic_directory, write_json_atomic
from xopd_core.errors import CheckpointError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"  # a sharded checkpoint's map of tensors to files
RESOLVED_CONFIG = "xopd.json"
# transformers 5.17 writes Qwen2-Audio's language model as `language_model.model.model.*`;
# it reloads that, but vLLM 0.31 refuses it ("no module or parameter named 'model'").
# The legacy names load in both (checked in tests/xopd_core/models).
_DOUBLED_PREFIX = "language_model.model.model."
_LEGACY_PREFIX = "language_model.model."
_PICKLED = ("pytorch_model.bin", "model.pt", "model.pth", "pytorch_model.bin.index.json")


def require_safetensors_checkpoint(folder: Path) -> list[Path]:
    """The folder's weight files, checked before anything loads them: one `model.safetensors`,
    or the shards its `model.safetensors.index.json` lists (how HF saves a model of more than
    a few GB). Each must be present and whole (its header parses and the file is as long as
    the header says); a folder with only pickled weights is refused, never `torch.load`ed.
    Cheap: reads the headers only."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / INDEX).is_file():
        files = [folder / name for name in _shard_names(folder / INDEX)]
    else:
        pickled = [name for name in _PICKLED if (folder / name).is_file()]
        hint = (
            f" (it holds {', '.join(pickled)}: xopd loads safetensors only, never pickle; "
            "convert it with save_pretrained(safe_serialization=True))"
            if pickled
            else ""
        )
        raise CheckpointError(f"{folder / WEIGHTS}: no safetensors weights{hint}")
    for path in files:
        _require_whole(path)
    return files


def _shard_names(index: Path) -> list[str]:
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{index}: not a readable safetensors index ({err})") from None
    if not names:
        raise CheckpointError(f"{index}: its weight_map lists no shard")
    for name in names:
        if (
            not isinstance(name, str)
            or Path(name).name != name
            or not name.endswith(".safetensors")
        ):
            raise CheckpointError(
                f"{index}: shard {name!r} is not a .safetensors file name inside the folder"
            )
        if not (index.parent / name).is_file():
            raise CheckpointError(f"{index.parent / name}: a shard {INDEX} lists is missing")
    return names


def _require_whole(path: Path) -> None:
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


def causal_lm_config(folder: Path) -> Any:
    """The config of a text teacher's folder, checked: safetensors weights, whole, and a model
    `AutoModelForCausalLM` builds (Qwen2, Qwen2.5, Qwen3, Qwen3-MoE, ...). A folder of another
    class (a speech model, an encoder) is refused naming its config."""
    folder = Path(folder)
    require_safetensors_checkpoint(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise CheckpointError(
            f"{folder / 'config.json'}: transformers cannot read it ({err})"
        ) from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        what = ", ".join(config.architectures or []) or config.model_type
        raise CheckpointError(
            f"{folder / 'config.json'}: {what} is not a text causal LM; a teacher is a model "
            "AutoModelForCausalLM loads (Qwen2, Qwen2.5, Qwen3, Qwen3-MoE, ...)"
        )
    return config


def load_causal_lm(folder: Path, *, dtype: torch.dtype | None = None) -> Any:
    """A text teacher (`causal_lm_config` checks it first), in `dtype` (None: as saved)."""
    config = causal_lm_config(folder)
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(str(folder), config=config, **kwargs).eval()


def non_finite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return sorted(
        name
        for name, t in tensors.items()
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
    )


def require_finite_weights(folder: Path) -> None:
    """Refuse a checkpoint whose weights hold a NaN or an infinity, naming the file."""
    for path in require_safetensors_checkpoint(folder):
        _refuse_non_finite(load_file(str(path)), path)


def _refuse_non_finite(tensors: dict[str, torch.Tensor], where: Path | str) -> None:
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(
            f"{where}: {len(bad)} weight tensor(s) hold NaN or infinity (e.g. {bad[0]}); "
            "refusing non-finite weights"
        )


def _legacy_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        (_LEGACY_PREFIX + k[len(_DOUBLED_PREFIX) :] if k.startswith(_DOUBLED_PREFIX) else k): v
        for k, v in tensors.items()
    }


def normalise_weight_names(folder: Path) -> None:
    path = folder / WEIGHTS
    tensors = load_file(str(path))
    if any(k.startswith(_DOUBLED_PREFIX) for k in tensors):
        save_file(_legacy_names(tensors), str(path), metadata={"format": "pt"})


def weights_blob(model: PreTrainedModel) -> bytes:
    """`model`'s weights as the bytes of the `model.safetensors` that `save_checkpoint`
    would write: tied copies dropped, the renames transformers makes at load reverted, the
    names vLLM reads. Unlike `save_pretrained`, which writes on torch.distributed rank 0
    only, any rank makes them: each rank's vLLM engine gets its own (the same bytes'
    tensors as save_checkpoint's file: tests/xopd_core/models). Refuses non-finite
    weights."""
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = revert_weight_conversion(model, remove_tied_weights_from_state_dict(tensors, model))
    tensors = {k: v.contiguous() for k, v in _legacy_names(tensors).items()}
    _refuse_non_finite(tensors, "the weights to send")
    return save(tensors, metadata={"format": "pt"})


def weights_sha256(folder: Path) -> str:
    """Hash of the tensors (names, dtypes, shapes, bytes), independent of file metadata and of
    how the weights are sharded; reads one tensor at a time."""
    h = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        files = [
            stack.enter_context(safe_open(str(path), framework="pt"))
            for path in require_safetensors_checkpoint(folder)
        ]
        where = {name: f for f in files for name in f.keys()}  # noqa: SIM118 (safe_open)
        for name in sorted(where):
            t = where[name].get_tensor(name).contiguous()
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
