"""The round-0 student, made the way real speech LLMs are (in miniature).

Three phases on the speech train split (README, "How the round-0 student is made"):

1. **Encoder pre-training** — the audio encoder alone, with a character CTC head, learns
   to recognise speech (an ASR encoder, as Whisper is), and with a small utterance-level
   head it learns who speaks how: voice, pitch, speaking rate (`SpeakerHead`; audio
   pre-training corpora carry speaker-attribute tasks too).
2. **Alignment** — encoder + projector learn to emit, among the audio embeddings, the frozen
   language model's own embedding of each spoken token (CTC against the embedding table):
   the audio lands where the LM reads text; the LM is not touched. The speaker head keeps
   training, so alignment does not wash the speaker information out of the encoder.
   2b. **Reading** (opt-in, `student.read`) — the encoder frozen, projector and LM learn
   to transcribe every heard utterance, which teaches the LM to follow the audio in order.
3. **Speech instruction tuning** — the encoder is frozen (its outputs are cached once), the
   projector and the LM learn from a speech instruction mix: spoken reasoning questions with
   worked solutions (optionally some answered directly), paralinguistic questions, some
   transcription, and text-only worked solutions replayed from the teacher's corpus.

Nothing here cripples the model: the gap that remains is the one real speech LLMs have —
the LM has reasoned over text tokens hundreds of times more than over audio embeddings.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast, Qwen2AudioForConditionalGeneration

from xopd_core.config import BatchedPhase, InstructPhase, MeanOver, Phase, ReadPhase
from xopd_core.data.manifest import ManifestRow
from xopd_core.data.speech import word_phonemes
from xopd_core.data.world import HeardUtterance
from xopd_core.models.audio import AudioFeatures, encoder_states, merge_audio
from xopd_core.models.prompts import TRANSCRIBE, speech_prompt_ids
from xopd_core.models.tokenizer import IM_END, token_id
from xopd_core.train.sft import LossTerms, SftExample, collate, response_nll_terms, train_steps


@dataclass(frozen=True)
class SpeechExample(SftExample):
    """A prompt (audio placeholders already expanded), its response, and which utterance's
    audio fills the placeholders (None for a text-only example)."""

    audio: int | None

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def _run(
    params: Sequence[torch.nn.Parameter],
    lengths: Sequence[int],
    loss_of: Callable[[list[int]], LossTerms],
    phase: Phase,
    seed: int,
    on_step: Callable[[int, float], None] | None,
    bucketed: bool = False,
) -> list[float]:
    # Phases 1 and 2 are batch means: no micro-batches, one process.
    micro, ranks = (
        (phase.micro_batch_size, phase.processes) if isinstance(phase, BatchedPhase) else (None, 1)
    )
    return train_steps(
        params,
        lengths,
        loss_of,
        steps=phase.steps,
        batch_size=phase.batch_size,
        lr=phase.lr,
        warmup=phase.warmup_steps,
        seed=seed,
        weight_decay=phase.weight_decay,
        # Length buckets only for single-task (transcription) phases: see sft.py.
        pool_batches=50 if bucketed else 1,
        precision=phase.precision,
        micro_batch_size=micro,
        processes=ranks,
        on_step=on_step,
    )


@dataclass(frozen=True)
class SpeakerTargets:
    """Utterance-level speaker attributes of the training utterances (manifest metadata):
    the voice variant (`en-us+f2` → `f2`, `whisper` included), pitch and speaking rate,
    both standardised over the set."""

    variants: tuple[str, ...]
    variant_N: torch.Tensor
    pitch_N: torch.Tensor
    rate_N: torch.Tensor

    @classmethod
    def from_rows(cls, rows: Sequence[HeardUtterance]) -> SpeakerTargets:
        names = [r.voice.split("+")[-1] for r in rows]
        variants = tuple(sorted(set(names)))

        def standardised(key: str) -> torch.Tensor:
            x = torch.tensor([float(getattr(r, key)) for r in rows])
            return (x - x.mean()) / x.std().clamp_min(1e-6)

        return cls(
            variants,
            torch.tensor([variants.index(n) for n in names]),
            standardised("pitch"),
            standardised("rate_wpm"),
        )


class SpeakerHead(torch.nn.Module):
    """A linear readout of an utterance's mean encoder state: voice-variant logits and
    pitch and rate estimates. Its loss is class-balanced cross-entropy on the variant (the
    whisper voice is a few percent of the utterances) plus the squared errors."""

    def __init__(self, d_model: int, targets: SpeakerTargets, seed: int) -> None:
        super().__init__()
        self.targets = targets
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.linear = torch.nn.Linear(d_model, len(targets.variants) + 2)
        counts = torch.bincount(targets.variant_N, minlength=len(targets.variants)).float()
        self.class_weight = counts.sum() / (len(counts) * counts.clamp_min(1))

    def loss(
        self, states_B_T_D: torch.Tensor, lengths_B: torch.Tensor, idx: list[int]
    ) -> torch.Tensor:
        """The head's loss on a batch of encoder states `[B, T, D]` (`lengths_B` valid
        positions each) of training utterances `idx`."""
        valid_B_T = torch.arange(states_B_T_D.shape[1])[None, :] < lengths_B[:, None]
        pooled_B_D = (states_B_T_D * valid_B_T[..., None]).sum(1) / lengths_B[:, None]
        out_B_C = self.linear(pooled_B_D).float()
        rows = torch.tensor(idx)
        t = self.targets
        k = len(t.variants)
        variant = torch.nn.functional.cross_entropy(
            out_B_C[:, :k], t.variant_N[rows], weight=self.class_weight
        )
        pitch = torch.nn.functional.mse_loss(out_B_C[:, k], t.pitch_N[rows])
        rate = torch.nn.functional.mse_loss(out_B_C[:, k + 1], t.rate_N[rows])
        return variant + pitch + rate


def _with_speaker(
    loss: torch.Tensor,
    speaker: SpeakerHead | None,
    weight: float,
    states: torch.Tensor,
    lengths: torch.Tensor,
    idx: list[int],
) -> torch.Tensor:
    if speaker is None or weight == 0:
        return loss
    return loss + weight * speaker.loss(states, lengths, idx)


@contextmanager
def _training(model: torch.nn.Module, parts: Sequence[torch.nn.Module]) -> Iterator[list[Any]]:
    """Train mode with only `parts` requiring grad (never the fixed sinusoidal positions);
    yields their parameters, and restores the model's flags and eval mode afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    for part in parts:
        part.requires_grad_(True)
    tower: Any = model.model.audio_tower  # type: ignore[union-attr]
    tower.embed_positions.requires_grad_(False)
    model.train()
    try:
        yield [p for p in model.parameters() if p.requires_grad]
    finally:
        model.eval()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


