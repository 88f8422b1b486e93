from __future__ import annotations

import copy
from pathlib import Path
from random import Random

import pytest
import soundfile as sf
import torch

from xopd_core.config import InstructPhase, Phase, ReadPhase
from xopd_core.data.manifest import manifest_path, read_rows
from xopd_core.data.world import HeardUtterance
from xopd_core.models.audio import encoder_states, extract_features
from xopd_core.models.prompts import TRANSCRIBE, speech_prompt_ids, text_prompt_ids
from xopd_core.models.tokenizer import AUDIO, IM_END, PAD, token_id
from xopd_core.train.bootstrap import (
    WORD_BOUNDARY,
    SpeakerHead,
    SpeakerTargets,
    SpeechExample,
    align_through_lm,
    align_to_embeddings,
    cache_encoder_states,
    character_targets,
    instruct,
    instruction_mix,
    learn_to_read,
    phoneme_targets,
    pretrain_encoder_ctc,
    replayed_rows,
    text_replay,
    transcription_examples,
)

FAST = Phase(steps=12, batch_size=4, lr=3e-3, warmup_steps=2)


def _train_rows(tiny_world: Path) -> tuple[list[dict], list]:
    rows = read_rows(manifest_path(tiny_world, "train"))
    waves = [sf.read(str(tiny_world / r.audio_path), dtype="float32")[0] for r in rows]
    return rows, waves


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_speech_prompt_matches_the_processor_expansion(parts, tiny_world: Path) -> None:
    tok, _, _, processor = parts
    _, waves = _train_rows(tiny_world)
    feats = extract_features(processor, waves[:2])
    for instruction in (None, TRANSCRIBE):
        content: list[dict] = [{"type": "audio"}]
        if instruction:
            content.append({"type": "text", "text": instruction})
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        for wave, f in zip(waves[:2], feats, strict=True):
            expected = processor(text=text, audio=[wave], sampling_rate=16000)["input_ids"][0]
            ids = speech_prompt_ids(tok, f.audio_tokens, instruction)
            assert ids == list(expected)
            assert ids.count(token_id(tok, AUDIO)) == f.audio_tokens


def test_instruction_mix_follows_the_params(parts, tiny_world: Path) -> None:
    tok, _, _, processor = parts
    rows, waves = _train_rows(tiny_world)
    text_rows = read_rows(manifest_path(tiny_world, "text_train"))
    n_tokens = [f.audio_tokens for f in extract_features(processor, waves)]
    phase = InstructPhase(
        steps=1, lr=1e-3, speech_solution_fraction=0.5, asr_items=5, text_replay_items=7
    )

    def mix(seed: int):
        return instruction_mix(
            tok, rows, n_tokens, text_rows, lambda t: text_prompt_ids(tok, t), phase, seed
        )

    examples, counts = mix(0)
    reasoning = sum(r.kind == "reasoning" for r in rows)
    assert counts == {
        "speech_solution": round(0.5 * reasoning),
        "speech_direct": reasoning - round(0.5 * reasoning),
        "paralinguistic": len(rows) - reasoning,
        "asr": 5,
        "text": 7,
    }
    assert len(examples) == sum(counts.values())
    audio_id = token_id(tok, AUDIO)
    for e in examples:
        has_audio = audio_id in e.prompt_ids
        assert has_audio == (e.audio is not None)
        if e.audio is not None:
            assert e.prompt_ids.count(audio_id) == n_tokens[e.audio]
    direct = [tok.decode(e.response_ids[:-1]) for e in examples[:reasoning]]
    answers = [f"the answer is {r.answer}." for r in rows if r.kind == "reasoning"]
    assert sum(d == a for d, a in zip(direct, answers, strict=True)) == counts["speech_direct"]
    again, _ = mix(0)
    assert again == examples
    other, _ = mix(1)
    assert other != examples


def test_short_answer_tasks_answer_every_spoken_item_of_those_tasks_directly(
    parts, tiny_world: Path
) -> None:
    tok, _, _, processor = parts
    rows, waves = _train_rows(tiny_world)
    n_tokens = [f.audio_tokens for f in extract_features(processor, waves)]
    phase = InstructPhase(
        steps=1, lr=1e-3, short_answer_tasks=["navigate"], asr_items=0, text_replay_items=0
    )
    examples, counts = instruction_mix(
        tok, rows, n_tokens, [], lambda t: text_prompt_ids(tok, t), phase, 0
    )
    navigate = [r for r in rows if r.kind == "reasoning" and r.task == "navigate"]
    assert navigate and counts["speech_direct"] == len(navigate)
    for r, e in zip(rows, examples, strict=True):
        said = tok.decode(e.response_ids[:-1])
        if r.kind == "reasoning":
            assert (said == f"the answer is {r.answer}.") == (r.task == "navigate"), r.id


