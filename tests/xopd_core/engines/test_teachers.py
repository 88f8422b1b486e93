"""Teachers of other families (#23): any text causal LM, read from its folder, scoring the
student's response ids after the transcript rendered with the teacher's own chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from xopd_core.engines.base import Prompt
from xopd_core.engines.hf import HfStudent, HfTeacher
from xopd_core.engines.scoring import response_positions, shared_vocab_size
from xopd_core.errors import CheckpointError
from xopd_core.models.checkpoint import causal_lm_config, load_causal_lm, save_checkpoint
from xopd_core.models.prompts import text_prompt_ids
from xopd_core.models.tokenizer import CHAT_TEMPLATE, IM_END, PAD, load_tokenizer, token_id

# A teacher whose template differs from the student's: a fixed system turn first, as Qwen2.5
# and Qwen2.5-Omni templates add one.
SYSTEM = "you are a careful reasoner."
TEACHER_TEMPLATE = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" + CHAT_TEMPLATE


def tiny_lm_config(tok, rows: int | None = None) -> dict:
    """A two-layer LM's config over `tok` (`rows` embedding rows: default one per token)."""
    return dict(
        vocab_size=rows or len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=2048,
        pad_token_id=token_id(tok, PAD),
        eos_token_id=token_id(tok, IM_END),
        bos_token_id=None,
    )


def tiny_teacher_of(family: str, tok, seed: int = 3) -> torch.nn.Module:
    """A random tiny Qwen3 (dense) or Qwen3-MoE causal LM over `tok`'s vocabulary."""
    common = tiny_lm_config(tok)
    torch.manual_seed(seed)
    if family == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(**common)).eval()
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, **moe)).eval()


def save_teacher(model: torch.nn.Module, tok, out: Path) -> Path:
    teacher_tok = load_tokenizer_copy(tok, out.with_name(out.name + ".tok"))
    teacher_tok.chat_template = TEACHER_TEMPLATE
    save_checkpoint(model, out, savers=[teacher_tok], resolved_config={})
    return out


def load_tokenizer_copy(tok, where: Path):
    tok.save_pretrained(str(where))
    return load_tokenizer(where)


@pytest.mark.parametrize(
    ("family", "cls"), [("qwen3", Qwen3ForCausalLM), ("qwen3_moe", Qwen3MoeForCausalLM)]
)
def test_a_teacher_of_another_family_scores_after_its_own_template(
    parts, prompts: list[Prompt], tmp_path: Path, family: str, cls: type
) -> None:
    """The teacher folder loads as its own class; its tokenizer renders the transcript with
    the teacher's template (here a system turn the student's lacks), and its log-probs of the
    student's response ids equal a lone pass over that prompt + the response."""
    tok, _, student_model, processor = parts
    folder = save_teacher(tiny_teacher_of(family, tok), tok, tmp_path / family)
    model = load_causal_lm(folder)
    assert isinstance(model, cls)
    teacher_tok = load_tokenizer(folder)
    vocab = shared_vocab_size(tok, teacher_tok)  # same tokens, another template: agrees
    student = HfStudent(student_model.eval(), processor, batch_size=3)
    chosen = prompts[:4]
    rollouts = student.sample(chosen, "speech", n=1, temperature=1.0, max_new_tokens=8, seed=1)
    transcripts = [p.transcript for p in chosen]
    scores = HfTeacher(model, teacher_tok, vocab).score(rollouts, transcripts, mode="full")
    for r, s, text in zip(rollouts, scores, transcripts, strict=True):
        prompt = text_prompt_ids(teacher_tok, text)
        assert prompt != text_prompt_ids(tok, text)
        assert SYSTEM in teacher_tok.decode(prompt)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + r.response_ids])).logits[0]
        lone = torch.log_softmax(logits[response_positions(len(prompt), len(r.response_ids))], -1)
        expected = lone[torch.arange(len(r.response_ids)), r.response_ids]
        assert torch.allclose(torch.tensor(s.sampled), expected, atol=1e-5)


def test_a_folder_that_is_no_text_causal_lm_is_refused_naming_its_config(
    parts, tmp_path: Path
) -> None:
    _, _, student_model, processor = parts
    folder = tmp_path / "speech"
    save_checkpoint(student_model, folder, savers=[processor], resolved_config={})
    with pytest.raises(
        CheckpointError,
        match=r"speech/config\.json: Qwen2AudioForConditionalGeneration is not a text causal LM",
    ):
        causal_lm_config(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/model\.safetensors: no safetensors weights"):
        load_causal_lm(tmp_path / "empty")
