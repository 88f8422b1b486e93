from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from xopd_core.data.manifest import manifest_path, read_manifest
from xopd_core.models.prompts import text_prompt_ids, text_prompts_ids
from xopd_core.models.tokenizer import (
    AUDIO,
    AUDIO_BOS,
    AUDIO_EOS,
    load_tokenizer,
    token_id,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def world_tokenizer(tiny_world: Path):
    rows = read_manifest(manifest_path(tiny_world, "train"))
    rows += read_manifest(manifest_path(tiny_world, "text_train"))
    return train_tokenizer(t for r in rows for t in (r["transcript"], r["solution"]))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen2_audio"])
def test_saved_tokenizer_reloads_with_identical_ids(
    world_tokenizer, tmp_path: Path, tiny_world: Path, model_type: str
) -> None:
    world_tokenizer.save_pretrained(str(tmp_path))
    # transformers rebuilds any `qwen2` folder's tokenizer as Qwen2Tokenizer, whatever
    # tokenizer_config.json says: the ids must survive that (the teacher is a qwen2 model).
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    checked = load_tokenizer(tmp_path)
    rows = read_manifest(manifest_path(tiny_world, "eval"))
    texts = [r["solution"] for r in rows] + [r["transcript"] for r in rows]
    texts.append(f"hello{AUDIO_BOS}{AUDIO}{AUDIO}{AUDIO_EOS} the answer is yes.")
    for text in texts:
        ids = world_tokenizer(text)["input_ids"]
        assert reloaded(text)["input_ids"] == ids == checked(text)["input_ids"]
        assert reloaded.decode(ids) == text
    assert len(reloaded) == len(world_tokenizer)


def test_a_tokenizer_that_reloads_differently_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # A word-level tokenizer: what transformers turns into a character-level Qwen2Tokenizer.
    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.train_from_iterator(
        ["always face forward the answer is yes"],
        trainers.WordLevelTrainer(special_tokens=["[UNK]", AUDIO]),
    )
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(TypeError, match="different ids"):
        load_tokenizer(tmp_path)


def test_same_corpus_gives_the_same_vocabulary(tiny_world: Path, world_tokenizer) -> None:
    rows = read_manifest(manifest_path(tiny_world, "train"))
    rows += read_manifest(manifest_path(tiny_world, "text_train"))
    again = train_tokenizer(t for r in rows for t in (r["transcript"], r["solution"]))
    assert again.get_vocab() == world_tokenizer.get_vocab()


def test_chat_template_renders_one_audio_placeholder(world_tokenizer) -> None:
    messages = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "is that true?"}]}
    ]
    text = world_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.count(AUDIO) == 1
    assert text.endswith("<|im_start|>assistant\n")
    ids = world_tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    audio = [token_id(world_tokenizer, t) for t in (AUDIO_BOS, AUDIO, AUDIO_EOS)]
    start = ids.index(audio[0])
    assert ids[start : start + 3] == audio


def test_every_held_out_word_is_one_token(world_tokenizer, tiny_world: Path) -> None:
    # Whole-word tokens keep sequences short for the tiny models; an eval word the
    # training corpus never had would show up here as several byte-level pieces.
    pre = world_tokenizer.backend_tokenizer.pre_tokenizer
    for split in ("eval", "para_eval"):
        for r in read_manifest(manifest_path(tiny_world, split)):
            for text in (r["transcript"], r["solution"]):
                words = pre.pre_tokenize_str(text)
                assert len(world_tokenizer(text)["input_ids"]) == len(words), text


def test_missing_token_is_an_error_not_the_unknown_id(world_tokenizer) -> None:
    with pytest.raises(KeyError, match="zebra"):
        token_id(world_tokenizer, "zebra")


def test_batched_text_prompts_equal_one_at_a_time(world_tokenizer, tiny_world: Path) -> None:
    rows = read_manifest(manifest_path(tiny_world, "text_train"))
    transcripts = [r["transcript"] for r in rows]
    transcripts += ["  leading and trailing spaces  ", "two\nlines", "is that true or false?"]
    batched = text_prompts_ids(world_tokenizer, transcripts)
    one_at_a_time = [
        list(
            world_tokenizer.apply_chat_template(
                [{"role": "user", "content": t}],
                tokenize=True,
                add_generation_prompt=True,
                return_dict=False,
            )
        )
        for t in transcripts
    ]
    assert batched == one_at_a_time
    assert [text_prompt_ids(world_tokenizer, t) for t in transcripts] == one_at_a_time
    assert len({len(ids) for ids in batched}) > 1  # real, differing prompts were compared
    assert text_prompts_ids(world_tokenizer, []) == []