WORD_BOUNDARY = "|"


def phoneme_targets(
    transcripts: Sequence[str], languages: Sequence[str]
) -> tuple[list[str], list[list[int]]]:
    """CTC targets for phase 1: each transcript's espeak-ng phonemes, word by word in its
    speaker's language, with a word-boundary symbol between words; returns the inventory
    and the ids. On the default world (200 held-out train utterances, 600 steps of 8) they
    reached a 6.8 % phoneme error rate where characters reached 14.2 %: phonemes are what
    the synthesiser speaks from, spelling has to be learned on top."""
    seqs = []
    for text, language in zip(transcripts, languages, strict=True):
        seq: list[str] = []
        for word in text.split():
            word = word.strip(".,?!:;")
            if word:
                seq += [*word_phonemes(word, language), WORD_BOUNDARY]
        seqs.append(seq[:-1])
    inventory = sorted({ph for seq in seqs for ph in seq})
    index = {ph: i for i, ph in enumerate(inventory)}
    return inventory, [[index[ph] for ph in seq] for seq in seqs]


def character_targets(transcripts: Sequence[str]) -> tuple[str, list[list[int]]]:
    """CTC targets for phase 1: the transcripts' characters as ids 0..len(alphabet)-1."""
    alphabet = "".join(sorted({c for t in transcripts for c in t}))
    index = {c: i for i, c in enumerate(alphabet)}
    return alphabet, [[index[c] for c in t] for t in transcripts]


