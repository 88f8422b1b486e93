"""Where a response sits in a prompt + response sequence, and the vocabulary both models share.

The student's prompt holds audio placeholders, the teacher's the transcript, so one response
starts at different offsets; both sides read their log-probs through `response_positions`.
Pure functions; the classic bug they guard is the off-by-one at the first response token.
`shared_vocab_size` is the vocabulary contract between a speech student and its text teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from xopd_core.models.tokenizer import IM_END, PAD

# Special tokens a response may hold besides the regular vocabulary: the end of turn that
# ends it, and the end-of-text/padding token (a base model's end).
RESPONSE_SPECIALS = (IM_END, PAD)


def response_positions(prompt_len: int, response_len: int) -> slice:
    """Logit positions that predict the response tokens of `prompt + response`: position
    `prompt_len − 1` (the last prompt token) predicts response token 0."""
    if prompt_len < 1:
        raise ValueError("a prompt needs at least one token to predict the response from")
    return slice(prompt_len - 1, prompt_len - 1 + response_len)


def padded(
    sequences: Sequence[list[int]], pad_id: int, *, left: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids_B_L` padded with `pad_id` on the right, or the left (every row then ends in the
    last column), and `attention_mask_B_L`."""
    longest = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(sequences):
        at = slice(longest - len(s), longest) if left else slice(0, len(s))
        ids[i, at] = torch.tensor(s, dtype=torch.long)
        mask[i, at] = 1
    return ids, mask


