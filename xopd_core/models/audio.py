"""Audio input for the student: log-mel features, a cropped encoder pass, prompt merging.

Qwen2-Audio's encoder only accepts the full feature window (3000 frames for vLLM's 30 s), so
a 4 s utterance costs as much as a 30 s one. Padded frames are masked out of attention and
the positions are fixed sinusoids, so the encoder's outputs at the valid positions depend
only on the valid frames plus the two frames after them (the convolutions' reach).
`encode_audio` therefore runs the same modules on features cropped to the longest
utterance of the batch (plus a margin), and gives the same embeddings as the full-window
forward of `Qwen2AudioForConditionalGeneration` (tests/xopd_core/models/test_audio.py proves
it against HF). Training uses the cropped pass; evaluation and serving use the real one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor
from transformers.masking_utils import create_bidirectional_mask

# Frames kept after an utterance's last valid frame: conv1 (k3) then conv2 (k3, stride 2)
# reach two frames past it; four keeps the crop length even.
CROP_MARGIN = 4


@dataclass(frozen=True)
class AudioFeatures:
    """Log-mel features of one utterance as the processor computes them for the full window,
    cropped to `frames` valid frames plus `CROP_MARGIN`."""

    mel_F_M: torch.Tensor
    frames: int

    @property
    def audio_tokens(self) -> int:
        """Embeddings (= <|AUDIO|> placeholders) the encoder yields for this utterance."""
        return pooled_length(self.frames)


def pooled_length(frames: Any) -> Any:
    """Qwen2-Audio's (and Qwen2.5-Omni's) encoder outputs for `frames` feature frames (an
    int or a tensor of them): conv stride 2, then average pooling by 2."""
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def extract_features(
    processor: Qwen2AudioProcessor, waveforms: Sequence[np.ndarray], batch_size: int = 32
) -> list[AudioFeatures]:
    """Log-mel features of 16 kHz mono waveforms, equal on the kept frames to what the
    processor computes for the full window at serve time.

    The extractor normalises each utterance by its own maximum, and zero padding only adds
    frames at the floor, so padding each waveform with a few frames' worth of zeros instead
    of up to 30 s changes no kept value (tested) and is ~10x cheaper. The arithmetic is the
    extractor's (`WhisperFeatureExtractor`, torch path: STFT, power, mel filters, log10,
    floor at the maximum − 8, rescale) on one zero-padded batch tensor, with the power as
    re² + im² rather than |z|²; equal to it within 1e-5 (tested), at ~0.5–0.6x its time (the
    extractor pads lists in numpy and takes a complex absolute value first).
    """
    extractor: Any = processor.feature_extractor
    if extractor.dither != 0.0:
        raise ValueError(f"feature extractor dither is {extractor.dither}; expected 0 (none)")
    hop, n_fft = extractor.hop_length, extractor.n_fft
    window = extractor.n_samples
    # Zeros after the utterance: the margin frames, plus the STFT's half window either side.
    tail = (CROP_MARGIN + 2) * hop + n_fft
    hann = torch.hann_window(n_fft)
    filters_M_F = torch.from_numpy(np.asarray(extractor.mel_filters, dtype=np.float32)).T
    by_index: dict[int, AudioFeatures] = {}
    order = sorted(range(len(waveforms)), key=lambda i: len(waveforms[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        longest = min(window, max(len(waveforms[i]) for i in chunk) + tail)
        batch_B_N = torch.zeros(len(chunk), longest)
        for row, i in enumerate(chunk):
            wave = torch.from_numpy(np.asarray(waveforms[i][:longest], dtype=np.float32))
            batch_B_N[row, : len(wave)] = wave
        spectrum = torch.stft(batch_B_N, n_fft, hop, window=hann, return_complex=True)[..., :-1]
        power_B_F_T = spectrum.real.square() + spectrum.imag.square()
        log_B_M_T = (filters_M_F @ power_B_F_T).clamp_min(1e-10).log10()
        floor_B_1_1 = log_B_M_T.amax(dim=(1, 2), keepdim=True) - 8.0
        mel_B_M_T = (torch.maximum(log_B_M_T, floor_B_1_1) + 4.0) / 4.0
        for i, mel in zip(chunk, mel_B_M_T, strict=True):
            frames = min(window // hop, math.ceil(len(waveforms[i]) / hop))
            keep = min(window // hop, frames + CROP_MARGIN)
            by_index[i] = AudioFeatures(mel[:, :keep].clone(), frames)
    return [by_index[i] for i in range(len(waveforms))]


def encoder_states(
    model: Qwen2AudioForConditionalGeneration, feats: Sequence[AudioFeatures]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The audio encoder's outputs (before the projector), padded `[B, T, d_model]`, and
    each utterance's number of valid outputs `[B]`. Gradients flow when the encoder
    requires grad."""
    tower: Any = model.model.audio_tower
    config = tower.config
    if config.encoder_layerdrop:
        raise ValueError("the cropped encoder pass assumes encoder_layerdrop == 0")
    window = 2 * config.max_source_positions
    width = max(f.mel_F_M.shape[-1] for f in feats)
    width = min(window, width + width % 2)
    mel = torch.zeros(len(feats), config.num_mel_bins, width)
    for i, f in enumerate(feats):
        n = min(width, f.mel_F_M.shape[-1])
        mel[i, :, :n] = f.mel_F_M[:, :n]
    mel = mel.to(device=tower.conv1.weight.device, dtype=tower.conv1.weight.dtype)
    hidden = torch.nn.functional.gelu(tower.conv1(mel))
    hidden = torch.nn.functional.gelu(tower.conv2(hidden)).permute(0, 2, 1)
    positions = hidden.shape[1]
    hidden = hidden + tower.embed_positions.weight[:positions]
    hidden = torch.nn.functional.dropout(hidden, p=config.dropout, training=tower.training)
    lengths = torch.tensor([(f.frames - 1) // 2 + 1 for f in feats], device=hidden.device)
    valid_2d = (torch.arange(positions, device=hidden.device)[None, :] < lengths[:, None]).long()
    mask = create_bidirectional_mask(
        config=config,
        inputs_embeds=hidden.new_zeros(len(feats), positions, 1),
        attention_mask=valid_2d,
    )
    for layer in tower.layers:
        hidden = layer(hidden, mask)
    hidden = tower.avg_pooler(hidden.permute(0, 2, 1)).permute(0, 2, 1)
    return tower.layer_norm(hidden), torch.tensor([f.audio_tokens for f in feats])


def encode_audio(
    model: Qwen2AudioForConditionalGeneration, feats: Sequence[AudioFeatures]
) -> list[torch.Tensor]:
    """Projected audio embeddings `[audio_tokens, hidden]` per utterance: what the model
    places at that utterance's <|AUDIO|> placeholders."""
    states, lengths = encoder_states(model, feats)
    projected = model.model.multi_modal_projector(states)
    return [projected[i, : int(n)] for i, n in enumerate(lengths)]


def merge_audio(
    model: Qwen2AudioForConditionalGeneration,
    input_ids_B_T: torch.Tensor,
    audio: Sequence[torch.Tensor],
    slots_B_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token embeddings with each run of <|AUDIO|> placeholders replaced, in order, by the
    rows of the matching entry of `audio` (what the model's forward does with features).
    `slots_B_T` limits which placeholders are audio (default: all); a sampled response may
    itself contain the <|AUDIO|> token, which is then just a token."""
    embeds = model.get_input_embeddings()(input_ids_B_T)
    slots = input_ids_B_T == model.config.audio_token_id
    if slots_B_T is not None:
        slots = slots & slots_B_T.bool()
    if not audio:
        if slots.any():
            raise ValueError("prompt has <|AUDIO|> placeholders but no audio was given")
        return embeds
    flat = torch.cat(list(audio)).to(embeds.dtype)
    if int(slots.sum()) != flat.shape[0]:
        raise ValueError(
            f"{int(slots.sum())} <|AUDIO|> placeholders but {flat.shape[0]} audio embeddings"
        )
    return embeds.masked_scatter(slots.unsqueeze(-1), flat)