def test_text_replay_draws_distinct_text_rows_with_their_solutions(parts, tiny_world: Path) -> None:
    tok = parts[0]
    text_rows = read_rows(manifest_path(tiny_world, "text_train"))

    def replay(n: int, seed: int) -> list[SpeechExample]:
        return text_replay(tok, text_rows, lambda t: text_prompt_ids(tok, t), n, Random(seed))

    picked = replay(5, 0)
    assert len(picked) == 5 and all(e.audio is None for e in picked)
    by_prompt = {tuple(text_prompt_ids(tok, r.transcript)): r for r in text_rows}
    eos = token_id(tok, IM_END)
    for e in picked:
        row = by_prompt[tuple(e.prompt_ids)]
        assert e.response_ids == [*tok(row.solution)["input_ids"], eos]
    assert len({tuple(e.prompt_ids) for e in picked}) == 5
    assert replay(5, 0) == picked and replay(5, 1) != picked
    assert len(replay(10 * len(text_rows), 0)) == len(text_rows)  # capped, no repeats
    assert replay(0, 0) == []


def test_replay_task_weights_set_each_tasks_share_of_the_replay(tiny_world: Path) -> None:
    """student.*.text_replay_task_weights: boolean expressions 3 to 1 for navigate and web
    of lies (object counting left out) in 20 replayed rows of the tiny corpus (25 a task)."""
    rows = read_rows(manifest_path(tiny_world, "text_train"))
    weights = {"boolean_expressions": 3.0, "navigate": 1.0, "web_of_lies": 1.0}
    picked = replayed_rows(rows, 20, Random(0), weights)
    tasks = [r.task for r in picked]
    assert {t: tasks.count(t) for t in set(tasks)} == {
        "boolean_expressions": 12,
        "navigate": 4,
        "web_of_lies": 4,
    }
    assert len({r.id for r in picked}) == 20  # without replacement
    assert tasks != sorted(tasks)  # shuffled, not grouped by task
    assert replayed_rows(rows, 20, Random(0), weights) == picked
    # A share beyond a task's items gives all of them; no weights: as the rows come.
    assert len(replayed_rows(rows, 200, Random(0), {"navigate": 1.0})) == 25
    assert replayed_rows(rows, 7, Random(3)) == Random(3).sample(rows, 7)
    with pytest.raises(ValueError, match=r"text_replay_task_weights: task\(s\) \['chess'\]"):
        replayed_rows(rows, 5, Random(0), {"chess": 1.0})


def test_text_replay_can_drop_a_restated_question(parts, tiny_world: Path) -> None:
    """synth.restate_question's solutions begin with their question; the reading phase
    replays them from just after it (student.read.replay_restatement: false), the instruction
    phase as written. A solution that does not restate is replayed as it is either way."""
    tok = parts[0]
    plain = read_rows(manifest_path(tiny_world, "text_train"))[:6]
    restated = [r.model_copy(update={"solution": f"{r.transcript} {r.solution}"}) for r in plain]
    prompt = lambda t: text_prompt_ids(tok, t)  # noqa: E731

    def responses(rows, restatement: bool) -> list[list[int]]:
        return [e.response_ids for e in text_replay(tok, rows, prompt, 6, Random(0), restatement)]

    assert responses(restated, False) == responses(plain, True) == responses(plain, False)
    assert responses(restated, True) != responses(plain, True)
    eos = token_id(tok, IM_END)
    first = text_replay(tok, restated, prompt, 6, Random(0), True)[0]
    row = next(r for r in restated if tuple(prompt(r.transcript)) == tuple(first.prompt_ids))
    assert first.response_ids == [*tok(row.solution)["input_ids"], eos]


