"""The vocabulary contract between a speech student and its text teacher, on tokenizers laid
out as Qwen's: the regular BPE vocabulary first, then added special tokens."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from xopd_core.engines.scoring import shared_vocab_size
from xopd_core.models.tokenizer import AUDIO, AUDIO_BOS, AUDIO_EOS, IM_END, IM_START, PAD

CORPUS = ["always face forward", "take two steps left", "the answer is yes", "the answer is no"]
TEXT_SPECIALS = [PAD, IM_START, IM_END]  # Qwen2-7B-Instruct's added tokens, in its order
AUDIO_MARKERS = [AUDIO, AUDIO_BOS, AUDIO_EOS]  # Qwen2-Audio's, after them


@pytest.fixture(scope="module")
def bpe_json() -> str:
    """One byte-level BPE (no special tokens), trained once: both sides of a pair load it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok.to_str()


def qwen_layout(bpe_json: str, specials: list[str]) -> PreTrainedTokenizerFast:
    """The regular vocabulary of `bpe_json`, then `specials` added in order after it."""
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe_json))
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = IM_END
    return tok


def regular_ids(bpe_json: str) -> dict[str, int]:
    return dict(json.loads(bpe_json)["model"]["vocab"])


def test_a_speech_student_and_its_text_teacher_share_the_vocabulary_below_the_markers(
    bpe_json: str,
) -> None:
    """Qwen2-Audio + Qwen2: the student has the teacher's tokens plus audio markers after
    them; V covers the regular vocabulary and the text specials, not the markers."""
    student = qwen_layout(bpe_json, TEXT_SPECIALS + AUDIO_MARKERS)
    teacher = qwen_layout(bpe_json, TEXT_SPECIALS)
    v = len(regular_ids(bpe_json)) + len(TEXT_SPECIALS)
    assert shared_vocab_size(student, teacher, student_rows=v + 40, teacher_rows=v + 8) == v
    assert shared_vocab_size(teacher, student) == v
    assert teacher.convert_tokens_to_ids(IM_END) == v - 1
    assert min(student.convert_tokens_to_ids(AUDIO_MARKERS)) == v


def test_markers_in_place_of_text_only_specials_stay_outside_the_shared_vocabulary(
    bpe_json: str,
) -> None:
    """Qwen2.5-Omni + Qwen2.5: the student's audio markers take the ids of the teacher's
    object-reference tokens, and the tool-call token after them is shared again; V stops at
    the first id the two tokenizers read differently."""
    tool = "<tool_call>"
    student = qwen_layout(bpe_json, [*TEXT_SPECIALS, *AUDIO_MARKERS, tool])
    teacher = qwen_layout(
        bpe_json, [*TEXT_SPECIALS, "<|object_ref_start|>", "<|object_ref_end|>", "<|box|>", tool]
    )
    assert student.convert_tokens_to_ids(tool) == teacher.convert_tokens_to_ids(tool)
    assert shared_vocab_size(student, teacher) == len(regular_ids(bpe_json)) + len(TEXT_SPECIALS)


def test_a_regular_token_with_another_id_is_refused_naming_it(bpe_json: str) -> None:
    regular = regular_ids(bpe_json)
    a, b = "Ġanswer", "Ġforward"
    assert regular[a] < regular[b]
    swapped = json.loads(bpe_json)
    swapped["model"]["vocab"][a], swapped["model"]["vocab"][b] = regular[b], regular[a]
    student = qwen_layout(bpe_json, TEXT_SPECIALS + AUDIO_MARKERS)
    teacher = qwen_layout(json.dumps(swapped), TEXT_SPECIALS)
    with pytest.raises(ValueError, match="tokenizers differ") as refused:
        shared_vocab_size(student, teacher)
    assert f"'{a}': id {regular[a]} in the student's, id {regular[b]} in the teacher's" in str(
        refused.value
    )


def test_pairs_that_differ_only_in_padding_share_one_vocabulary(bpe_json: str) -> None:
    """Embedding tables padded to different sizes (Qwen: 156032, 152064, 151936) change
    nothing; a table too small for the shared vocabulary is refused."""
    student = qwen_layout(bpe_json, TEXT_SPECIALS + AUDIO_MARKERS)
    teacher = qwen_layout(bpe_json, TEXT_SPECIALS)
    v = shared_vocab_size(student, teacher)
    padded = [(len(student), len(teacher)), (v + 64, v), (v, v + 128), (v + 3, v + 3)]
    assert all(
        shared_vocab_size(student, teacher, student_rows=s, teacher_rows=t) == v for s, t in padded
    )
    with pytest.raises(ValueError, match=f"teacher's embedding table has {v - 1} rows"):
        shared_vocab_size(student, teacher, student_rows=v, teacher_rows=v - 1)


def test_an_end_of_turn_token_with_another_id_is_refused_naming_it(bpe_json: str) -> None:
    """A response ends with <|im_end|>: its id must be the same on both sides."""
    student = qwen_layout(bpe_json, TEXT_SPECIALS + AUDIO_MARKERS)
    teacher = qwen_layout(bpe_json, [PAD, IM_END, IM_START])
    s_id, t_id = student.convert_tokens_to_ids(IM_END), teacher.convert_tokens_to_ids(IM_END)
    with pytest.raises(ValueError, match="tokenizers differ") as refused:
        shared_vocab_size(student, teacher)
    assert f"'{IM_END}': id {s_id} in the student's, id {t_id} in the teacher's" in str(
        refused.value
    )


def test_a_response_token_past_the_first_differing_id_is_refused(bpe_json: str) -> None:
    """<|im_end|> has one id in both, but slicing to the ids both read alike would cut it."""
    student = qwen_layout(bpe_json, [PAD, AUDIO, IM_END])
    teacher = qwen_layout(bpe_json, [PAD, IM_START, IM_END])
    with pytest.raises(ValueError, match=r"below the response token '<\|im_end\|>'"):
        shared_vocab_size(student, teacher)


def test_a_response_token_the_teacher_lacks_is_refused(bpe_json: str) -> None:
    student = qwen_layout(bpe_json, TEXT_SPECIALS)
    teacher = qwen_layout(bpe_json, [PAD, IM_START])
    teacher.eos_token = PAD
    with pytest.raises(ValueError, match=r"'<\|im_end\|>': id \d+ in the student's, absent"):
        shared_vocab_size(student, teacher)
