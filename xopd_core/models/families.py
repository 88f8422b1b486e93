"""Speech-student families: what differs between Qwen2-Audio, Qwen2.5-Omni's thinker and
Qwen3-Omni's thinker, behind one small record, so that engines, trainer and eval never name a
model class.

A family says where the audio placeholders go (its marker token, filled by the model's own
chat template) and how many (the encoder's output length), which modules are the audio
encoder and projector (frozen or trained apart from the language model), how to encode
log-mel features into the embeddings placed at the placeholders, and which system turn its
prompts begin with. All three expose the language model as `model.model` (Qwen2-Audio:
`model.model.language_model`) and the head as `model.lm_head`, and all three take plain
1-D positions: the Omni thinkers' multimodal RoPE gives audio positions as one arange
repeated over its three axes, which is 1-D RoPE (tested against the models' own forward).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoFeatureExtractor,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedModel,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2AudioForConditionalGeneration,
    Qwen3OmniMoeThinkerForConditionalGeneration,
)
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe

from xopd_core.atomic import atomic_directory
from xopd_core.errors import CheckpointError
from xopd_core.models.audio import AudioFeatures, encoder_states, pooled_length
from xopd_core.models.checkpoint import INDEX, WEIGHTS, require_safetensors_checkpoint

# The system turn Qwen2.5-Omni's model card prescribes (DESIGN.md 4.2: the model expects
# it); the thinker alone answers in text, and its prompts keep that turn.
QWEN2_5_OMNI_SYSTEM = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)


@dataclass(frozen=True)
class StudentFamily:
    """One speech-LLM class xopd trains. `audio_token`: the placeholder its chat template
    writes once per utterance and the processor repeats `audio_tokens(frames)` times;
    `projector`: the attribute of `model.model` holding a separate projector (None: the
    projection is the encoder's last layers, so it trains or freezes with the encoder).
    The longest utterance is the feature extractor's `chunk_length` (Qwen2-Audio's 30 s
    window; the Omni extractors' own settings)."""

    name: str
    model_class: type[PreTrainedModel]
    audio_token: str
    system_prompt: str | None
    projector: str | None
    _tokens: Callable[[Any, torch.Tensor], torch.Tensor]
    _encode: Callable[[Any, Sequence[AudioFeatures]], list[torch.Tensor]]

    @property
    def architecture(self) -> str:
        return self.model_class.__name__

    def audio_tower(self, model: Any) -> torch.nn.Module:
        inner = model.model if self.model_class is Qwen2AudioForConditionalGeneration else model
        return inner.audio_tower

    def audio_projector(self, model: Any) -> torch.nn.Module | None:
        return None if self.projector is None else getattr(model.model, self.projector)

    def audio_tokens(self, model: Any, frames: Sequence[int]) -> list[int]:
        """Placeholders each utterance of `frames` valid feature frames expands to."""
        lengths = self._tokens(model, torch.tensor(list(frames), dtype=torch.long))
        return [int(n) for n in lengths]

    def encoder_outputs(self, model: Any, feats: Sequence[AudioFeatures]) -> list[torch.Tensor]:
        """Per utterance, what the encoder gives before any separate projector (the final
        audio embeddings when the family has none)."""
        return self._encode(model, feats)

    def encode(self, model: Any, feats: Sequence[AudioFeatures]) -> list[torch.Tensor]:
        """Per utterance `[audio_tokens, hidden]`: the embeddings placed at its placeholders."""
        states = self.encoder_outputs(model, feats)
        projector = self.audio_projector(model)
        return states if projector is None else [projector(s) for s in states]


def _qwen2_audio_tokens(model: Any, frames: torch.Tensor) -> torch.Tensor:
    return pooled_length(frames)


def _qwen2_audio_encode(model: Any, feats: Sequence[AudioFeatures]) -> list[torch.Tensor]:
    # The cropped pass, equal to the 30 s window's at the valid positions (models/audio.py).
    states, lengths = encoder_states(model, feats)
    return [states[i, : int(n)] for i, n in enumerate(lengths)]


def _flat_valid_frames(tower: Any, feats: Sequence[AudioFeatures]) -> tuple[Any, Any]:
    """The Omni encoders' input: every utterance's valid frames side by side `[mel, Σ frames]`
    (what their processors' attention masks select) and the frame counts."""
    weight = next(tower.parameters())
    flat = torch.cat([f.mel_F_M[:, : f.frames] for f in feats], dim=1)
    lengths = torch.tensor([f.frames for f in feats], dtype=torch.long, device=weight.device)
    return flat.to(device=weight.device, dtype=weight.dtype), lengths


def _omni_encode(model: Any, feats: Sequence[AudioFeatures]) -> list[torch.Tensor]:
    tower = model.audio_tower
    flat, lengths = _flat_valid_frames(tower, feats)
    kwargs: dict[str, Any] = {"feature_lens": lengths}
    if model.config.model_type == "qwen2_5_omni_thinker":
        kwargs["aftercnn_lens"] = (lengths - 1) // 2 + 1
    out = tower(flat, **kwargs).last_hidden_state
    sizes = FAMILIES_BY_CLASS[type(model).__name__].audio_tokens(model, lengths.tolist())
    return list(torch.split(out, sizes))


def _qwen3_omni_tokens(model: Any, frames: torch.Tensor) -> torch.Tensor:
    n_window = model.config.audio_config.n_window
    return modeling_qwen3_omni_moe._get_feat_extract_output_lengths(frames, n_window)


QWEN2_AUDIO = StudentFamily(
    name="qwen2_audio",
    model_class=Qwen2AudioForConditionalGeneration,
    audio_token="<|AUDIO|>",
    system_prompt=None,
    projector="multi_modal_projector",
    _tokens=_qwen2_audio_tokens,
    _encode=_qwen2_audio_encode,
)
QWEN2_5_OMNI = StudentFamily(
    name="qwen2_5_omni",
    model_class=Qwen2_5OmniThinkerForConditionalGeneration,
    audio_token="<|AUDIO|>",
    system_prompt=QWEN2_5_OMNI_SYSTEM,
    projector=None,
    _tokens=_qwen2_audio_tokens,  # same convolution and pooling strides as Qwen2-Audio
    _encode=_omni_encode,
)
QWEN3_OMNI = StudentFamily(
    name="qwen3_omni",
    model_class=Qwen3OmniMoeThinkerForConditionalGeneration,
    audio_token="<|audio_pad|>",
    system_prompt=None,
    projector=None,
    _tokens=_qwen3_omni_tokens,
    _encode=_omni_encode,
)
FAMILIES = (QWEN2_AUDIO, QWEN2_5_OMNI, QWEN3_OMNI)
FAMILIES_BY_CLASS = {f.architecture: f for f in FAMILIES}


def family_of(model: Any) -> StudentFamily | None:
    """The family of a loaded model; None for a text-only causal LM."""
    return FAMILIES_BY_CLASS.get(type(model).__name__)


def student_family(folder: Path) -> StudentFamily:
    """The family a checkpoint folder's config.json names, refused (naming the file) when
    xopd has no adapter for it. A full Qwen2.5-Omni / Qwen3-Omni checkpoint (thinker and
    talker) is refused too: export its thinker (README: Real models)."""
    path = Path(folder) / "config.json"
    try:
        architectures = json.loads(path.read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a readable model config ({err})") from None
    for name in architectures:
        if name in FAMILIES_BY_CLASS:
            return FAMILIES_BY_CLASS[name]
    supported = ", ".join(FAMILIES_BY_CLASS)
    raise CheckpointError(
        f"{path}: {', '.join(architectures) or 'no architectures'} is not a speech student "
        f"xopd trains (supported: {supported}; for an Omni model, its thinker)"
    )


# What an Omni folder holds besides weights and config: carried over verbatim into every
# checkpoint trained from it, so a round's output keeps the processor files it came with.
_PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class SpeechProcessor:
    """The two processor parts an audio student uses, its tokenizer and its feature
    extractor, read from the folder on their own: the Omni processors also build image and
    video processors, which need torchvision and which xopd never calls."""

    tokenizer: Any
    feature_extractor: Any
    source: Path

    def save_pretrained(self, folder: str) -> None:
        for name in _PROCESSOR_FILES:
            if (self.source / name).is_file():
                shutil.copyfile(self.source / name, Path(folder) / name)


def load_student(folder: Path, *, dtype: torch.dtype | None = None) -> tuple[Any, Any]:
    """A student checkpoint and its processor, checked first: safetensors only (never
    pickle), whole, of a supported family. `dtype` None: as saved."""
    folder = Path(folder)
    require_safetensors_checkpoint(folder)
    family = student_family(folder)
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    model = family.model_class.from_pretrained(str(folder), **kwargs).eval()
    if family is QWEN2_AUDIO:
        return model, AutoProcessor.from_pretrained(str(folder))
    processor = SpeechProcessor(
        AutoTokenizer.from_pretrained(str(folder)),
        AutoFeatureExtractor.from_pretrained(str(folder)),
        folder,
    )
    return model, processor


# Whole Omni checkpoints (thinker + talker + vocoder) and the thinker class inside each.
_OMNI_WHOLE = {
    "Qwen2_5OmniModel": QWEN2_5_OMNI,
    "Qwen2_5OmniForConditionalGeneration": QWEN2_5_OMNI,
    "Qwen3OmniMoeForConditionalGeneration": QWEN3_OMNI,
}
_THINKER_PREFIX = "thinker."


def export_thinker(source: Path, out: Path) -> list[Path]:
    """Write the thinker of a whole Qwen2.5-Omni / Qwen3-Omni checkpoint as a student folder
    of its own: config.json from the `thinker_config`, the `thinker.`-prefixed tensors with
    the prefix dropped (shard by shard, a tensor at a time: a 30B model never sits in
    memory), the processor and tokenizer files as they are. The talker and vocoder (speech
    output) are left behind: X-OPD trains the text answer. `out` appears whole or not at
    all. Returns the weight files written."""
    source = Path(source)
    files = require_safetensors_checkpoint(source)
    path = source / "config.json"
    try:
        config = json.loads(path.read_text())
        architectures = config.get("architectures") or []
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: not a readable model config ({err})") from None
    family = next((_OMNI_WHOLE[a] for a in architectures if a in _OMNI_WHOLE), None)
    if family is None or not isinstance(config.get("thinker_config"), dict):
        raise CheckpointError(
            f"{path}: {', '.join(architectures) or 'no architectures'} is not a whole Omni "
            f"checkpoint with a thinker_config (export reads {', '.join(_OMNI_WHOLE)})"
        )
    thinker = {**config["thinker_config"], "architectures": [family.architecture]}
    thinker.setdefault("model_type", getattr(family.model_class.config_class, "model_type", ""))
    written: list[Path] = []
    with atomic_directory(Path(out)) as staging:
        weight_map: dict[str, str] = {}
        for file in files:
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    if name.startswith(_THINKER_PREFIX):
                        tensors[name.removeprefix(_THINKER_PREFIX)] = f.get_tensor(name)
            if tensors:
                save_file(tensors, str(staging / file.name), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, file.name))
                written.append(Path(out) / file.name)
        if not weight_map:
            raise CheckpointError(f"{source}: no tensor named {_THINKER_PREFIX}* to export")
        if len(written) == 1 and written[0].name != WEIGHTS:
            (staging / written[0].name).rename(staging / WEIGHTS)
            written = [Path(out) / WEIGHTS]
        elif len(written) > 1:
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (staging / INDEX).write_text(json.dumps(index, indent=2))
        (staging / "config.json").write_text(json.dumps(thinker, indent=2))
        SpeechProcessor(None, None, source).save_pretrained(str(staging))
    return written
