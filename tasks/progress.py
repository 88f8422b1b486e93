"""Progress bars for the stage commands (`xopd stage NAME` on a terminal; silent in logs)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from xopd_core.config import Params


def utterance_bar(desc: str) -> Callable[[int, int], None]:
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            # disable=None: a bar on a terminal, silence in logs and CI.
            bar = tqdm(
                total=total, desc=desc, unit="utt", file=sys.stderr, leave=False, disable=None
            )
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update


def step_bar(desc: str, total: int) -> Callable[[int, float], None]:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False, disable=None)

    def update(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        if step + 1 == total:
            bar.close()

    return update


def phase_bar(params: Params) -> Callable[[str, int, float], None]:
    """One step bar per bootstrap phase of the student stage."""
    bars: dict[str, Callable[[int, float], None]] = {}

    def update(phase: str, step: int, loss: float) -> None:
        if phase not in bars:
            bars[phase] = step_bar(f"student {phase}", getattr(params.student, phase).steps)
        bars[phase](step, loss)

    return update
