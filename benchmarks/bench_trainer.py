"""On-policy distillation train-step throughput: our loop (`train.distill`) against TRL's
`DistillationTrainer` (a dev-only peer) on the same tiny text model, prompts and budget.

Both: a Qwen2 text model at `BENCH_SHAPE` (the teacher's shape until 2026-11-30: 4 layers,
128 wide, MLP 512; random init, built here), a student = the teacher + small noise (so the
loss is not 0), float32 on CPU, 8 prompts × 4 sampled
completions per step, at most 64 new tokens, temperature 1, lr 1e-4, fully on-policy, one
optimizer step per batch. TRL has no "completions per prompt" for this trainer: each prompt
is repeated 4 times in its (unshuffled) batch of 32. TRL's loss is full-vocabulary reverse KL
(β = 1); ours runs its default sampled-token objective and `loss: full` with HF engines, and
the sampled objective with vLLM engines (student rollouts from the round's starting weights,
teacher `prompt_logprobs`; engine start-up reported apart, once per round). Steady state: the
first step of each run is not timed; a run's step time is the median of the other 11. Runs
are back to back in one process.

TRL's models run on transformers' stock `sdpa` attention, as a TRL user's would; ours (and a
second TRL run, for comparison) on `xopd_sdpa` (models/attention.py), which `build_teacher`
now sets.

`python -m benchmarks.bench_trainer --device cuda` runs the HF variants and TRL on the first
GPU (float32 both, TF32 off), at `BENCH_SHAPE` and at a Qwen2-0.5B-sized one (24 layers,
hidden 896, MLP 4864, 14/2 heads) whose vocabulary is padded with plain word tokens to
Qwen2's 151,936 entries, where the loss over the vocabulary starts to count.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from xopd_core.config import Difficulty, LMShape, TrainParams
from xopd_core.data.reasoning import make_boolean, make_counting, make_navigate, make_web_of_lies
from xopd_core.engines.base import Prompt
from xopd_core.engines.hf import HfStudent, HfTeacher
from xopd_core.engines.scoring import shared_vocab_size
from xopd_core.engines.vllm_engine import VllmEngine
from xopd_core.models.attention import NAME
from xopd_core.models.build import build_teacher
from xopd_core.models.checkpoint import save_checkpoint
from xopd_core.models.tokenizer import train_tokenizer
from xopd_core.train.distill import train

STEPS = 12
PROMPTS, GENERATIONS, NEW_TOKENS, LR = 8, 4, 64, 1e-4
TARGET = 2.0


def _median_step(stamps: list[float]) -> float:
    """The median time between consecutive step ends (the first step, with its warm-up, is
    not timed): one slow step of a noisy machine does not move it, as it moves a mean."""
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    return gaps[len(gaps) // 2]


def _world(n: int = 64) -> tuple[list[Prompt], list[str]]:
    rng = random.Random(0)
    makers = (make_navigate, make_counting, make_web_of_lies, make_boolean)
    items = [makers[i % 4](rng, Difficulty()) for i in range(n)]
    prompts = [
        Prompt(f"p{i}", it.prompt, Path("/nonexistent"), it.task) for i, it in enumerate(items)
    ]
    return prompts, [t for it in items for t in (it.prompt, it.solution)]


# The shape every recorded ratio was measured at: the teacher's until its MLP went from 512 to
# 256 wide (2026-11-30), kept so results compare across sessions.
BENCH_SHAPE = LMShape(intermediate_size=512)
QWEN2_05B = LMShape(
    hidden_size=896,
    num_layers=24,
    num_heads=14,
    num_kv_heads=2,
    intermediate_size=4864,
    max_positions=4096,
)
QWEN2_VOCAB = 151_936


def _models(
    shape: LMShape | None = None, vocab: int = 0, device: str = "cpu"
) -> tuple[Any, Any, Any]:
    """Tokenizer, teacher, student (= teacher + noise). `vocab` > the mini world's pads the
    tokenizer with word tokens `zq<i>` (real entries: sampled ones decode)."""
    _, texts = _world()
    tok = train_tokenizer(texts)
    if vocab > len(tok):
        tok.add_tokens([f"zq{i}" for i in range(vocab - len(tok))])
    with torch.device(device):  # built where it runs: a 0.5B init is slow on the CPU
        teacher = build_teacher(shape or BENCH_SHAPE, tok, seed=0).eval()
    student = copy.deepcopy(teacher)
    g = torch.Generator(device).manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g, device=device))
    return tok, teacher, student


def ours(
    loss: str,
    engine: str = "hf",
    *,
    device: str = "cpu",
    shape: LMShape | None = None,
    vocab: int = 0,
) -> dict[str, Any]:
    prompts, _ = _world()
    tok, teacher, student = _models(shape, vocab, device)
    stamps: list[float] = []
    shared = shared_vocab_size(tok, tok)
    cfg = TrainParams(
        lmbda=1.0,  # in-modal only: a text student, as TRL's
        steps=STEPS,
        prompts_per_step=PROMPTS,
        rollouts_per_prompt=GENERATIONS,
        max_new_tokens=NEW_TOKENS,
        lr=LR,
        loss=loss,  # type: ignore[arg-type]
        micro_batch_size=PROMPTS * GENERATIONS,
        anchor_items=0,  # TRL has none: the same objective on both sides
    )
    s = HfStudent(student, tok, batch_size=PROMPTS)
    with tempfile.TemporaryDirectory() as tmp:
        rollout: Any = s
        scorer: Any = HfTeacher(teacher, tok, shared, batch_size=PROMPTS * GENERATIONS)
        start = time.perf_counter()
        if engine == "vllm":
            # The round's rollouts come from the weights it started with (reloaded between
            # rounds); π_θ/π_old corrects for the steps taken since.
            for name, model in (("student", student), ("teacher", teacher)):
                save_checkpoint(model, Path(tmp) / name, savers=[tok], resolved_config={})
            rollout = VllmEngine(Path(tmp) / "student", audio=False)
            scorer = VllmEngine(Path(tmp) / "teacher", audio=False)
        startup = time.perf_counter() - start
        try:
            result = train(
                s,
                rollout,
                scorer,
                prompts,
                cfg,
                vocab_size=shared,
                on_step=lambda step, m: stamps.append(time.perf_counter()),
            )
        finally:
            for e in (rollout, scorer):
                if isinstance(e, VllmEngine):
                    e.close()
    steady = _median_step(stamps)
    return {
        "engine": engine,
        "loss": loss,
        "seconds_per_step": round(steady, 3),
        "engine_start_seconds": round(startup, 1),
        "tokens_per_step": result.student_tokens / STEPS,
        "first_loss": round(result.history[0]["loss"], 4),
    }


def trl(
    attention: str = "sdpa",
    *,
    device: str = "cpu",
    shape: LMShape | None = None,
    vocab: int = 0,
) -> dict[str, Any]:
    """TRL's step time with the models on `attention`: transformers' stock `sdpa` (what a TRL
    user runs: the reference of the target) or our `xopd_sdpa` (shown for comparison)."""
    import pyarrow
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from transformers import TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    prompts, _ = _world()
    tok, teacher, student = _models(shape, vocab, device)
    for model in (teacher, student):
        model.set_attn_implementation(attention)
    rows = []
    for start in range(0, STEPS * PROMPTS, PROMPTS):
        for i in range(start, start + PROMPTS):
            rows += [
                [{"role": "user", "content": prompts[i % len(prompts)].transcript}]
            ] * GENERATIONS
    stamps: list[float] = []

    class Stamp(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        args = DistillationConfig(
            output_dir=out,
            per_device_train_batch_size=PROMPTS * GENERATIONS,
            max_steps=STEPS,
            learning_rate=LR,
            lr_scheduler_type="constant",
            beta=1.0,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_completion_length=NEW_TOKENS,
            use_vllm=False,
            shuffle_dataset=False,
            bf16=False,
            gradient_checkpointing=False,
            use_cpu=device == "cpu",
            save_strategy="no",
            report_to="none",
            logging_steps=1,
            disable_tqdm=True,
            seed=0,
        )
        tok.padding_side = "left"
        trainer = DistillationTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            # An explicit fingerprint: `datasets` would otherwise hash the table by pickling
            # it, which failed on the GPU machine's Python 3.12 + pyarrow 26 (MonthDayNano).
            train_dataset=Dataset(
                InMemoryTable(pyarrow.table({"prompt": rows})), fingerprint="xopd-bench"
            ),
            processing_class=tok,
            callbacks=[Stamp()],
        )
        with contextlib.redirect_stdout(sys.stderr):  # its log lines; stdout is the JSON
            trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "attention": attention,
        "seconds_per_step": round(_median_step(stamps), 3),
        "first_loss": round(losses[0], 4) if losses else None,
    }


def run() -> dict[str, Any]:
    torch.manual_seed(0)
    reference = trl()
    with_ours = trl(NAME)
    variants = [ours("sampled"), ours("full"), ours("sampled", "vllm")]

    def speedups(peer: dict[str, Any]) -> dict[str, float]:
        return {
            f"{v['engine']}_{v['loss']}": round(peer["seconds_per_step"] / v["seconds_per_step"], 2)
            for v in variants
        }

    best = max(speedups(reference).values())
    return {
        "threads": torch.get_num_threads(),
        "steps_timed": STEPS - 1,
        "trl_distillation_trainer": reference,
        "trl_distillation_trainer_on_xopd_sdpa": with_ours,
        "xopd": variants,
        "speedup_vs_trl": speedups(reference),
        "speedup_vs_trl_on_xopd_sdpa": speedups(with_ours),
        "targets": [
            {
                "what": f"X-OPD step ≥ {TARGET}x TRL DistillationTrainer's (best variant)",
                "met": best >= TARGET,
            }
        ],
    }


def run_cuda() -> dict[str, Any]:
    """The HF variants against TRL on the first GPU, at `BENCH_SHAPE` and at
    `QWEN2_05B` with Qwen2's vocabulary size."""
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as on the CPU, for both
    torch.backends.cudnn.allow_tf32 = False
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(), "steps_timed": STEPS - 1}
    for name, shape, vocab in (("default", None, 0), ("qwen2_0.5b", QWEN2_05B, QWEN2_VOCAB)):
        torch.manual_seed(0)
        peer = trl(device="cuda", shape=shape, vocab=vocab)
        variants = [
            ours(loss, device="cuda", shape=shape, vocab=vocab) for loss in ("sampled", "full")
        ]
        out[name] = {
            "vocab": vocab or "mini world",
            "trl_distillation_trainer": peer,
            "xopd": variants,
            "speedup_vs_trl": {
                f"hf_{v['loss']}": round(peer["seconds_per_step"] / v["seconds_per_step"], 2)
                for v in variants
            },
        }
        torch.cuda.empty_cache()
    return out


if __name__ == "__main__":
    import json

    if sys.argv[1:] == ["--device", "cuda"]:
        print(json.dumps(run_cuda(), indent=2))
    else:
        print(json.dumps(run(), indent=2))