def pretrain_encoder_ctc(
    model: Qwen2AudioForConditionalGeneration,
    feats: Sequence[AudioFeatures],
    targets: Sequence[list[int]],
    num_classes: int,
    phase: Phase,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    speaker: SpeakerHead | None = None,
    speaker_weight: float = 1.0,
) -> list[float]:
    """Phase 1: the encoder, with a throw-away linear CTC head (`num_classes` + a blank),
    learns to recognise each utterance's `targets` (plus `speaker_weight` × the speaker
    head's loss when one is given).

    Characters, not the LM's word tokens: on the default world 400 steps of character CTC
    reached a 17 % character error rate on held-out speech, while word-token CTC was still
    at a 96 % token error rate after 400 steps (it has to learn a word from ~0.3 s of audio
    with no local cue; characters are local)."""
    tower: Any = model.model.audio_tower
    torch.manual_seed(seed)
    head = torch.nn.Linear(tower.config.d_model, num_classes + 1)

    def loss_of(idx: list[int]) -> LossTerms:
        states, lengths = encoder_states(model, [feats[i] for i in idx])
        logp_T_B_C = torch.log_softmax(head(states).float(), dim=-1).transpose(0, 1)
        flat = torch.tensor([t for i in idx for t in targets[i]])
        target_lengths = torch.tensor([len(targets[i]) for i in idx])
        # Very fast speech can have more characters than encoder frames: such an utterance
        # has no CTC path and contributes nothing (zero_infinity) instead of NaN.
        ctc = torch.nn.functional.ctc_loss(
            logp_T_B_C, flat, lengths, target_lengths, blank=num_classes, zero_infinity=True
        )
        # A batch mean (the speaker head's class weights normalise per batch): no parts.
        return LossTerms(_with_speaker(ctc, speaker, speaker_weight, states, lengths, idx), 1.0)

    extra = [*head.parameters(), *(speaker.parameters() if speaker is not None else [])]
    with _training(model, [tower]) as params:
        lengths = [f.frames for f in feats]
        return _run([*params, *extra], lengths, loss_of, phase, seed, on_step, True)


def align_to_embeddings(
    model: Qwen2AudioForConditionalGeneration,
    feats: Sequence[AudioFeatures],
    targets: Sequence[list[int]],
    phase: Phase,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    speaker: SpeakerHead | None = None,
    speaker_weight: float = 1.0,
) -> list[float]:
    """Phase 2: encoder + projector learn to put, among the audio embeddings, the frozen LM's
    own input embedding of each spoken token, in order.

    A CTC loss whose class scores are dot products between each projected audio frame and
    the LM's (frozen) token-embedding matrix, plus one learned blank vector: a frame scores
    high for a token when it lies close to that token's embedding. The LM itself is never
    run, so its text ability is untouched and the phase costs what the encoder costs. The
    speaker head (if given) keeps training on the encoder states."""
    tower: Any = model.model.audio_tower
    projector: Any = model.model.multi_modal_projector
    table: Any = model.get_input_embeddings().weight
    torch.manual_seed(seed)
    blank = torch.nn.Parameter(torch.zeros(1, table.shape[1]))
    log_scale = torch.nn.Parameter(torch.zeros(()))
    vocab = int(table.shape[0])

    def loss_of(idx: list[int]) -> LossTerms:
        states, lengths = encoder_states(model, [feats[i] for i in idx])
        frames = projector(states)
        classes = torch.cat([table.detach(), blank])
        scores = (frames @ classes.T).float() * log_scale.exp()
        logp_T_B_C = torch.log_softmax(scores, dim=-1).transpose(0, 1)
        flat = torch.tensor([t for i in idx for t in targets[i]])
        target_lengths = torch.tensor([len(targets[i]) for i in idx])
        ctc = torch.nn.functional.ctc_loss(
            logp_T_B_C, flat, lengths, target_lengths, blank=vocab, zero_infinity=True
        )
        # A batch mean (the speaker head's class weights normalise per batch): no parts.
        return LossTerms(_with_speaker(ctc, speaker, speaker_weight, states, lengths, idx), 1.0)

    with _training(model, [tower, projector]) as params:
        lengths = [f.frames for f in feats]
        extra = [blank, log_scale, *(speaker.parameters() if speaker is not None else [])]
        return _run([*params, *extra], lengths, loss_of, phase, seed, on_step, True)


def align_through_lm(
    model: Qwen2AudioForConditionalGeneration,
    feats: Sequence[AudioFeatures],
    examples: Sequence[SpeechExample],
    pad_id: int,
    phase: Phase,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    speaker: SpeakerHead | None = None,
    speaker_weight: float = 1.0,
) -> list[float]:
    """Phase 2, the usual way (LLaVA's and Qwen-Audio's first stage): encoder + projector
    learn to make the frozen LM transcribe each utterance. `examples[k]` is utterance k's
    transcription example (prompt with audio placeholders + "transcribe the audio.", the
    transcript as response). The loss is the LM's next-token NLL of the transcript; the LM
    is run but not trained, so its text ability is untouched, and the audio must land where
    the LM can read it in context, not just near single token embeddings."""
    tower: Any = model.model.audio_tower
    projector: Any = model.model.multi_modal_projector

    def loss_of(idx: list[int]) -> LossTerms:
        states, lengths = encoder_states(model, [feats[i] for i in idx])
        projected = projector(states)
        audio = [projected[k, : int(n)] for k, n in enumerate(lengths)]
        tensors = collate([examples[i] for i in idx], pad_id)
        embeds = merge_audio(model, tensors["input_ids_B_T"], audio)
        logits = model(inputs_embeds=embeds, attention_mask=tensors["attention_mask_B_T"]).logits
        terms = response_nll_terms(logits, tensors["labels_B_T"], "tokens")
        nll = terms.total / max(terms.count, 1.0)
        # A batch mean (the speaker head's class weights normalise per batch): no parts.
        return LossTerms(_with_speaker(nll, speaker, speaker_weight, states, lengths, idx), 1.0)

    with _training(model, [tower, projector]) as params:
        lengths = [f.frames for f in feats]
        extra = [*(speaker.parameters() if speaker is not None else [])]
        return _run([*params, *extra], lengths, loss_of, phase, seed, on_step, True)