def response_tokens(rollouts: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """`tokens_B_T` of the rollouts' responses (−1 past each one's end) and `mask_B_T`."""
    return padded([r.response_ids for r in rollouts], -1)


def prompt_groups(keys: Sequence[Any]) -> tuple[list[int], list[int]]:
    """Rows sharing a prompt: `(first, prompt_of)` where `first[u]` is the first row with the
    u-th distinct key and `prompt_of[row]` the index u of the row's key."""
    index: dict[Any, int] = {}
    first: list[int] = []
    prompt_of: list[int] = []
    for row, key in enumerate(keys):
        if key not in index:
            index[key] = len(first)
            first.append(row)
        prompt_of.append(index[key])
    return first, prompt_of


def response_logits(
    model: Any,
    prompt_mask_U_L: torch.Tensor,
    prompt_of: Sequence[int],
    responses: Sequence[Sequence[int]],
    *,
    pad_id: int,
    prompt_ids_U_L: torch.Tensor | None = None,
    prompt_embeds_U_L_D: torch.Tensor | None = None,
) -> torch.Tensor:
    """`[B, T, V]` logits predicting each response's tokens (zeros past its end; T = longest
    response) of a causal LM or a speech LLM's LM, each prompt read once however many
    responses share it.

    The U distinct prompts come left-padded (`prompt_ids_U_L` or `prompt_embeds_U_L_D`, with
    `prompt_mask_U_L`); response row b continues prompt `prompt_of[b]`. One pass over the
    prompts fills a key/value cache, which is gathered to the B rows; a second pass reads
    the responses (all but their last token) on it. The last prompt position predicts
    response token 0 (`response_positions`). Gradients reach the prompt pass through the
    gathered cache, so with m responses per prompt the trainer's forward and backward cover
    the prompt once, not m times: a round's speech prompts are ~240 audio positions before
    ~45 response tokens. Only response positions go through the output head. Index
    tensors may be on the CPU; the work and the result are on the model's device."""
    inner = model.model
    backbone = getattr(inner, "language_model", inner)  # Qwen2-Audio wraps a Qwen2Model
    device = backbone.norm.weight.device
    mask_U_L = prompt_mask_U_L.to(device=device, dtype=torch.long)
    positions_U_L = (mask_U_L.cumsum(-1) - 1).clamp_min(0)
    rows_B = torch.tensor(list(prompt_of), dtype=torch.long, device=device)
    lengths_B = torch.tensor([len(r) for r in responses], dtype=torch.long, device=device)
    width = int(lengths_B.max()) if len(responses) else 0
    if backbone.gradient_checkpointing and backbone.training:
        # Checkpointed layers keep no cache (transformers drops it to recompute them), so
        # each row reads its prompt and response in one pass: the prompt m times, for
        # activations kept only at layer boundaries.
        if prompt_embeds_U_L_D is None:
            assert prompt_ids_U_L is not None
            prompt_embeds_U_L_D = model.get_input_embeddings()(prompt_ids_U_L.to(device))
        ids_B_R, mask_B_R = padded([list(r[:-1]) for r in responses], pad_id)
        ids_B_R, mask_B_R = ids_B_R.to(device), mask_B_R.to(device)
        last_B = positions_U_L[rows_B, -1:]
        states_B_S_E = backbone(
            inputs_embeds=torch.cat(
                [prompt_embeds_U_L_D[rows_B], model.get_input_embeddings()(ids_B_R)], dim=1
            ),
            attention_mask=torch.cat([mask_U_L[rows_B], mask_B_R], dim=1),
            position_ids=torch.cat(
                [positions_U_L[rows_B], last_B + 1 + torch.arange(ids_B_R.shape[1], device=device)],
                dim=1,
            ),
            use_cache=False,
        ).last_hidden_state
        start = mask_U_L.shape[1] - 1  # the last prompt position predicts response token 0
        states_B_T_E = states_B_S_E[:, start : start + width]
        inside_B_T = torch.arange(width, device=device)[None, :] < lengths_B[:, None]
        return model.lm_head(states_B_T_E * inside_B_T[..., None])
    cache = DynamicCache(config=backbone.config)
    prompt_states = backbone(
        input_ids=None if prompt_ids_U_L is None else prompt_ids_U_L.to(device),
        inputs_embeds=prompt_embeds_U_L_D,
        attention_mask=mask_U_L,
        position_ids=positions_U_L,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    states_B_T_E = prompt_states[rows_B, -1:]  # predicts response token 0
    if width > 1:
        cache.batch_select_indices(rows_B)
        ids_B_R, mask_B_R = padded([list(r[:-1]) for r in responses], pad_id)
        ids_B_R, mask_B_R = ids_B_R.to(device), mask_B_R.to(device)
        continued = backbone(
            input_ids=ids_B_R,
            attention_mask=torch.cat([mask_U_L[rows_B], mask_B_R], dim=1),
            position_ids=positions_U_L[rows_B, -1:]
            + 1
            + torch.arange(ids_B_R.shape[1], device=device),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        states_B_T_E = torch.cat([states_B_T_E, continued], dim=1)
    inside_B_T = torch.arange(width, device=device)[None, :] < lengths_B[:, None]
    return model.lm_head(states_B_T_E[:, :width] * inside_B_T[..., None])


def response_vocabulary(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The tokens a response can hold, with their ids: the regular (non-added) vocabulary,
    `RESPONSE_SPECIALS` and the tokenizer's own end-of-sequence token. Audio, vision and
    tool markers are added tokens outside it."""
    vocab = tokenizer.get_vocab()
    added = tokenizer.get_added_vocab()
    usable = {tok: i for tok, i in vocab.items() if tok not in added}
    for tok in (*RESPONSE_SPECIALS, tokenizer.eos_token):
        if isinstance(tok, str) and tok in vocab:
            usable[tok] = vocab[tok]
    return usable


def shared_vocab_size(
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizer: PreTrainedTokenizerBase,
    *,
    student_rows: int | None = None,
    teacher_rows: int | None = None,
) -> int:
    """The vocabulary contract, checked before training: V, the entries both models' logits
    are sliced to before any KL and the ids the student may sample (0..V−1).

    Every token a response can hold (`response_vocabulary` of either side) must have one id
    in both tokenizers; otherwise the pair is refused, naming the lowest such token and its
    two ids. V is the length of the run of ids from 0 on which both tokenizers hold the same
    token. Qwen tokenizers lay out the regular BPE vocabulary first, then added tokens
    (<|endoftext|>, <|im_start|>, <|im_end|>, ...); a speech model's audio and vision markers
    come after the ones it shares with its text model (Qwen2-Audio's <|AUDIO|>,
    <|audio_bos|>, <|audio_eos|> at 151646–151648 after Qwen2's 151646 tokens: V = 151646)
    or take the ids of text-only ones. So below V an id is one token to both; from V up are
    the student's markers, the teacher's other added tokens and the padded embedding rows
    (Qwen pads to 156032, 152064 or 151936), none of which a response holds or the teacher
    scores alike. A response token at or past V is refused too: slicing would cut it.
    `student_rows`/`teacher_rows`: the models' embedding rows, which must cover V."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    usable = (
        response_vocabulary(student_tokenizer).keys()
        | response_vocabulary(teacher_tokenizer).keys()
    )

    def ids(tok: str) -> tuple[int | None, int | None]:
        return s_vocab.get(tok), t_vocab.get(tok)

    def lowest_id(tok: str) -> tuple[int, str]:
        return min(i for i in ids(tok) if i is not None), tok

    differing = [tok for tok in usable if s_vocab.get(tok) != t_vocab.get(tok)]
    if differing:
        tok = min(differing, key=lowest_id)
        s_id, t_id = ("absent" if i is None else f"id {i}" for i in ids(tok))
        raise ValueError(
            f"student and teacher tokenizers differ at {tok!r}: {s_id} in the student's, "
            f"{t_id} in the teacher's ({len(differing)} response tokens differ); token-level "
            "distillation needs one id for every token a response can hold"
        )
    s_token, t_token = ({i: tok for tok, i in v.items()} for v in (s_vocab, t_vocab))
    v = 0
    while v in s_token and s_token[v] == t_token.get(v):
        v += 1
    past = [tok for tok in usable if s_vocab[tok] >= v]
    if past:
        tok = min(past, key=lowest_id)
        raise ValueError(
            f"student and teacher tokenizers differ at id {v} ({s_token.get(v)!r} in the "
            f"student's, {t_token.get(v)!r} in the teacher's), below the response token "
            f"{tok!r} (id {s_vocab[tok]} in both): the shared vocabulary would cut it"
        )
    for side, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows is not None and rows < v:
            raise ValueError(
                f"the {side}'s embedding table has {rows} rows, fewer than the {v} tokens the "
                "two tokenizers share"
            )
    return v