def test_each_phase_trains_only_its_parts_and_lowers_its_loss(parts, tiny_world: Path) -> None:
    tok, teacher, fresh, processor = parts
    model = copy.deepcopy(fresh)
    rows, waves = _train_rows(tiny_world)
    feats = extract_features(processor, waves)
    n_tokens = [f.audio_tokens for f in feats]
    pad = token_id(tok, PAD)
    tower, projector = model.model.audio_tower, model.model.multi_modal_projector
    lm = model.model.language_model

    def falls(losses: list[float]) -> bool:
        return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3

    flags = {n: q.requires_grad for n, q in model.named_parameters()}
    lm_before, tower_before, proj_before = _state(lm), _state(tower), _state(projector)
    alphabet, targets = character_targets([r.transcript for r in rows])
    assert "".join(alphabet[i] for i in targets[0]) == rows[0].transcript
    assert falls(pretrain_encoder_ctc(model, feats, targets, len(alphabet), FAST, seed=0))
    assert _changed(tower_before, tower) and not _changed(lm_before, lm)
    assert not _changed(proj_before, projector)
    assert "embed_positions.weight" not in _changed(tower_before, tower)  # fixed sinusoids

    tower_before = _state(tower)
    tokens = [list(tok(r.transcript)["input_ids"]) for r in rows]
    assert falls(align_to_embeddings(model, feats, tokens, FAST, seed=0))
    # The LM is frozen while the audio side learns: the text teacher's ability is intact.
    assert not _changed(lm_before, lm)
    assert _changed(tower_before, tower) and _changed(proj_before, projector)
    ids = torch.tensor([text_prompt_ids(tok, "alice lies. does alice tell the truth?")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, teacher(input_ids=ids).logits)

    # The other phase-2 objective: the frozen LM's NLL of each transcript given the audio.
    tower_before, proj_before = _state(tower), _state(projector)
    asr = transcription_examples(tok, [r.transcript for r in rows], n_tokens)
    assert asr[0].prompt_ids == speech_prompt_ids(tok, n_tokens[0], TRANSCRIBE)
    assert tok.decode(asr[0].response_ids[:-1]).strip() == rows[0].transcript
    assert falls(align_through_lm(model, feats, asr, pad, FAST, seed=0))
    assert not _changed(lm_before, lm)
    assert _changed(tower_before, tower) and _changed(proj_before, projector)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, teacher(input_ids=ids).logits)

    tower_before = _state(tower)
    states = cache_encoder_states(model, feats)
    assert [s.shape[0] for s in states] == n_tokens
    # Phase 2b: the projector and the LM learn to transcribe; the encoder stays as it is.
    proj_before = _state(projector)
    read = ReadPhase(steps=12, batch_size=4, lr=3e-3, warmup_steps=2)
    assert falls(learn_to_read(model, states, asr, pad, read, seed=0))
    assert _changed(lm_before, lm) and _changed(proj_before, projector)
    assert not _changed(tower_before, tower)
    text_rows = read_rows(manifest_path(tiny_world, "text_train"))
    phase = InstructPhase(steps=12, batch_size=4, lr=3e-3, warmup_steps=2, asr_items=4)
    mix, _ = instruction_mix(
        tok, rows, n_tokens, text_rows, lambda t: text_prompt_ids(tok, t), phase, seed=0
    )
    assert falls(instruct(model, states, mix, pad, phase, seed=0))
    assert _changed(lm_before, lm) and not _changed(tower_before, tower)
    # Each phase hands the model back with the trainable flags it received.
    assert {n: q.requires_grad for n, q in model.named_parameters()} == flags


def test_speaker_targets_are_standardised_and_class_balanced() -> None:
    rows = [
        HeardUtterance("a", "en-us+f1", pitch=40, rate_wpm=150),
        HeardUtterance("b", "en-gb+f1", pitch=60, rate_wpm=170),
        HeardUtterance("c", "en-us+m2", pitch=90, rate_wpm=260),
        HeardUtterance("d", "en-gb+whisper", pitch=10, rate_wpm=100),
    ]
    t = SpeakerTargets.from_rows(rows)
    assert t.variants == ("f1", "m2", "whisper")
    assert t.variant_N.tolist() == [0, 0, 1, 2]
    for x in (t.pitch_N, t.rate_N):
        assert abs(float(x.mean())) < 1e-6 and abs(float(x.std()) - 1) < 1e-6
    assert t.pitch_N.argmax() == 2 and t.rate_N.argmin() == 3
    head = SpeakerHead(8, t, seed=0)
    # Each variant weighs the same in total: the rare whisper voice is not drowned out.
    per_class = torch.bincount(t.variant_N).float() * head.class_weight
    assert torch.allclose(per_class, per_class[0].expand(3))
    torch.manual_seed(123)
    assert torch.equal(SpeakerHead(8, t, seed=0).linear.weight, head.linear.weight)


