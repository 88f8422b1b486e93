"""HF transformers engines: the student samples rollouts and gives teacher-forced log-probs
(with gradients, for the trainer); the teacher scores rollouts after the transcript.

The student's audio goes through the cropped encoder pass (`models.audio`, proved equal to
the 30 s window), and rollouts are sampled from input embeddings by `engines.sampler`'s
loop, so HF needs no full-window features. Sampling policy = softmax(logits / temperature)
over the vocabulary shared with the teacher, no top-k/top-p.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from xopd_core.data.waveform import read_waveform
from xopd_core.engines.base import Modality, Prompt, Rollout, ScoreMode, TeacherScores
from xopd_core.engines.sampler import sample_from_embeds
from xopd_core.engines.scoring import padded, prompt_groups, response_logits, response_tokens
from xopd_core.losses import log_normalizer, token_logprobs
from xopd_core.models.attention import use_gqa_sdpa
from xopd_core.models.audio import extract_features, merge_audio
from xopd_core.models.families import family_of
from xopd_core.models.prompts import speech_prompt_ids, text_prompt_ids
from xopd_core.models.tokenizer import IM_END, PAD, token_id


@contextlib.contextmanager
def _without_checkpointing(model: Any) -> Iterator[None]:
    """Eval mode while sampling when the model checkpoints its layers: a checkpointed layer
    in training mode drops the key/value cache decoding reads (the Qwen families set dropout
    0, so the samples are the same)."""
    if not (getattr(model, "is_gradient_checkpointing", False) and model.training):
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train()


class HfStudent:
    """A speech student of any `models.families` family (Qwen2-Audio, the Qwen2.5-Omni and
    Qwen3-Omni thinkers) and its processor as a `RolloutEngine`, plus
    `response_logits`/`response_logprobs` for training on rollouts.

    Audio is read once per prompt; while the encoder is frozen its outputs are cached (call
    `clear_audio_cache` after loading other encoder weights). The model's attention is
    switched to `models.attention`'s grouped-query SDPA (same results, no K/V copies).
    `vocab_size`: the vocabulary shared with the teacher (`scoring.shared_vocab_size`,
    default every id of the student's tokenizer); rollouts hold only ids below it, and
    log-probs, sampled and teacher-forced, are over those logits alone."""

    def __init__(
        self, model: Any, processor: Any, *, batch_size: int = 16, vocab_size: int | None = None
    ) -> None:
        self.model = use_gqa_sdpa(model)
        self.processor = processor
        # A text-only causal LM (with its tokenizer as `processor`) works for text prompts.
        self.family = family_of(model)
        self.hears = self.family is not None
        self.tokenizer: PreTrainedTokenizerFast = getattr(processor, "tokenizer", processor)
        self.batch_size = batch_size
        self.vocab_size = vocab_size if vocab_size is not None else len(self.tokenizer.get_vocab())
        self.pad_id = token_id(self.tokenizer, PAD)
        self.eos_id = token_id(self.tokenizer, IM_END)
        self._features: dict[str, Any] = {}
        self._states: dict[str, torch.Tensor] = {}
        self._audio_tokens: dict[str, int] = {}

    def with_model(self, model: Any) -> HfStudent:
        """This student over another copy of its model (`train.parallel: fsdp`'s sharded
        one), sharing the processor and the audio read and encoded so far."""
        view = copy.copy(self)
        view.model = model
        return view

    # -- audio -------------------------------------------------------------------------
    def load_audio(self, prompts: Sequence[Prompt]) -> None:
        """Read and featurise the prompts' audio not seen yet."""
        new = [p for p in prompts if p.id not in self._features]
        if not new:
            return
        if not self.hears:
            raise ValueError("this student is a text-only model: it has no audio encoder")
        extractor = self.processor.feature_extractor
        rate, window = extractor.sampling_rate, extractor.chunk_length
        waves = [read_waveform(p.audio_path, rate, window) for p in new]
        feats = extract_features(self.processor, waves)
        assert self.family is not None
        counts = self.family.audio_tokens(self.model, [f.frames for f in feats])
        for p, f, n in zip(new, feats, counts, strict=True):
            self._features[p.id] = f
            self._audio_tokens[p.id] = n

    @property
    def device(self) -> torch.device:
        """Where the model's weights are: inputs are built on the CPU and moved there."""
        return self.model.get_input_embeddings().weight.device

    def _left_padded(self, seqs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = padded(seqs, self.pad_id, left=True)
        return ids.to(self.device), mask.to(self.device)

    def clear_audio_cache(self) -> None:
        self._states.clear()

    def _encoder_frozen(self) -> bool:
        return self.family is None or not any(
            p.requires_grad for p in self.family.audio_tower(self.model).parameters()
        )

    def audio_embeddings(self, prompt_ids: Sequence[str]) -> list[torch.Tensor]:
        """Projected audio embeddings `[A, D]` per prompt (gradients reach whatever parts
        require grad)."""
        missing = [i for i in prompt_ids if i not in self._features]
        if missing:
            raise KeyError(f"audio not loaded for prompts {missing[:3]}; call load_audio")
        frozen = self._encoder_frozen()
        todo = [i for i in dict.fromkeys(prompt_ids) if not (frozen and i in self._states)]
        assert self.family is not None
        states: dict[str, torch.Tensor] = {}
        if todo:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                outputs = self.family.encoder_outputs(self.model, [self._features[i] for i in todo])
            for i, s in zip(todo, outputs, strict=True):
                states[i] = s
                if frozen:
                    self._states[i] = s.detach()
        projector = self.family.audio_projector(self.model) or torch.nn.Identity()
        return [projector(states.get(i, self._states.get(i))) for i in prompt_ids]

    def audio_tokens(self, prompt_id: str) -> int:
        return self._audio_tokens[prompt_id]

    # -- prompts -----------------------------------------------------------------------
    def prompt_ids(self, prompt: Prompt, modality: Modality) -> list[int]:
        if modality == "speech":
            self.load_audio([prompt])
            return self.speech_prompt_ids(self.audio_tokens(prompt.id))
        return text_prompt_ids(self.tokenizer, prompt.transcript, system=self.system_prompt)

    @property
    def system_prompt(self) -> str | None:
        return self.family.system_prompt if self.family is not None else None

    def speech_prompt_ids(self, audio_tokens: int, instruction: str | None = None) -> list[int]:
        """The family's speech prompt: its system turn, if any, then the audio (and an
        optional instruction) as a user turn, its placeholder repeated `audio_tokens` times."""
        assert self.family is not None
        return speech_prompt_ids(
            self.tokenizer,
            audio_tokens,
            instruction,
            audio_token=self.family.audio_token,
            system=self.family.system_prompt,
        )

    def _embed(
        self, ids_B_L: torch.Tensor, audio_ids: Sequence[str], prompt_B_L: torch.Tensor
    ) -> torch.Tensor:
        """Embeddings with the audio at the prompts' placeholders (`prompt_B_L` marks prompt
        positions: an <|AUDIO|> token the student sampled in a response stays a token)."""
        if not self.hears:
            return self.model.get_input_embeddings()(ids_B_L)
        audio = self.audio_embeddings(audio_ids) if audio_ids else []
        return merge_audio(self.model, ids_B_L, audio, prompt_B_L)

    # -- RolloutEngine -----------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[Prompt],
        modality: Modality,
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[Rollout]:
        if temperature <= 0:
            raise ValueError("sampling needs temperature > 0")
        with _without_checkpointing(self.model):
            if modality == "speech":
                self.load_audio(prompts)
            rollouts: list[Rollout] = []
            for chunk_no, start in enumerate(range(0, len(prompts), self.batch_size)):
                chunk = prompts[start : start + self.batch_size]
                seqs = [self.prompt_ids(p, modality) for p in chunk]
                ids, mask = self._left_padded(seqs)  # every prompt ends where decoding starts
                embeds = self._embed(
                    ids, [p.id for p in chunk] if modality == "speech" else [], mask
                )
                # Own RNG stream per (seed, chunk): reproducible, and the caller's RNG untouched.
                generator = torch.Generator(device=embeds.device)
                generator.manual_seed(seed * 1_000_003 + chunk_no)
                out = sample_from_embeds(
                    self.model,
                    embeds,
                    mask,
                    n=n,
                    temperature=temperature,
                    max_new_tokens=max_new_tokens,
                    eos_id=self.eos_id,
                    pad_id=self.pad_id,
                    generator=generator,
                    vocab_size=self.vocab_size,
                )
                tokens_BG_T, logprobs_BG_T = out.tokens_BG_T.tolist(), out.logprobs_BG_T.tolist()
                lengths, finished = out.lengths_BG.tolist(), out.finished_BG.tolist()
                for row, end in enumerate(lengths):
                    rollouts.append(
                        Rollout(
                            prompt_id=chunk[row // n].id,
                            modality=modality,
                            sample_index=row % n,
                            prompt_ids=seqs[row // n],
                            response_ids=tokens_BG_T[row][:end],
                            logprobs=logprobs_BG_T[row][:end],
                            finished=bool(finished[row]),
                        )
                    )
            return rollouts

    # -- teacher-forced ----------------------------------------------------------------
    def response_logits(self, rollouts: Sequence[Rollout]) -> torch.Tensor:
        """`[B, T, V_shared]` logits predicting each rollout's response tokens (zeros past its
        end); each distinct prompt is read once for all its rollouts
        (`scoring.response_logits`). Gradients flow when enabled."""
        first, prompt_of = prompt_groups(
            [(r.modality, r.prompt_id, tuple(r.prompt_ids)) for r in rollouts]
        )
        heads = [rollouts[i] for i in first]
        ids, mask = self._left_padded([r.prompt_ids for r in heads])
        speech = [r.prompt_id for r in heads if r.modality == "speech"]
        return response_logits(
            self.model,
            mask,
            prompt_of,
            [r.response_ids for r in rollouts],
            pad_id=self.pad_id,
            prompt_embeds_U_L_D=self._embed(ids, speech, mask),
        )[..., : self.vocab_size]

    def response_logprobs(
        self, rollouts: Sequence[Rollout], temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log π_θ of each response token under softmax(logits / temperature), `[B, T]`
        float32, and the response mask `[B, T]`."""
        tokens, mask = response_tokens(rollouts)
        logits = self.response_logits(rollouts)
        tokens, mask = tokens.to(logits.device), mask.to(logits.device)
        return token_logprobs(logits, tokens, temperature), mask


class HfTeacher:
    """A causal LM as a `TeacherScorer`: full logits are available, so all three modes.
    Its attention is switched to grouped-query SDPA, as the student's."""

    def __init__(
        self, model: Any, tokenizer: PreTrainedTokenizerFast, vocab_size: int, batch_size: int = 16
    ) -> None:
        self.model = use_gqa_sdpa(model)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.pad_id = token_id(tokenizer, PAD)

    @torch.no_grad()
    def response_logits(
        self, rollouts: Sequence[Rollout], transcripts: Sequence[str]
    ) -> torch.Tensor:
        """`[B, T, V_shared]` logits predicting each response token after the transcript
        prompt (zeros past a response's end)."""
        first, prompt_of = prompt_groups(transcripts)
        ids, mask = padded(
            [text_prompt_ids(self.tokenizer, transcripts[i]) for i in first], self.pad_id, left=True
        )
        return response_logits(
            self.model,
            mask,
            prompt_of,
            [r.response_ids for r in rollouts],
            pad_id=self.pad_id,
            prompt_ids_U_L=ids,
        )[..., : self.vocab_size]

    @torch.no_grad()
    def response_logprobs_full(
        self, rollouts: Sequence[Rollout], transcripts: Sequence[str]
    ) -> torch.Tensor:
        """`[B, T, V_shared]` float32 log-probs (the "full" mode)."""
        return torch.log_softmax(self.response_logits(rollouts, transcripts).float(), dim=-1)

    def score(
        self,
        rollouts: Sequence[Rollout],
        transcripts: Sequence[str],
        *,
        mode: ScoreMode,
        top_k: int = 0,
    ) -> list[TeacherScores]:
        if len(rollouts) != len(transcripts):
            raise ValueError(f"{len(rollouts)} rollouts but {len(transcripts)} transcripts")
        if mode == "topk" and not 0 < top_k <= self.vocab_size:
            raise ValueError(f"top_k must be in 1..{self.vocab_size} for mode 'topk'")
        # Rollouts of one transcript (a prompt's text and speech rollouts) share a chunk,
        # so the teacher reads that transcript once for all of them.
        order = sorted(range(len(rollouts)), key=lambda j: (transcripts[j], j))
        scores: dict[int, TeacherScores] = {}
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            chunk = [rollouts[j] for j in rows]
            with torch.no_grad():
                logits = self.response_logits(chunk, [transcripts[j] for j in rows])
                # log p = logit − log Σ exp(logits): no float32 [B, T, V] copy unless "full".
                norm = log_normalizer(logits)
                full = torch.log_softmax(logits.float(), -1) if mode == "full" else None
            for i, (j, r) in enumerate(zip(rows, chunk, strict=True)):
                n = len(r.response_ids)
                ids = torch.tensor(r.response_ids, dtype=torch.long, device=logits.device)
                at = torch.arange(n, device=logits.device)
                sampled = logits[i, at, ids].float() - norm[i, :n]
                top = logits[i, :n].topk(top_k, dim=-1) if mode == "topk" else None
                scores[j] = TeacherScores(
                    sampled=sampled.tolist(),
                    topk_ids=top.indices.tolist() if top is not None else None,
                    topk_logprobs=(top.values.float() - norm[i, :n, None]).tolist()
                    if top is not None
                    else None,
                    full_T_V=full[i, :n].clone() if full is not None else None,
                )
        return [scores[j] for j in range(len(rollouts))]
