"""Run every CPU benchmark (or those named: `python -m benchmarks trainer kl`) and write
benchmarks/results/<name>.json. `kl_cuda` and `trainer_cuda` run on the first GPU, when
named."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks import bench_audio, bench_data, bench_kl, bench_ranks, bench_trainer
from xopd_core.runtime import apply_offline_env

RESULTS = Path(__file__).parent / "results"


def main() -> int:
    apply_offline_env()
    RESULTS.mkdir(exist_ok=True)
    ok = True
    benches = {
        "data": bench_data.run,
        "audio": bench_audio.run,
        "kl": bench_kl.run,
        "trainer": bench_trainer.run,
        "ranks": bench_ranks.run,
    }
    on_gpu = {"kl_cuda": bench_kl.run_cuda, "trainer_cuda": bench_trainer.run_cuda}
    chosen = sys.argv[1:] or list(benches)
    benches |= on_gpu
    unknown = sorted(set(chosen) - set(benches))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {sorted(benches)}", file=sys.stderr)
        return 2
    for name in chosen:
        result = benches[name]()
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        ok &= all(t["met"] for t in result.get("targets", []))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
