from __future__ import annotations

import pytest

from xopd_core.eval.metrics import avg_drop, extract_answer


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
