"""Procedural reasoning items with exact answers and terse worked solutions.

Four families shaped after BIG Bench Audio's tasks (navigate, object counting, web of lies)
plus boolean expressions in place of formal fallacies (which is hard to generate with exact
answers). Text is lower-case from a small closed vocabulary so tiny word-level models can
learn it; numbers are spelled as words because that is what espeak-ng says.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from xopd_core.config import Difficulty

NUMBER_WORDS = (  # noqa: SIM905 (a line of words reads better than 21 quoted ones)
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"
).split()


def number_word(n: int) -> str:
    """0..20 as a word; negatives as 'minus <word>' (navigate coordinates)."""
    if n < 0:
        return "minus " + number_word(-n)
    if n > 20:
        raise ValueError(f"number {n} is outside the mini world's vocabulary (0..20)")
    return NUMBER_WORDS[n]


@dataclass(frozen=True)
class ReasoningItem:
    task: str
    prompt: str
    answer: str
    solution: str  # worked solution ending in "the answer is <answer>."


def _final(answer: str) -> str:
    return f"the answer is {answer}."


# --- navigate ---------------------------------------------------------------------------

_DIRECTIONS = {"forward": (0, 1), "backward": (0, -1), "left": (-1, 0), "right": (1, 0)}
_OPPOSITE = {"forward": "backward", "backward": "forward", "left": "right", "right": "left"}


def steps_phrase(k: int, direction: str) -> str:
    return f"take {number_word(k)} {'step' if k == 1 else 'steps'} {direction}."


def _closing_moves(dx: int, dy: int, max_step: int) -> list[tuple[str, int]] | None:
    """Exactly two moves that cancel (dx, dy), or None when two moves cannot."""
    if dx != 0 and dy != 0:
        if abs(dx) > max_step or abs(dy) > max_step:
            return None
        return [
            ("left" if dx > 0 else "right", abs(dx)),
            ("backward" if dy > 0 else "forward", abs(dy)),
        ]
    d, (neg, pos) = (dx, ("left", "right")) if dx != 0 else (dy, ("backward", "forward"))
    if d == 0:
        return None
    direction = neg if d > 0 else pos
    if not 2 <= abs(d) <= 2 * max_step:
        return None
    first = (abs(d) + 1) // 2
    return [(direction, first), (direction, abs(d) - first)]


def make_navigate(rng: random.Random, diff: Difficulty) -> ReasoningItem:
    n = rng.randint(diff.navigate_moves.min, diff.navigate_moves.max)
    want_return = rng.random() < 0.5
    directions = list(_DIRECTIONS)
    while True:
        if want_return:
            head = [
                (rng.choice(directions), rng.randint(1, diff.navigate_max_step))
                for _ in range(n - 2)
            ]
            dx = sum(_DIRECTIONS[d][0] * k for d, k in head)
            dy = sum(_DIRECTIONS[d][1] * k for d, k in head)
            if dx == 0 and dy == 0:
                d = rng.choice(directions)
                k = rng.randint(1, diff.navigate_max_step)
                tail: list[tuple[str, int]] | None = [(d, k), (_OPPOSITE[d], k)]
            else:
                tail = _closing_moves(dx, dy, diff.navigate_max_step)
            if tail is None:
                continue
            moves = head + tail
            rng.shuffle(moves)
        else:
            moves = [
                (rng.choice(directions), rng.randint(1, diff.navigate_max_step)) for _ in range(n)
            ]
        x = y = 0
        steps = []
        for d, k in moves:
            # Each step puts both operands next to the result and restates the whole
            # position, so every value a step needs stands in the step just before it: a
            # tiny model then copies locally instead of searching the text.
            axis, before = ("x", x) if _DIRECTIONS[d][0] else ("y", y)
            after = before + (_DIRECTIONS[d][0] or _DIRECTIONS[d][1]) * k
            op = "plus" if after > before else "minus"
            x, y = (after, y) if axis == "x" else (x, after)
            steps.append(
                f"{d} {number_word(k)}: {axis} {number_word(before)} {op} {number_word(k)} "
                f"is {number_word(after)}, now x {number_word(x)}, y {number_word(y)}."
            )
        returned = x == 0 and y == 0
        if returned == want_return:
            break
    answer = "yes" if returned else "no"
    prompt = (
        "always face forward. "
        + " ".join(steps_phrase(k, d) for d, k in moves)
        + " do you return to the starting point?"
    )
    solution = " ".join(["start at x zero, y zero.", *steps, _final(answer)])
    return ReasoningItem("navigate", prompt, answer, solution)


# --- object counting --------------------------------------------------------------------

# Consonant-initial nouns only, so "a" never needs to become "an".
OBJECTS: dict[str, list[tuple[str, str]]] = {
    "fruits": [
        ("banana", "bananas"),
        ("peach", "peaches"),
        ("plum", "plums"),
        ("grape", "grapes"),
        ("cherry", "cherries"),
        ("lemon", "lemons"),
    ],
    "animals": [
        ("dog", "dogs"),
        ("cat", "cats"),
        ("goat", "goats"),
        ("pig", "pigs"),
        ("cow", "cows"),
        ("rabbit", "rabbits"),
    ],
    "instruments": [
        ("drum", "drums"),
        ("flute", "flutes"),
        ("piano", "pianos"),
        ("violin", "violins"),
        ("trumpet", "trumpets"),
        ("guitar", "guitars"),
    ],
    "vegetables": [
        ("carrot", "carrots"),
        ("potato", "potatoes"),
        ("cabbage", "cabbages"),
        ("lettuce head", "lettuce heads"),
        ("turnip", "turnips"),
        ("yam", "yams"),
    ],
}
CATEGORY_OF = {noun: cat for cat, nouns in OBJECTS.items() for pair in nouns for noun in pair}


def count_phrase(k: int, singular: str, plural: str) -> str:
    return f"a {singular}" if k == 1 else f"{number_word(k)} {plural}"


def _list_separators(n: int) -> list[str]:
    """What precedes each of `n` listed items: "a, b, and c" (the serial comma, always)."""
    return ["", *[", "] * max(0, n - 2), *([", and "] if n > 1 else [])]


def _join_list(parts: list[str]) -> str:
    return "".join(
        sep + part for sep, part in zip(_list_separators(len(parts)), parts, strict=True)
    )


def make_counting(rng: random.Random, diff: Difficulty) -> ReasoningItem:
    n = rng.randint(diff.counting_items.min, diff.counting_items.max)
    category = rng.choice(sorted(OBJECTS))
    pool = [(cat, s, p) for cat in sorted(OBJECTS) for s, p in OBJECTS[cat]]
    n_target = rng.randint(1, min(n, len(OBJECTS[category])))
    targets = rng.sample([t for t in pool if t[0] == category], n_target)
    others = rng.sample([t for t in pool if t[0] != category], n - n_target)
    kinds = targets + others
    rng.shuffle(kinds)
    counts = [rng.randint(1, diff.counting_max_per_item) for _ in kinds]
    phrases = [count_phrase(k, s, p) for (_, s, p), k in zip(kinds, counts, strict=True)]
    prompt = f"i have {_join_list(phrases)}. how many {category} do i have?"
    # Walk every listed item in prompt order, adding only the asked category's counts. Each
    # step first quotes the list from where the last step left off: the previous item's noun
    # (or "i have") and the separator after it, exactly as the prompt says them. The next
    # item is then a verbatim continuation of a quote (one look-up: find the quoted words in
    # the prompt, read on), not "the item after the one named two steps ago" (two look-ups).
    # With plain "<item>: <category>." steps the default teacher was still at 0.55-0.79 on
    # counting between steps 1000 and 2000, with every error a wrong item copied.
    total = 0
    steps = []
    anchor = "i have "
    separators = _list_separators(len(kinds))
    for i, ((cat, _, _), k) in enumerate(zip(kinds, counts, strict=True)):
        # Name the item's own category first: membership is then one memorised fact
        # (noun → category) and one comparison with the category asked for.
        phrase = f"{anchor}{separators[i]}{phrases[i]}: {cat}"
        if cat == category:
            steps.append(
                f"{phrase}, {number_word(total)} plus {number_word(k)} is {number_word(total + k)}."
            )
            total += k
        else:
            steps.append(f"{phrase}.")
        anchor = phrases[i].split(" ", 1)[1]  # the item's noun as listed ("a plum" → "plum")
    answer = number_word(total)
    solution = " ".join([f"count the {category}.", *steps, _final(answer)])
    return ReasoningItem("object_counting", prompt, answer, solution)


# --- web of lies ------------------------------------------------------------------------

NAMES = ["alice", "bob", "carol", "dave", "emma", "frank", "grace", "henry", "ivy", "jack"]


def truth_word(truthful: bool) -> str:
    return "tells the truth" if truthful else "lies"


def make_web_of_lies(rng: random.Random, diff: Difficulty) -> ReasoningItem:
    n = rng.randint(diff.lies_people.min, diff.lies_people.max)
    people = rng.sample(NAMES, n)
    truthful = rng.random() < 0.5
    sentences = [f"{people[0]} {truth_word(truthful)}."]
    steps = [f"{people[0]} {truth_word(truthful)}."]
    for prev, cur in itertools.pairwise(people):
        claims_truth = rng.random() < 0.5
        sentences.append(f"{cur} says {prev} {truth_word(claims_truth)}.")
        truthful = claims_truth == truthful
        steps.append(f"so {cur} {truth_word(truthful)}.")
    answer = "yes" if truthful else "no"
    prompt = " ".join(sentences) + f" does {people[-1]} tell the truth?"
    return ReasoningItem("web_of_lies", prompt, answer, " ".join([*steps, _final(answer)]))


# --- boolean expressions ----------------------------------------------------------------


def _bool_word(v: bool) -> str:
    return "true" if v else "false"


def make_boolean(rng: random.Random, diff: Difficulty) -> ReasoningItem:
    """Python precedence, spoken without brackets: not binds tightest, then and, then or."""
    n = rng.randint(diff.boolean_operands.min, diff.boolean_operands.max)
    values = [rng.random() < 0.5 for _ in range(n)]
    negated = [rng.random() < 0.35 for _ in range(n)]
    ops = [rng.choice(["and", "or"]) for _ in range(n - 1)]
    words = []
    for i in range(n):
        if i:
            words.append(ops[i - 1])
        words.append(("not " if negated[i] else "") + _bool_word(values[i]))
    # First the expression again with each "not" resolved in place (a position-by-position
    # copy), then the and-groups, then the ors, each step naming its operands.
    terms = [v != neg for v, neg in zip(values, negated, strict=True)]
    rewritten = [_bool_word(terms[0])]
    for op, t in zip(ops, terms[1:], strict=True):
        rewritten += [op, _bool_word(t)]
    steps = [f"that is {' '.join(rewritten)}."]
    # and-groups, left to right
    groups: list[list[bool]] = [[terms[0]]]
    for op, t in zip(ops, terms[1:], strict=True):
        if op == "and":
            groups[-1].append(t)
        else:
            groups.append([t])
    group_values = []
    for g in groups:
        acc = g[0]
        for t in g[1:]:
            new = acc and t
            steps.append(f"{_bool_word(acc)} and {_bool_word(t)} is {_bool_word(new)}.")
            acc = new
        group_values.append(acc)
    acc = group_values[0]
    for t in group_values[1:]:
        new = acc or t
        steps.append(f"{_bool_word(acc)} or {_bool_word(t)} is {_bool_word(new)}.")
        acc = new
    answer = _bool_word(acc)
    prompt = " ".join(words) + ". is that true or false?"
    return ReasoningItem("boolean_expressions", prompt, answer, " ".join([*steps, _final(answer)]))


REASONING_TASKS: dict[str, Callable[[random.Random, Difficulty], ReasoningItem]] = {
    "navigate": make_navigate,
    "object_counting": make_counting,
    "web_of_lies": make_web_of_lies,
    "boolean_expressions": make_boolean,
}
