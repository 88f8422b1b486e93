from __future__ import annotations

import itertools
import random
import re

import pytest

from tests.solvers import SOLVERS
from xopd_core.config import Difficulty, IntRange
from xopd_core.data.reasoning import CATEGORY_OF, NUMBER_WORDS, REASONING_TASKS, number_word

HARD = Difficulty(
    navigate_moves=IntRange(min=2, max=6),
    navigate_max_step=3,
    counting_items=IntRange(min=2, max=6),
    counting_max_per_item=3,
    lies_people=IntRange(min=2, max=8),
    boolean_operands=IntRange(min=2, max=6),
)


@pytest.mark.parametrize("task", sorted(REASONING_TASKS))
@pytest.mark.parametrize("difficulty", [Difficulty(), HARD], ids=["default", "hard"])
def test_independent_solver_agrees_with_every_stored_answer(
    task: str, difficulty: Difficulty
) -> None:
    rng = random.Random(f"solver-check:{task}")
    for _ in range(400):
        item = REASONING_TASKS[task](rng, difficulty)
        assert item.task == task
        assert SOLVERS[task](item.prompt) == item.answer, item.prompt
        # The worked solution ends with the same answer, stated once, in a fixed form.
        assert item.solution.endswith(f"the answer is {item.answer}.")
        assert item.solution.count("the answer is") == 1


@pytest.mark.parametrize(
    ("task", "answers"),
    [
        ("navigate", {"yes", "no"}),
        ("web_of_lies", {"yes", "no"}),
        ("boolean_expressions", {"true", "false"}),
    ],
)
def test_binary_tasks_are_roughly_balanced(task: str, answers: set[str]) -> None:
    rng = random.Random(f"balance:{task}")
    got = [REASONING_TASKS[task](rng, Difficulty()).answer for _ in range(1000)]
    assert set(got) == answers
    share = got.count(sorted(answers)[0]) / len(got)
    assert 0.35 <= share <= 0.65, share


def test_difficulty_controls_the_number_of_reasoning_steps() -> None:
    rng = random.Random(0)
    d = Difficulty(
        navigate_moves=IntRange(min=4, max=4),
        lies_people=IntRange(min=6, max=6),
        boolean_operands=IntRange(min=5, max=5),
        counting_items=IntRange(min=6, max=6),
    )
    nav = REASONING_TASKS["navigate"](rng, d)
    assert len(re.findall(r"take \w+ steps? ", nav.prompt)) == 4
    lies = REASONING_TASKS["web_of_lies"](rng, d)
    assert lies.prompt.count(" says ") == 5
    boolean = REASONING_TASKS["boolean_expressions"](rng, d)
    assert len(re.findall(r"\b(true|false)\b", boolean.prompt.split(".")[0])) == 5
    counting = REASONING_TASKS["object_counting"](rng, d)
    assert counting.prompt.count(",") == 5  # six kinds listed


def test_counting_solution_adds_up_only_the_asked_category() -> None:
    rng = random.Random(3)
    for _ in range(50):
        item = REASONING_TASKS["object_counting"](rng, Difficulty())
        totals = re.findall(r", \w+ plus \w+ is (\w+)\.", item.solution)
        assert totals and totals[-1] == item.answer


def test_number_words_cover_the_mini_world_range_only() -> None:
    assert number_word(0) == "zero" and number_word(20) == "twenty"
    assert number_word(-3) == "minus three"
    with pytest.raises(ValueError, match="outside the mini world's vocabulary"):
        number_word(21)


def test_navigate_solution_tracks_each_axis_with_local_sums() -> None:
    rng = random.Random(5)
    words = {w: i for i, w in enumerate(NUMBER_WORDS)}

    def value(text: str) -> int:
        parts = text.split()
        return -words[parts[1]] if parts[0] == "minus" else words[parts[0]]

    for _ in range(100):
        item = REASONING_TASKS["navigate"](rng, Difficulty())
        for before, op, k, after in re.findall(
            r"[xy] ((?:minus )?\w+) (plus|minus) (\w+) is ((?:minus )?\w+), now", item.solution
        ):
            sign = 1 if op == "plus" else -1
            assert value(before + " _") + sign * words[k] == value(after + " _")
        ends = re.findall(r"now x ((?:minus )?\w+), y ((?:minus )?\w+)\.", item.solution)
        assert ends
        returned = ends[-1] == ("zero", "zero")
        assert returned == (item.answer == "yes")


def test_boolean_solution_first_resolves_every_not() -> None:
    rng = random.Random(9)
    for _ in range(100):
        item = REASONING_TASKS["boolean_expressions"](rng, Difficulty())
        expr = item.prompt.split(".")[0].split()
        restated = re.match(r"that is ([a-z ]+)\.", item.solution)
        assert restated is not None
        words = restated.group(1).split()
        assert "not" not in words
        # Same operators in the same places, one truth value per operand.
        assert [w for w in words if w in ("and", "or")] == [w for w in expr if w in ("and", "or")]
        assert len(words) == len([w for w in expr if w != "not"])


def test_counting_steps_quote_the_list_from_where_the_last_step_left_off() -> None:
    rng = random.Random(4)
    for _ in range(50):
        item = REASONING_TASKS["object_counting"](rng, Difficulty())
        listed = item.prompt.split(". how many")[0]  # "i have a plum, two dogs, and a cat"
        steps = item.solution.split(". ")[1:-1]  # between "count the …" and the answer
        quotes = [s.split(":")[0] for s in steps]
        assert len(quotes) == listed.count(",") + 1  # one step per listed item
        assert listed.startswith(quotes[0]) and quotes[0].startswith("i have ")
        assert listed.endswith(quotes[-1])
        for before, quote in itertools.pairwise(quotes):
            assert quote in listed  # the prompt's own words
            anchor = quote.split(",")[0]  # the previous item's noun
            assert anchor in CATEGORY_OF
            assert before.endswith(" " + anchor)  # picks up where the last quote ended