def test_speaker_head_trains_with_the_encoder(parts, tiny_world: Path) -> None:
    """Phase 1 with the speaker loss: the head and the encoder learn the utterances' voice,
    pitch and rate (the head's loss on them falls); weight 0 leaves the head untouched."""
    _, _, fresh, processor = parts
    rows, waves = _train_rows(tiny_world)
    feats = extract_features(processor, waves)
    alphabet, chars = character_targets([r.transcript for r in rows])
    targets = SpeakerTargets.from_rows([HeardUtterance.of(r) for r in rows])
    idx = list(range(len(rows)))
    phase = Phase(steps=30, batch_size=4, lr=3e-3, warmup_steps=2)

    def trained(weight: float) -> tuple[SpeakerHead, float, float]:
        model = copy.deepcopy(fresh)
        head = SpeakerHead(model.config.audio_config.d_model, targets, seed=0)

        def speaker_loss() -> float:
            with torch.no_grad():
                return float(head.loss(*encoder_states(model, feats), idx))

        before = speaker_loss()
        pretrain_encoder_ctc(
            model, feats, chars, len(alphabet), phase, seed=0, speaker=head, speaker_weight=weight
        )
        return head, before, speaker_loss()

    untouched = SpeakerHead(fresh.config.audio_config.d_model, targets, seed=0)
    head, before, after = trained(1.0)
    off, _, off_after = trained(0.0)
    assert _changed(_state(untouched), head)
    assert not _changed(_state(untouched), off)
    # 30 tiny steps: measured 4.47 → 3.83, where CTC alone leaves the (untrained) head's
    # loss where it started.
    assert after < 0.9 * before and after < 0.9 * off_after


# bf16 is opt-in; the generic loop's autocast is in CI (test_sft.py), this one in make test-slow.
@pytest.mark.slow
def test_phases_train_under_bf16_autocast(parts, tiny_world: Path) -> None:
    """`precision: bf16` on every phase: each loss still falls, and the weights (and the
    audio embeddings the LM reads) stay float32."""
    tok, _, fresh, processor = parts
    model = copy.deepcopy(fresh)
    rows, waves = _train_rows(tiny_world)
    feats = extract_features(processor, waves)
    bf16 = FAST.model_copy(update={"precision": "bf16"})

    def falls(losses: list[float]) -> bool:
        return sum(losses[-3:]) / 3 < sum(losses[:3]) / 3

    alphabet, targets = character_targets([r.transcript for r in rows])
    assert falls(pretrain_encoder_ctc(model, feats, targets, len(alphabet), bf16, seed=0))
    tokens = [list(tok(r.transcript)["input_ids"]) for r in rows]
    assert falls(align_to_embeddings(model, feats, tokens, bf16, seed=0))
    states = cache_encoder_states(model, feats)
    phase = InstructPhase(
        steps=12, batch_size=4, lr=3e-3, warmup_steps=2, asr_items=4, precision="bf16"
    )
    text_rows = read_rows(manifest_path(tiny_world, "text_train"))
    n_tokens = [f.audio_tokens for f in feats]
    mix, _ = instruction_mix(
        tok, rows, n_tokens, text_rows, lambda t: text_prompt_ids(tok, t), phase, seed=0
    )
    assert falls(instruct(model, states, mix, token_id(tok, PAD), phase, seed=0))
    assert {q.dtype for q in model.parameters()} == {torch.float32}
    assert all(s.dtype == torch.float32 for s in states)


def test_phoneme_targets_split_words_and_share_one_inventory() -> None:
    inventory, ids = phoneme_targets(["take two.", "two, take"], ["en-us", "en-gb"])
    assert inventory == sorted({"t", "eI", "k", "u:", WORD_BOUNDARY})
    spelled = [[inventory[i] for i in seq] for seq in ids]
    assert spelled[0] == ["t", "eI", "k", WORD_BOUNDARY, "t", "u:"]
    assert spelled[1] == ["t", "u:", WORD_BOUNDARY, "t", "eI", "k"]
