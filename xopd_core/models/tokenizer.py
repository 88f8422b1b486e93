"""The mini world's tokenizer: a byte-level BPE built exactly like Qwen2's, saved as an HF
fast tokenizer with a chat template and the Qwen2-Audio special tokens.

Why Qwen2's exact layout: transformers 5.17 reloads any folder whose config says
`model_type: qwen2` as `Qwen2Tokenizer`, ignoring tokenizer_config.json, and rebuilds it from
the saved vocab and merges with Qwen2's normalizer and pre-tokenizer (a word-level tokenizer
silently became a character-level one, DESIGN.md §4). Training with those same components
makes the rebuilt tokenizer identical, so transformers and vLLM read the ids we trained on.
With a vocabulary budget above the corpus' distinct words, every mini-world word is one token.
Teacher and student share it; real checkpoints bring their own.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
AUDIO_BOS, AUDIO, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, AUDIO_BOS, AUDIO, AUDIO_EOS]
# transformers' Qwen2Tokenizer pre-tokenisation pattern (models/qwen2/tokenization_qwen2.py).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
VOCAB_BUDGET = 8192
ROLES = ("system", "user", "assistant")

# Qwen2-Audio's message layout: a content list may hold {"type": "audio"} parts, rendered as
# one <|AUDIO|> placeholder that the processor expands to one token per encoder frame.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen2_pipeline(tok: Tokenizer) -> Tokenizer:
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts` (plus the chat roles), merged until each word is a token."""
    tok = _qwen2_pipeline(
        Tokenizer(
            models.BPE(
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
                byte_fallback=False,
            )
        )
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_BUDGET,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(ROLES), *texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        pad_token=PAD,
        eos_token=IM_END,
        bos_token=None,
        additional_special_tokens=[IM_START, AUDIO_BOS, AUDIO, AUDIO_EOS],
        model_max_length=4096,
        padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def token_id(tokenizer: PreTrainedTokenizerFast, token: str) -> int:
    """The id of one token that must exist as a single vocabulary entry."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or tid == tokenizer.unk_token_id:
        raise KeyError(f"token {token!r} is not in the vocabulary")
    return tid


def decode(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text if isinstance(text, str) else " ".join(text)


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Reload through AutoTokenizer, as transformers and vLLM will, and prove it still gives
    the saved tokenizer's ids (a silent swap of tokenizer class is the failure this guards)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    saved = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    probe = "always face forward. take two steps left. <|AUDIO|> the answer is yes."
    if not isinstance(tok, PreTrainedTokenizerFast) or (
        tok(probe)["input_ids"] != saved.encode(probe).ids
    ):
        raise TypeError(
            f"{path}: AutoTokenizer reloads it as {type(tok).__name__} with different ids than "
            "the saved tokenizer.json"
        )
    return tok
