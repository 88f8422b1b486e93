from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from safetensors import safe_open
from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from tests.xopd_core.conftest import TINY_AUDIO, speech_inputs
from xopd_core.config import AudioEncoderShape
from xopd_core.data.manifest import manifest_path, read_manifest
from xopd_core.models.checkpoint import WEIGHTS, save_checkpoint
from xopd_core.models.prompts import speech_prompt_ids, text_prompt_ids
from xopd_core.models.student import audio_tokens_for, build_processor, build_student
from xopd_core.models.tokenizer import AUDIO, load_tokenizer, token_id


def test_student_language_model_starts_as_the_teacher(parts) -> None:
    tok, teacher, student, _ = parts
    ids = torch.tensor([tok("alice lies. does alice tell the truth?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, teacher(input_ids=ids).logits)
    assert student.config.audio_token_index == token_id(tok, AUDIO)


@pytest.mark.parametrize(("hop", "per_second"), [(160, 25), (320, 12.5)])
def test_processor_expands_an_utterance_to_its_audio_positions_in_3000_frames(
    parts, tiny_world: Path, hop: int, per_second: float
) -> None:
    """25 placeholders per second of speech at Whisper's hop (160), 12.5 at 320; the window
    vLLM requires (3,000 frames: 30 s, 60 s) either way, and the encoder's output fills them."""
    tok, teacher, _, _ = parts
    shape = TINY_AUDIO.model_copy(
        update={"hop_length": hop, "chunk_length_s": 3000 * hop // 16_000}
    )
    processor = build_processor(tok, shape)
    row = read_manifest(manifest_path(tiny_world, "eval"))[0]
    inputs = speech_inputs(processor, tiny_world, row)
    n_audio = int((inputs["input_ids"] == token_id(tok, AUDIO)).sum())
    n_samples = sf.info(str(tiny_world / row["audio_path"])).frames
    assert n_audio == audio_tokens_for(n_samples, hop)
    assert abs(n_audio / row["duration_s"] - per_second) < 1
    assert inputs["input_features"].shape[-1] == 3000
    with torch.no_grad():
        out = build_student(teacher, tok, shape, seed=2)(**inputs)
    assert out.logits.shape[1] == inputs["input_ids"].shape[1]


def test_a_window_over_3000_frames_is_refused() -> None:
    with pytest.raises(ValueError, match="6000 mel frames"):
        AudioEncoderShape(hop_length=160, chunk_length_s=60)


def test_saved_student_reloads_with_identical_outputs(
    parts, tiny_world: Path, tmp_path: Path
) -> None:
    _, _, student, processor = parts
    save_checkpoint(student, tmp_path, savers=[processor], resolved_config={"stage": "test"})
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        keys = list(f.keys())
    # vLLM 0.31 loads `language_model.model.*`, not transformers 5.17's doubled prefix.
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert not any(k.startswith("language_model.model.model.") for k in keys)

    reloaded = Qwen2AudioForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    reprocessor = AutoProcessor.from_pretrained(str(tmp_path))
    load_tokenizer(tmp_path)  # same ids through AutoTokenizer
    row = read_manifest(manifest_path(tiny_world, "para_eval"))[0]
    before = speech_inputs(processor, tiny_world, row)
    after = speech_inputs(reprocessor, tiny_world, row)
    assert torch.equal(before["input_ids"], after["input_ids"])
    with torch.no_grad():
        a = student(**before).logits
        b = reloaded(**after).logits
    assert torch.equal(a, b)


def _hf_logprobs(model, inputs: dict[str, torch.Tensor], new: list[int]) -> list[float]:
    """Teacher-forced log-probs of `new` after the prompt in `inputs`."""
    ids = torch.cat([inputs["input_ids"], torch.tensor([new])], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
    logp = torch.log_softmax(logits[0, -len(new) - 1 : -1].float(), dim=-1)
    return logp.gather(-1, torch.tensor(new)[:, None]).squeeze(-1).tolist()


# Its own vLLM engine (~80 s on 2 cores); the HF/vLLM agreement on speech prompts is also in
# CI through the engines (tests/xopd_core/engines/test_vllm.py). Here: vLLM's own prompt path.
@pytest.mark.slow
@pytest.mark.parametrize("hop", [160, 320])
def test_vllm_serves_the_saved_student_like_transformers(
    parts, tiny_world: Path, tmp_path: Path, hop: int
) -> None:
    tok, teacher, student, processor = parts
    if hop != 160:
        shape = TINY_AUDIO.model_copy(
            update={"hop_length": hop, "chunk_length_s": 3000 * hop // 16_000}
        )
        student, processor = build_student(teacher, tok, shape, seed=2), build_processor(tok, shape)
    folder = tmp_path / "student"
    save_checkpoint(student, folder, savers=[processor], resolved_config={"stage": "test"})
    row = read_manifest(manifest_path(tiny_world, "eval"))[1]
    audio_prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "audio"}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    text_prompt = tok.apply_chat_template(
        [{"role": "user", "content": row["transcript"]}], add_generation_prompt=True, tokenize=False
    )
    spec = {
        "max_tokens": 6,
        "requests": [
            {"prompt": audio_prompt, "audio": str(tiny_world / row["audio_path"])},
            {"prompt": text_prompt, "audio": None},
        ],
    }
    (tmp_path / "requests.json").write_text(json.dumps(spec))
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).parents[2] / "vllm_greedy.py"),
            str(folder),
            str(tmp_path / "requests.json"),
        ],
        capture_output=True,
        text=True,
        timeout=420,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, proc.stderr[-3000:]
    vllm_audio, vllm_text = json.loads(lines[0].removeprefix("RESULT "))["outputs"]

    audio, rate = sf.read(str(tiny_world / row["audio_path"]), dtype="float32")
    hf_audio = processor(text=audio_prompt, audio=[audio], sampling_rate=rate, return_tensors="pt")
    hf_text = {"input_ids": torch.tensor([tok(text_prompt)["input_ids"]])}
    # A random model samples nearly uniformly, so compare log-probs, not just tokens
    # (DESIGN.md §4: HF and vLLM agree to ~1e-6 in float32 with enforce_eager).
    for out, inputs in ((vllm_audio, hf_audio), (vllm_text, hf_text)):
        hf = _hf_logprobs(student, inputs, out["token_ids"])
        assert max(abs(a - b) for a, b in zip(hf, out["logprobs"], strict=True)) < 1e-4


# Written here to render as Qwen2-Audio-7B-Instruct's template does: a default system turn
# when the conversation has none, and each audio part as "Audio k: " + its markers + newline.
INSTRUCT_STYLE_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("instruction", [None, "transcribe the audio."])
def test_prompts_follow_the_students_own_template_as_its_processor_does(
    parts, tiny_world: Path, instruction: str | None
) -> None:
    """With a template laid out as Qwen2-Audio-Instruct's (system turn, "Audio 1: " before
    the markers), xopd's speech and text prompts are what the processor and the template
    give: the placeholder expanded in place, the rest untouched."""
    tok, _, student, _ = parts
    tok = copy.deepcopy(tok)
    tok.chat_template = INSTRUCT_STYLE_TEMPLATE
    processor = build_processor(tok, TINY_AUDIO)
    row = read_manifest(manifest_path(tiny_world, "eval"))[0]
    audio, rate = sf.read(str(tiny_world / row["audio_path"]), dtype="float32")
    content: list[dict] = [{"type": "audio"}]
    if instruction is not None:
        content.append({"type": "text", "text": instruction})
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n" in text
    inputs = processor(text=text, audio=[audio], sampling_rate=rate, return_tensors="pt")
    n_audio = int((inputs["input_ids"] == token_id(tok, AUDIO)).sum())
    assert n_audio == audio_tokens_for(len(audio), TINY_AUDIO.hop_length)
    ids = speech_prompt_ids(tok, n_audio, instruction)
    assert inputs["input_ids"][0].tolist() == ids
    assert tok.decode(ids[:8]).startswith("<|im_start|>system")
    assert (
        text_prompt_ids(tok, row["transcript"])
        == tok(
            tok.apply_chat_template(
                [{"role": "user", "content": row["transcript"]}],
                add_generation_prompt=True,
                tokenize=False,
            ),
            add_special_tokens=False,
        )["input_ids"]
    )
    with torch.no_grad():
        assert torch.isfinite(student(**inputs).logits).all()
