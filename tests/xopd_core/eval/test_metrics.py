from __future__ import annotations

import pytest

from xopd_core.eval.metrics import (
    avg_drop,
    edit_distance,
    extract_answer,
    mcnemar_exact_p,
    word_error_rate,
)


def test_avg_drop_matches_a_hand_computed_example() -> None:
    teacher = {"navigate": 0.80, "object_counting": 0.50, "web_of_lies": 1.00}
    student = {"navigate": 0.60, "object_counting": 0.50, "web_of_lies": 0.70}
    # drops: 25 %, 0 %, 30 %  → mean 55/3
    assert avg_drop(teacher, student) == pytest.approx(55 / 3)
    assert avg_drop(teacher, teacher) == 0.0
    # A model better than the teacher has a negative drop.
    assert avg_drop({"a": 0.5}, {"a": 0.75}) == pytest.approx(-50.0)


def test_avg_drop_rejects_undefined_cases() -> None:
    with pytest.raises(ValueError, match="undefined"):
        avg_drop({"a": 0.0}, {"a": 0.3})
    with pytest.raises(KeyError, match="no score"):
        avg_drop({"a": 0.5, "b": 0.5}, {"a": 0.5})
    with pytest.raises(ValueError, match="at least one"):
        avg_drop({}, {})


@pytest.mark.parametrize(
    ("response", "task", "expected"),
    [
        ("start at x zero , y zero . the answer is yes .", "navigate", "yes"),
        ("the answer is   seven.", "object_counting", "seven"),
        ("The answer is TRUE .", "boolean_expressions", "true"),
        ("the answer is whisper.", "whisper", "whisper"),
    ],
)
def test_extractor_reads_well_formed_answers(response: str, task: str, expected: str) -> None:
    assert extract_answer(response, task) == expected


@pytest.mark.parametrize(
    ("response", "task"),
    [
        ("yes", "navigate"),  # no final statement
        ("the answer is yes. the answer is no.", "navigate"),  # two answers
        ("the answer is yes. because x zero", "navigate"),  # trailing text
        ("the answer is maybe.", "navigate"),  # not a legal answer
        ("the answer is seven.", "navigate"),  # legal elsewhere, not here
        ("the answer is twentyone.", "object_counting"),
        ("the answer is", "navigate"),
        ("", "web_of_lies"),
    ],
)
def test_extractor_rejects_malformed_outputs(response: str, task: str) -> None:
    assert extract_answer(response, task) is None


def test_extractor_refuses_unknown_tasks() -> None:
    with pytest.raises(KeyError, match="unknown task"):
        extract_answer("the answer is yes.", "formal_fallacies")


def test_word_error_rate_matches_a_hand_computed_case() -> None:
    # "two" → "too" is a substitution and "left" is deleted: 2 edits over 4 words; the
    # second pair is exact. Corpus WER = (2 + 0) / (4 + 2); punctuation and case ignored.
    hyps = ["Take too steps", "yes no"]
    refs = ["take two steps left.", "yes no"]
    assert word_error_rate(hyps, refs) == pytest.approx(2 / 6)
    assert word_error_rate(refs, refs) == 0.0
    # An insertion costs one edit, so WER can exceed 1.
    assert word_error_rate(["a b c"], ["a"]) == pytest.approx(2.0)
    assert edit_distance(list("kitten"), list("sitting")) == 3
    with pytest.raises(ValueError, match="references"):
        word_error_rate(["a"], [])
    with pytest.raises(ValueError, match="at least one"):
        word_error_rate([""], [" . "])


@pytest.mark.parametrize(
    ("wins", "losses", "p"),
    [
        (5, 0, 1 / 32),  # five discordant items, all the candidate's: 0.5^5
        (4, 0, 1 / 16),
        (8, 2, (45 + 10 + 1) / 1024),  # P(X ≥ 8), X ~ Bin(10, 1/2)
        (9, 1, 11 / 1024),
        (0, 0, 1.0),  # no discordant item: no evidence at all
        (1, 3, 15 / 16),  # the candidate loses more than it wins: far from significant
    ],
)
def test_mcnemar_exact_p_matches_hand_computed_binomial_tails(
    wins: int, losses: int, p: float
) -> None:
    assert mcnemar_exact_p(wins, losses) == pytest.approx(p)


def test_mcnemar_exact_p_stays_finite_for_large_counts() -> None:
    assert 0.0 < mcnemar_exact_p(600, 500) < 0.002
    with pytest.raises(ValueError, match="non-negative"):
        mcnemar_exact_p(-1, 2)


def test_extractor_reads_your_own_tasks_answer_sets() -> None:
    """`validate.tasks` gives the answer sets of your own tasks."""
    mine = {"parity": frozenset({"even", "odd"})}
    assert extract_answer("seven is odd, so the answer is odd.", "parity", mine) == "odd"
    assert extract_answer("the answer is yes.", "parity", mine) is None  # not a legal answer
    with pytest.raises(KeyError, match=r"unknown task 'navigate'; known: \['parity'\]"):
        extract_answer("the answer is yes.", "navigate", mine)
