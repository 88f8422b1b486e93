"""The mini world's word-level tokenizer, saved as an HF fast tokenizer with a chat template.

Teacher and student share it (X-OPD scores the student's sampled token ids under the
teacher, so the vocabularies must be the same). It carries the special tokens a
Qwen2-Audio processor expects. Not for real checkpoints: those bring their own tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
AUDIO_BOS, AUDIO, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"
UNK = "[UNK]"
SPECIAL_TOKENS = [PAD, IM_START, IM_END, AUDIO_BOS, AUDIO, AUDIO_EOS, UNK]
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


def train_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """One token per lower-cased word or punctuation mark seen in `texts` (plus the roles)."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, tidies " ."
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator([*ROLES, *texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=UNK,
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
    """The id of one token that must exist (never silently the unknown id)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or (token != UNK and tid == tokenizer.unk_token_id):
        raise KeyError(f"token {token!r} is not in the vocabulary")
    return tid


def decode(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text if isinstance(text, str) else " ".join(text)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    tokenizer.save_pretrained(str(out_dir))


def load_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    """Reload through AutoTokenizer, as transformers and vLLM will, and check it stayed ours."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if not isinstance(tok, PreTrainedTokenizerFast) or tok.unk_token != UNK:
        raise TypeError(
            f"{path}: reloaded as {type(tok).__name__}, not the saved word-level tokenizer"
        )
    return tok
