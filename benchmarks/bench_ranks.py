"""Data parallelism on this machine's cores: the teacher's training step and greedy decoding
with `processes: 2` (two torch.distributed ranks, one thread each) against one process with
all the threads, back to back in this run.

The teacher at its default shape on worked solutions of the four reasoning families, batch
32 in micro-batches of 8 (the teacher stage's settings); a run's step time is the median
step of 30 after one untimed step. Decoding: 400 text prompts, 64 new tokens each, greedy,
from the same model. Target: the ranks are not slower than one process by more than 10 %
(ratio ≤ 1.1; this machine's runs vary by about that much, docs/speed.md, "Processes").

A round's step (`train.distill`, X-OPD on bench_trainer's text student and teacher: 8
prompts × 4 rollouts of up to 64 tokens, micro-batches of 16, median of 11 steps after one)
with `train.processes` 1, 2 under ddp and 2 under fsdp: the same target for ddp; fsdp's
cost over ddp (a layer's weights gathered in each forward and backward, the whole model
published after each step) is reported, with no target: it buys memory, not speed.

`python -m benchmarks.bench_ranks` on another checkout compares its trainer with this one's
(the same public calls: `train_sft`, `greedy_generate`).
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from typing import Any

import torch

from benchmarks import bench_trainer
from xopd_core.config import Difficulty, LMShape, TrainParams
from xopd_core.data.reasoning import make_boolean, make_counting, make_navigate, make_web_of_lies
from xopd_core.engines.greedy import greedy_generate
from xopd_core.engines.hf import HfStudent, HfTeacher
from xopd_core.engines.scoring import shared_vocab_size
from xopd_core.models.build import build_teacher
from xopd_core.models.prompts import text_prompts_ids
from xopd_core.models.tokenizer import IM_END, PAD, token_id, train_tokenizer
from xopd_core.train.distill import train
from xopd_core.train.sft import SftExample, train_sft

STEPS, PROMPTS, NEW_TOKENS = 30, 400, 64


def _examples() -> tuple[Any, list[SftExample]]:
    rng = random.Random(0)
    makers = (make_navigate, make_counting, make_web_of_lies, make_boolean)
    items = [makers[i % 4](rng, Difficulty()) for i in range(512)]
    tokenizer = train_tokenizer(t for it in items for t in (it.prompt, it.solution))
    eos = token_id(tokenizer, IM_END)
    prompts = text_prompts_ids(tokenizer, [it.prompt for it in items])
    solutions = tokenizer([it.solution for it in items])["input_ids"]
    return tokenizer, [SftExample(p, [*s, eos]) for p, s in zip(prompts, solutions, strict=True)]


def _step_ms(tokenizer: Any, examples: list[SftExample], processes: int) -> float:
    model = build_teacher(LMShape(), tokenizer, seed=0)
    stamps: list[float] = []
    train_sft(
        model,
        examples,
        pad_id=token_id(tokenizer, PAD),
        steps=STEPS + 1,
        batch_size=32,
        lr=1e-3,
        warmup=0,
        seed=0,
        micro_batch_size=8,
        processes=processes,
        on_step=lambda step, loss: stamps.append(time.perf_counter()),
    )
    return 1000 * statistics.median(b - a for a, b in itertools.pairwise(stamps))


def _decode_s(tokenizer: Any, examples: list[SftExample], processes: int) -> float:
    model = build_teacher(LMShape(), tokenizer, seed=0)
    start = time.perf_counter()
    greedy_generate(
        model,
        [e.prompt_ids for e in examples[:PROMPTS]],
        pad_id=token_id(tokenizer, PAD),
        eos_id=-1,  # never stops early: every prompt decodes all its tokens
        max_new_tokens=NEW_TOKENS,
        processes=processes,
    )
    return time.perf_counter() - start


def _round_step_s(processes: int, parallel: str) -> float:
    prompts, _ = bench_trainer._world()
    tok, teacher, student = bench_trainer._models()
    cfg = TrainParams(
        lmbda=1.0,  # text prompts: the student is a text model
        steps=12,
        prompts_per_step=8,
        rollouts_per_prompt=4,
        max_new_tokens=64,
        micro_batch_size=16,
        anchor_items=0,
        processes=processes,
        parallel=parallel,  # type: ignore[arg-type]
    )
    stamps: list[float] = []
    s = HfStudent(student, tok, batch_size=8)
    train(
        s,
        s,
        HfTeacher(teacher, tok, shared_vocab_size(tok, tok), batch_size=32),
        prompts,
        cfg,
        vocab_size=shared_vocab_size(tok, tok),
        on_step=lambda step, m: stamps.append(time.perf_counter()),
    )
    return bench_trainer._median_step(stamps)


def run() -> dict[str, Any]:
    one_round = _round_step_s(1, "ddp")
    ddp_round = _round_step_s(2, "ddp")
    fsdp_round = _round_step_s(2, "fsdp")
    round_ratio = ddp_round / one_round
    tokenizer, examples = _examples()
    threads = torch.get_num_threads()
    one_step = _step_ms(tokenizer, examples, 1)
    ranks_step = _step_ms(tokenizer, examples, 2)
    one_decode = _decode_s(tokenizer, examples, 1)
    ranks_decode = _decode_s(tokenizer, examples, 2)
    step_ratio = ranks_step / one_step
    decode_ratio = ranks_decode / one_decode
    return {
        "threads": threads,
        "teacher_step_ms_one_process": round(one_step, 1),
        "teacher_step_ms_two_ranks": round(ranks_step, 1),
        "greedy_s_one_process": round(one_decode, 2),
        "greedy_s_two_ranks": round(ranks_decode, 2),
        "round_step_s_one_process": round(one_round, 3),
        "round_step_s_two_ranks_ddp": round(ddp_round, 3),
        "round_step_s_two_ranks_fsdp": round(fsdp_round, 3),
        "round_step_fsdp_over_ddp": round(fsdp_round / ddp_round, 3),
        "targets": [
            {
                "name": "round step: two ranks (ddp) / one process",
                "value": round(round_ratio, 3),
                "target": "<= 1.1",
                "met": round_ratio <= 1.1,
            },
            {
                "name": "teacher step: two ranks / one process",
                "value": round(step_ratio, 3),
                "target": "<= 1.1",
                "met": step_ratio <= 1.1,
            },
            {
                "name": "greedy decoding: two ranks / one process",
                "value": round(decode_ratio, 3),
                "target": "<= 1.1",
                "met": decode_ratio <= 1.1,
            },
        ],
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
