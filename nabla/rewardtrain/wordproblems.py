"""A procedural set of one-step word problems with small numbers (``generated/onestep``): training material at the
default policy's level. SmolLM2-135M is right on only ~3% of its samples on MAWPS, too few correct responses to
learn from; on these it is right far more often, so the reward model sees both outcomes on the same problem.

The set is fixed (its own generator seed), so problem ids are stable across runs; it shares no question with any
dataset (the sampling stage still checks against every evaluation set).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from nabla.eval.datasets import Problem

NAME = "generated"
SPLIT = "onestep"
SIZE = 2000
SET_SEED = 20260301

NAMES = ["Tom", "Sara", "Ben", "Mia", "Liam", "Emma", "Noah", "Ava", "Lucas", "Zoe", "Omar", "Lena", "Ravi", "Ines"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "balloons", "shells", "cards", "stamps"]


@dataclass(frozen=True)
class _Template:
    text: str
    operation: str


TEMPLATES = [
    _Template("{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", "+"),
    _Template("{name} had {a} {item}. A friend gave {name} {b} more. How many {item} does {name} have in all?", "+"),
    _Template("There are {a} {item} in a box and {b} {item} on the table. How many {item} are there in total?", "+"),
    _Template("{name} has {a} {item} and gives {b} of them away. How many {item} does {name} have left?", "-"),
    _Template("{name} had {a} {item} and lost {b}. How many {item} are left?", "-"),
    _Template("{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy?", "*"),
    _Template("There are {a} rows of {item} with {b} {item} in each row. How many {item} are there?", "*"),
    _Template("{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?", "/"),
    _Template("{name} puts {a} {item} into bags of {b}. How many bags does {name} fill?", "/"),
]


def _operands(operation: str, rng: random.Random) -> tuple[int, int, int]:
    if operation == "+":
        a, b = rng.randint(2, 30), rng.randint(2, 30)
        return a, b, a + b
    if operation == "-":
        b = rng.randint(1, 20)
        a = b + rng.randint(1, 25)
        return a, b, a - b
    if operation == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        return a, b, a * b
    b, quotient = rng.randint(2, 9), rng.randint(2, 9)
    return b * quotient, b, quotient


def one_step_problems(size: int = SIZE, seed: int = SET_SEED) -> list[Problem]:
    """The set: ``size`` problems, each one addition, subtraction, multiplication or exact division."""
    rng = random.Random(seed)
    source = f"{NAME}/{SPLIT}"
    problems, seen = [], set()
    while len(problems) < size:
        template = rng.choice(TEMPLATES)
        a, b, answer = _operands(template.operation, rng)
        question = template.text.format(name=rng.choice(NAMES), item=rng.choice(ITEMS), a=a, b=b)
        if question in seen:
            continue
        seen.add(question)
        problems.append(Problem(f"{source}/{len(problems)}", question, str(answer), source))
    return problems
