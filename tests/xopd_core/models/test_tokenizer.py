from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from xopd_core.data.manifest import manifest_path, read_manifest
from xopd_core.models.tokenizer import (
    AUDIO,
    AUDIO_BOS,
    AUDIO_EOS,
    UNK,
    load_tokenizer,
    save_tokenizer,
    token_id,
    train_word_tokenizer,
)


@pytest.fixture(scope="module")
def world_tokenizer(tiny_world: Path):
    rows = read_manifest(manifest_path(tiny_world, "train"))
    rows += read_manifest(manifest_path(tiny_world, "text_train"))
    return train_word_tokenizer(t for r in rows for t in (r["transcript"], r["solution"]))


def test_saved_tokenizer_reloads_with_identical_ids(
    world_tokenizer, tmp_path: Path, tiny_world: Path
) -> None:
    save_tokenizer(world_tokenizer, tmp_path)
    # A Qwen2-Audio config beside it must not turn it into Qwen2's BPE tokenizer on reload.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_audio"}))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    checked = load_tokenizer(tmp_path)
    texts = [r["solution"] for r in read_manifest(manifest_path(tiny_world, "eval"))]
    texts.append(f"hello{AUDIO_BOS}{AUDIO}{AUDIO}{AUDIO_EOS} the answer is yes.")
    for text in texts:
        ids = world_tokenizer(text)["input_ids"]
        assert reloaded(text)["input_ids"] == ids == checked(text)["input_ids"]
    assert len(reloaded) == len(world_tokenizer)


def test_same_corpus_gives_the_same_vocabulary(tiny_world: Path, world_tokenizer) -> None:
    rows = read_manifest(manifest_path(tiny_world, "train"))
    rows += read_manifest(manifest_path(tiny_world, "text_train"))
    again = train_word_tokenizer(t for r in rows for t in (r["transcript"], r["solution"]))
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
    assert token_id(world_tokenizer, UNK) not in ids


def test_held_out_text_has_no_unknown_words(world_tokenizer, tiny_world: Path) -> None:
    unk = token_id(world_tokenizer, UNK)
    for split in ("eval", "para_eval"):
        for r in read_manifest(manifest_path(tiny_world, split)):
            assert unk not in world_tokenizer(r["transcript"] + " " + r["solution"])["input_ids"]


def test_missing_token_is_an_error_not_the_unknown_id(world_tokenizer) -> None:
    with pytest.raises(KeyError, match="zebra"):
        token_id(world_tokenizer, "zebra")
