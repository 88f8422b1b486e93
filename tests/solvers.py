"""Independent solvers: read a prompt's English text and compute the answer from scratch.

They share no code with the generator (xopd_core.data.reasoning); a generator bug that makes
the stored answer disagree with the text is caught here.
"""

from __future__ import annotations

import re

NUMBERS = """zero one two three four five six seven eight nine ten eleven twelve thirteen
fourteen fifteen sixteen seventeen eighteen nineteen twenty"""
WORDS = {w: i for i, w in enumerate(NUMBERS.split())}
WORD_FOR = {i: w for w, i in WORDS.items()}


STEP = {"forward": (0, 1), "backward": (0, -1), "left": (-1, 0), "right": (1, 0)}


def solve_navigate(prompt: str) -> str:
    x = y = 0
    moves = re.findall(r"take (\w+) steps? (forward|backward|left|right)\.", prompt)
    assert moves, prompt
    for count, direction in moves:
        k = WORDS[count]
        dx, dy = STEP[direction]
        x, y = x + k * dx, y + k * dy
    return "yes" if (x, y) == (0, 0) else "no"


CATEGORY_MEMBERS = {
    "fruits": {"banana", "peach", "plum", "grape", "cherry", "lemon"},
    "animals": {"dog", "cat", "goat", "pig", "cow", "rabbit"},
    "instruments": {"drum", "flute", "piano", "violin", "trumpet", "guitar"},
    "vegetables": {"carrot", "potato", "cabbage", "lettuce head", "turnip", "yam"},
}


def _singular(noun: str) -> str:
    for suffix, repl in (("cherries", "cherry"), ("potatoes", "potato"), ("peaches", "peach")):
        if noun.endswith(suffix):
            return noun[: -len(suffix)] + repl
    return noun[:-1] if noun.endswith("s") else noun


def solve_counting(prompt: str) -> str:
    m = re.fullmatch(r"i have (.+)\. how many (\w+) do i have\?", prompt)
    assert m, prompt
    listing, category = m.groups()
    total = 0
    for part in re.split(r", and |, ", listing):
        count, noun = part.split(" ", 1)
        k = 1 if count == "a" else WORDS[count]
        if _singular(noun) in CATEGORY_MEMBERS[category]:
            total += k
    return WORD_FOR[total]


def solve_web_of_lies(prompt: str) -> str:
    sentences = [s.strip() for s in prompt.split(".") if s.strip()]
    *facts, question = sentences
    truth: dict[str, bool] = {}
    first = re.fullmatch(r"(\w+) (tells the truth|lies)", facts[0])
    assert first, facts[0]
    truth[first.group(1)] = first.group(2) == "tells the truth"
    for s in facts[1:]:
        m = re.fullmatch(r"(\w+) says (\w+) (tells the truth|lies)", s)
        assert m, s
        speaker, subject, claim = m.groups()
        truth[speaker] = truth[subject] == (claim == "tells the truth")
    q = re.fullmatch(r"does (\w+) tell the truth\?", question)
    assert q, question
    return "yes" if truth[q.group(1)] else "no"


def solve_boolean(prompt: str) -> str:
    expr, _, question = prompt.partition(". ")
    assert question == "is that true or false?", prompt
    # Python's own precedence (not > and > or) is the specification.
    value = eval(expr.replace("true", "True").replace("false", "False"), {"__builtins__": {}})
    return "true" if value else "false"


SOLVERS = {
    "navigate": solve_navigate,
    "object_counting": solve_counting,
    "web_of_lies": solve_web_of_lies,
    "boolean_expressions": solve_boolean,
}