def transcription_examples(
    tokenizer: PreTrainedTokenizerFast, transcripts: Sequence[str], audio_tokens: Sequence[int]
) -> list[SpeechExample]:
    """Utterance k's transcription example: its audio and "transcribe the audio." → the
    transcript, then the end-of-turn token."""
    eos = token_id(tokenizer, IM_END)
    return [
        SpeechExample(
            speech_prompt_ids(tokenizer, n, TRANSCRIBE),
            [*tokenizer(t)["input_ids"], eos],
            k,
        )
        for k, (t, n) in enumerate(zip(transcripts, audio_tokens, strict=True))
    ]


@torch.no_grad()
def cache_encoder_states(
    model: Qwen2AudioForConditionalGeneration, feats: Sequence[AudioFeatures], batch_size: int = 64
) -> list[torch.Tensor]:
    """Frozen-encoder outputs `[audio_tokens, d_model]` per utterance, computed once."""
    order = sorted(range(len(feats)), key=lambda i: feats[i].frames)
    by_index: dict[int, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        states, lengths = encoder_states(model, [feats[i] for i in chunk])
        for i, s, n in zip(chunk, states, lengths, strict=True):
            by_index[i] = s[: int(n)].clone()
    return [by_index[i] for i in range(len(feats))]


def _train_lm_on_cached_audio(
    model: Qwen2AudioForConditionalGeneration,
    states: Sequence[torch.Tensor],
    examples: Sequence[SpeechExample],
    pad_id: int,
    phase: InstructPhase | ReadPhase,
    seed: int,
    on_step: Callable[[int, float], None] | None,
    mean_over: MeanOver,
    bucketed: bool,
) -> list[float]:
    projector = model.model.multi_modal_projector

    def loss_of(idx: list[int]) -> LossTerms:
        batch = [examples[i] for i in idx]
        tensors = collate(batch, pad_id)
        audio = [projector(states[e.audio]) for e in batch if e.audio is not None]
        embeds = merge_audio(model, tensors["input_ids_B_T"], audio)
        logits = model(inputs_embeds=embeds, attention_mask=tensors["attention_mask_B_T"]).logits
        return response_nll_terms(logits, tensors["labels_B_T"], mean_over)

    with _training(model, [projector, model.model.language_model, model.lm_head]) as params:
        lengths = [e.length for e in examples]
        return _run(params, lengths, loss_of, phase, seed, on_step, bucketed)


def learn_to_read(
    model: Qwen2AudioForConditionalGeneration,
    states: Sequence[torch.Tensor],
    examples: Sequence[SpeechExample],
    pad_id: int,
    phase: ReadPhase,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Phase 2b: projector + language model learn to transcribe (`examples`: one
    transcription example per utterance, `transcription_examples`, plus any text replay,
    `text_replay`); the encoder is frozen,
    its cached outputs `states` stand in for it. Alignment leaves a frozen LM that hears
    which words were said but not in what order (it repeats one clause of the template);
    transcribing many utterances teaches it to follow the audio position by position
    (docs/hearing.md). The loss averages over tokens, batches are length-bucketed."""
    return _train_lm_on_cached_audio(
        model, states, examples, pad_id, phase, seed, on_step, "tokens", True
    )


def instruct(
    model: Qwen2AudioForConditionalGeneration,
    states: Sequence[torch.Tensor],
    examples: Sequence[SpeechExample],
    pad_id: int,
    phase: InstructPhase,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Phase 3: projector + language model (embeddings and head included) on the
    instruction mix; the encoder is frozen, its cached outputs `states` stand in for it.
    The loss averages over tokens or over examples (`phase.loss_mean_over`)."""
    return _train_lm_on_cached_audio(
        model, states, examples, pad_id, phase, seed, on_step, phase.loss_mean_over, False
    )


def instruction_mix(
    tokenizer: PreTrainedTokenizerFast,
    speech_rows: Sequence[ManifestRow],
    audio_tokens: Sequence[int],
    text_rows: Sequence[ManifestRow],
    text_prompt: Callable[[str], list[int]],
    phase: InstructPhase,
    seed: int,
) -> tuple[list[SpeechExample], dict[str, int]]:
    """The phase-3 examples and a count per kind. `speech_rows[i]` has `audio_tokens[i]`
    placeholders and is utterance i of the feature table."""
    rng = random.Random(seed)
    eos = token_id(tokenizer, IM_END)

    def said(text: str) -> list[int]:
        return [*tokenizer(text)["input_ids"], eos]

    examples: list[SpeechExample] = []
    counts = {"speech_solution": 0, "speech_direct": 0, "paralinguistic": 0, "asr": 0, "text": 0}
    short = set(phase.short_answer_tasks)
    reasoning = [
        i for i, r in enumerate(speech_rows) if r.kind == "reasoning" and r.task not in short
    ]
    n_solutions = round(phase.speech_solution_fraction * len(reasoning))
    with_solution = set(rng.sample(reasoning, n_solutions))
    for i, r in enumerate(speech_rows):
        prompt = speech_prompt_ids(tokenizer, audio_tokens[i])
        if r.kind != "reasoning":
            examples.append(SpeechExample(prompt, said(r.solution), i))
            counts["paralinguistic"] += 1
        elif i in with_solution:
            examples.append(SpeechExample(prompt, said(r.solution), i))
            counts["speech_solution"] += 1
        else:
            examples.append(SpeechExample(prompt, said(f"the answer is {r.answer}."), i))
            counts["speech_direct"] += 1
    for i in rng.sample(range(len(speech_rows)), min(phase.asr_items, len(speech_rows))):
        prompt = speech_prompt_ids(tokenizer, audio_tokens[i], TRANSCRIBE)
        examples.append(SpeechExample(prompt, said(speech_rows[i].transcript), i))
        counts["asr"] += 1
    text = text_replay(
        tokenizer,
        text_rows,
        text_prompt,
        phase.text_replay_items,
        rng,
        task_weights=phase.text_replay_task_weights,
    )
    counts["text"] = len(text)
    return [*examples, *text], counts


def text_replay(
    tokenizer: PreTrainedTokenizerFast,
    text_rows: Sequence[ManifestRow],
    text_prompt: Callable[[str], list[int]],
    n: int,
    rng: random.Random,
    restatement: bool = True,
    task_weights: Mapping[str, float] | None = None,
) -> list[SpeechExample]:
    """`n` text-only examples (question as text → worked solution) drawn from `text_rows`
    without replacement: replayed beside speech so the LM keeps its text ability. Without
    `restatement`, a solution that begins with its question (synth.restate_question) is
    replayed from just after it. `task_weights`: each task's share of the `n` (see
    `replayed_rows`)."""
    eos = token_id(tokenizer, IM_END)

    def answer(r: ManifestRow) -> str:
        restated = r.transcript + " "
        keep = restatement or not r.solution.startswith(restated)
        return r.solution if keep else r.solution[len(restated) :]

    return [
        SpeechExample(text_prompt(r.transcript), [*tokenizer(answer(r))["input_ids"], eos], None)
        for r in replayed_rows(text_rows, n, rng, task_weights)
    ]


def replayed_rows(
    rows: Sequence[ManifestRow],
    n: int,
    rng: random.Random,
    task_weights: Mapping[str, float] | None = None,
) -> list[ManifestRow]:
    """`n` of `rows` without replacement: as they come (None), or task t's share
    `task_weights[t] / sum(task_weights)` of them, in a seeded shuffle (a task with fewer
    rows than its share gives all it has)."""
    if task_weights is None:
        return rng.sample(list(rows), min(n, len(rows)))
    by_task: dict[str, list[ManifestRow]] = {}
    for r in rows:
        by_task.setdefault(r.task, []).append(r)
    absent = sorted(set(task_weights) - set(by_task))
    if absent:
        raise ValueError(
            f"student.read/instruct.text_replay_task_weights: task(s) {absent} have no item in "
            "text_train"
        )
    total = sum(task_weights.values())
    chosen: list[ManifestRow] = []
    for task in sorted(task_weights):
        pool = by_task[task]
        chosen += rng.sample(pool, min(round(n * task_weights[task] / total), len(pool)))
    rng.shuffle(chosen)
    return chosen
