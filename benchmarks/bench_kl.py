"""Peak memory of the full-vocabulary reverse KL, chunked (`losses.reverse_kl_full`) against
the naive formula, forward + backward at a real vocabulary (152,064) and T = 2048 positions.

Each variant runs in a fresh process on identical bf16 logits; memory is that process's peak
resident set above what it held once the inputs existed (Linux `VmHWM`, reset through
/proc/self/clear_refs), with glibc's mmap threshold fixed so freed tensors leave. Inputs are
built chunk by chunk so building them sets no peak.
Usage of one variant: python -m benchmarks.bench_kl naive|chunked [T] [V].

`python -m benchmarks.bench_kl --device cuda` measures the same on the first GPU, in one
process: peak bytes allocated by PyTorch's CUDA allocator above the inputs (exact, so no
subprocesses), and seconds with the GPU synchronised, best of three.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from xopd_core.losses import reverse_kl_full

T, V = 2048, 152_064
TARGET = 0.25


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _logits(t: int, v: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(t, v, dtype=torch.bfloat16)
    for i in range(0, t, 64):
        out[i : i + 64] = (torch.randn(min(64, t - i), v, generator=g) * 3).bfloat16()
    return out


def naive_reverse_kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ls, lt = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
    return (ls.exp() * (ls - lt)).sum(-1)


def measure(variant: str, t: int, v: int) -> dict[str, Any]:
    student = _logits(t, v, 0).requires_grad_(True)
    teacher = _logits(t, v, 1)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    kl = _forward_backward(variant, student, teacher)
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM")
    return _result(variant, student, kl, (peak - base) * 1024, round(seconds, 2))


def _forward_backward(variant: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if variant == "naive":
        kl = naive_reverse_kl(student, teacher)
    else:
        kl = reverse_kl_full(student[None], teacher[None])[0]
    kl.mean().backward()
    return kl


def _result(
    variant: str, student: torch.Tensor, kl: torch.Tensor, peak_bytes: int, seconds: float
) -> dict[str, Any]:
    assert student.grad is not None
    return {
        "variant": variant,
        "inputs_mib": round(2 * student.numel() * 2 / 2**20),
        "peak_above_inputs_mib": round(peak_bytes / 2**20),
        "seconds": seconds,
        "kl_mean": float(kl.detach().mean()),
        "grad_abs_sum": float(student.grad.float().abs().sum()),
    }


def measure_cuda(variant: str, t: int, v: int) -> dict[str, Any]:
    student = _logits(t, v, 0).cuda().requires_grad_(True)
    teacher = _logits(t, v, 1).cuda()
    best, peak = float("inf"), 0
    for _ in range(3):
        student.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        kl = _forward_backward(variant, student, teacher)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
        peak = max(peak, torch.cuda.max_memory_allocated() - base)
    return _result(variant, student, kl, peak, round(best, 4))


def run_cuda(t: int = T, v: int = V) -> dict[str, Any]:
    results = {variant: measure_cuda(variant, t, v) for variant in ("naive", "chunked")}
    return _summary(results, t, v) | {"device": torch.cuda.get_device_name()}


def run(t: int = T, v: int = V) -> dict[str, Any]:
    results = {}
    for variant in ("naive", "chunked"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_kl", variant, str(t), str(v)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
            # Fixed mmap threshold: big tensors are mapped and unmapped on free, so the peak
            # is the live tensors' (glibc's adaptive threshold otherwise keeps freed chunk
            # temporaries resident, adding a few hundred MiB of noise run to run).
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
        )
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    return _summary(results, t, v)


def _summary(results: dict[str, dict[str, Any]], t: int, v: int) -> dict[str, Any]:
    naive, chunked = results["naive"], results["chunked"]
    inputs = naive["inputs_mib"]
    extra_ratio = chunked["peak_above_inputs_mib"] / naive["peak_above_inputs_mib"]
    total_ratio = (inputs + chunked["peak_above_inputs_mib"]) / (
        inputs + naive["peak_above_inputs_mib"]
    )
    return {
        "T": t,
        "V": v,
        "naive": naive,
        "chunked": chunked,
        "same_value": abs(naive["kl_mean"] - chunked["kl_mean"]) < 1e-4 * abs(naive["kl_mean"]),
        "memory_ratio_above_inputs": round(extra_ratio, 3),
        "memory_ratio_with_inputs": round(total_ratio, 3),
        "time_ratio": round(chunked["seconds"] / naive["seconds"], 2),
        "targets": [
            {
                "what": f"chunked peak memory ≤ {TARGET}x naive (above the bf16 inputs)",
                "met": extra_ratio <= TARGET,
            }
        ],
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("naive", "chunked"):
        t = int(sys.argv[2]) if len(sys.argv) > 2 else T
        v = int(sys.argv[3]) if len(sys.argv) > 3 else V
        torch.set_num_threads(max(1, torch.get_num_threads()))
        print(json.dumps(measure(sys.argv[1], t, v)))
    elif sys.argv[1:3] == ["--device", "cuda"]:
        print(json.dumps(run_cuda(*(int(a) for a in sys.argv[3:5])), indent=2))
    else:
        print(json.dumps(run(), indent=2))
