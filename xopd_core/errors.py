"""Errors a user can cause or meet by bad luck, in a module that imports nothing heavy, so
that the command line can name them (one line, no traceback) without importing torch."""

from __future__ import annotations

import math


class CheckpointError(ValueError):
    """A checkpoint folder xopd will not load or save; the message names the file."""


class AudioError(ValueError):
    """An utterance a model cannot take as it is (undecodable, another rate or channel count,
    longer than the feature window); the message names the file or manifest row."""


class ResumeStateError(ValueError):
    """A resume state that does not belong to this run; the message names the folder."""


class NonFiniteTrainingError(RuntimeError):
    """A step produced a NaN or an infinity; the message names the step and its source.
    Raised before the optimizer step, so neither the weights nor the resume state see it."""


def require_finite(value: float, step: int, source: str) -> None:
    """Stop a training loop on a NaN or an infinity; `step` is 0-based, the message 1-based."""
    if not math.isfinite(value):
        raise NonFiniteTrainingError(
            f"step {step + 1}: non-finite {source} ({value}); training stopped before the "
            "update, nothing from this step was saved (a NaN in a checkpoint or data?)"
        )
