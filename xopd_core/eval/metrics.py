"""Scoring helpers that need no model: a strict answer extractor, the paper's Avg-Drop, word
error rate and the exact McNemar test for paired per-item results.

Avg-Drop (X-OPD, arXiv 2603.24596, Tables 1–2): for a model M and an input modality, the
mean over benchmarks b of (teacher_text(b) − M(b)) / teacher_text(b) × 100.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

from xopd_core.data.world import ANSWER_SETS

AnswerSets = Mapping[str, AbstractSet[str]]  # task → its legal answers


class TeacherScoresError(ValueError):
    """The teacher's metrics file lacks a score the Avg-Drop needs (here, not in the eval
    stage's module, so that the CLI can name it without importing torch)."""


_FINAL = re.compile(r"the answer is (\w+)\s*\.\s*$")


def extract_answer(response: str, task: str, answer_sets: AnswerSets = ANSWER_SETS) -> str | None:
    """The final answer of a response, or None when the response is malformed.

    Strict on purpose: the response must end with exactly one "the answer is <word>." whose
    word is a legal answer for the task (`answer_sets`: task → its answers; the mini world's
    by default). Anything else (no final statement, two of them, trailing text, an answer
    outside the task's set) scores as wrong, never as a guess.
    """
    if task not in answer_sets:
        raise KeyError(f"unknown task {task!r}; known: {sorted(answer_sets)}")
    text = " ".join(response.lower().split())
    if text.count("the answer is") != 1:
        return None
    m = _FINAL.search(text)
    if m is None or m.group(1) not in answer_sets[task]:
        return None
    return m.group(1)


def avg_drop(teacher_text: Mapping[str, float], model: Mapping[str, float]) -> float:
    """Mean relative drop (in %) of `model` against the teacher's text scores, over the
    teacher's benchmarks. Both map benchmark → score (accuracy in [0, 1])."""
    if not teacher_text:
        raise ValueError("avg_drop needs at least one benchmark")
    missing = sorted(set(teacher_text) - set(model))
    if missing:
        raise KeyError(f"model has no score for benchmark(s) {missing}")
    drops = []
    for bench, ref in teacher_text.items():
        if ref <= 0:
            raise ValueError(f"teacher text score for {bench!r} is {ref}: the drop is undefined")
        drops.append((ref - model[bench]) / ref * 100.0)
    return sum(drops) / len(drops)


def edit_distance(hyp: Sequence[str], ref: Sequence[str]) -> int:
    """Levenshtein distance between two token sequences (substitutions, insertions and
    deletions each cost 1)."""
    prev = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, 1):
        cur = [i]
        for j, r in enumerate(ref, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (h != r)))
        prev = cur
    return prev[-1]


def word_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus word error rate: total word edits over total reference words (as ASR scoring
    tools report it, not a mean of per-utterance rates). Words are split on whitespace after
    lower-casing, with the final-punctuation-free form of each word ("left." → "left")."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")

    def words(text: str) -> list[str]:
        return [w.strip(".,?!") for w in text.lower().split() if w.strip(".,?!")]

    edits = sum(
        edit_distance(words(h), words(r)) for h, r in zip(hypotheses, references, strict=True)
    )
    total = sum(len(words(r)) for r in references)
    if total == 0:
        raise ValueError("word_error_rate needs at least one reference word")
    return edits / total


def mcnemar_exact_p(wins: int, losses: int) -> float:
    """One-sided exact McNemar p-value that a candidate beats a baseline on paired items:
    `wins` items only the candidate gets right, `losses` items only the baseline gets right.
    Under the null each discordant item is a fair coin, so p = P(X ≥ wins), X ~ Bin(n, ½)
    with n = wins + losses (1.0 when there is no discordant item)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be non-negative, got wins={wins}, losses={losses}")
    n = wins + losses
    # Exact integer sum, then one division: no float underflow for large n.
    tail = sum(math.comb(n, k) for k in range(wins, n + 1))
    return tail / 2**n
