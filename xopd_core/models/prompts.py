"""The two prompt layouts: the teacher reads the transcript T, the student hears the audio S.

Both are chat turns ending with the assistant header, so a response continues either one;
only the offset at which it starts differs (remapped in `xopd_core.engines.scoring`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerFast

from xopd_core.models.tokenizer import AUDIO, token_id

# The instruction after the audio that asks the student for a transcript (taught during
# speech instruction tuning; the eval stage's `asr_wer` uses it).
TRANSCRIBE = "transcribe the audio."


def _turns(system: str | None, content: Any) -> list[dict[str, Any]]:
    head = [] if system is None else [{"role": "system", "content": system}]
    return [*head, {"role": "user", "content": content}]


def text_prompt_ids(
    tokenizer: PreTrainedTokenizerFast, transcript: str, *, system: str | None = None
) -> list[int]:
    """The transcript as a user turn (after a `system` turn, for a family that has one),
    then the assistant header (the teacher's prompt, and the student's in-modal prompt)."""
    return text_prompts_ids(tokenizer, [transcript], system=system)[0]


def text_prompts_ids(
    tokenizer: PreTrainedTokenizerFast,
    transcripts: Sequence[str],
    *,
    system: str | None = None,
) -> list[list[int]]:
    """`text_prompt_ids` of many transcripts: the chat template rendered for all, then one
    batched encode (the teacher's 40,000 prompts in about half the time of one by one)."""
    if not transcripts:
        return []
    rendered = tokenizer.apply_chat_template(
        [_turns(system, t) for t in transcripts],
        tokenize=False,
        add_generation_prompt=True,
    )
    encoded = tokenizer(list(rendered), add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in encoded]


def speech_prompt_ids(
    tokenizer: PreTrainedTokenizerFast,
    audio_tokens: int,
    instruction: str | None = None,
    *,
    audio_token: str = AUDIO,
    system: str | None = None,
) -> list[int]:
    """The student's prompt for one utterance: a user turn holding the audio (and an optional
    text instruction after it), after a `system` turn if given, then the assistant header;
    the family's placeholder (`audio_token`, written once by the chat template) expanded to
    `audio_tokens` copies, as the processor does."""
    content: list[Any] = [{"type": "audio"}]
    if instruction is not None:
        content.append({"type": "text", "text": instruction})
    messages: Any = _turns(system, content)
    ids = list(
        tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            add_generation_prompt=True,
            return_dict=False,
        )
    )
    slot = ids.index(token_id(tokenizer, audio_token))
    return ids[:slot] + [ids[slot]] * audio_tokens + ids[slot + 1 :]
