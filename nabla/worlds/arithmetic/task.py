"""The task: sums and differences of a few integers, answered as a short chain of thought.

A problem ``7+5-9+6=?`` is solved left to right, one intermediate result per step, then the final answer::

    7+5=12;12-9=3;3+6=9;\\boxed{9}

Problems come from a seeded generator with difficulty settings; the held-out splits are disjoint by problem text
(nothing in a held-out split is ever trained on), and grading is exact integer match of the last ``\\boxed{}``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from nabla import jsonio
from nabla.errors import ConfigurationError, DataError, require_finite

QUESTION_SUFFIX = "=?"
STEP_SEPARATOR = ";"
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class Problem:
    """One problem: its text (the prompt), the gold chain of thought and the integer answer."""

    id: str
    question: str
    solution: str
    answer: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ArithmeticTask:
    """Difficulty settings of the generator.

    Args:
        min_terms, max_terms: how many numbers a problem adds or subtracts (uniform in the range).
        min_value, max_value: range of each number (default: one-digit numbers, which a 0.16M-parameter model learns
            to add and subtract in a few hundred steps; two-digit numbers need far more training).
        subtraction_rate: probability that a term after the first is subtracted.
        allow_negative: allow intermediate results below zero; when false, a subtraction that would go negative
            becomes an addition.
    """

    min_terms: int = 3
    max_terms: int = 5
    min_value: int = 1
    max_value: int = 9
    subtraction_rate: float = 0.5
    allow_negative: bool = True

    def __post_init__(self) -> None:
        require_finite(self)
        if not 2 <= self.min_terms <= self.max_terms:
            raise ConfigurationError(f"need 2 <= min_terms <= max_terms (got {self.min_terms}, {self.max_terms})")
        if not 0 <= self.min_value <= self.max_value:
            raise ConfigurationError(f"need 0 <= min_value <= max_value (got {self.min_value}, {self.max_value})")
        if not 0.0 <= self.subtraction_rate <= 1.0:
            raise ConfigurationError(f"subtraction_rate must be in [0, 1] (got {self.subtraction_rate})")

    @property
    def max_response_chars(self) -> int:
        """A bound on the characters of a gold solution (the response budget of the policy)."""
        number = len(str(self.max_value * self.max_terms)) + 1
        step = 3 * number + 3
        return (self.max_terms - 1) * step + number + 2

    def sample(self, rng: random.Random) -> Problem:
        count = rng.randint(self.min_terms, self.max_terms)
        values = [rng.randint(self.min_value, self.max_value) for _ in range(count)]
        signs = ["+"] + ["-" if rng.random() < self.subtraction_rate else "+" for _ in range(count - 1)]
        if not self.allow_negative:
            total = values[0]
            for i in range(1, count):
                if signs[i] == "-" and total - values[i] < 0:
                    signs[i] = "+"
                total += values[i] if signs[i] == "+" else -values[i]
        return make_problem(values, signs)


def make_problem(values: list[int], signs: list[str]) -> Problem:
    """The problem ``v0 s1 v1 s2 v2 ...`` (``signs[0]`` is ignored) with its left-to-right solution."""
    expression = str(values[0]) + "".join(f"{s}{v}" for s, v in zip(signs[1:], values[1:]))
    steps, total = [], values[0]
    for sign, value in zip(signs[1:], values[1:]):
        result = total + value if sign == "+" else total - value
        steps.append(f"{total}{sign}{value}={result}")
        total = result
    solution = STEP_SEPARATOR.join(steps) + f"{STEP_SEPARATOR}\\boxed{{{total}}}"
    return Problem(id=expression, question=expression + QUESTION_SUFFIX, solution=solution, answer=total)


def extract_answer(response: str) -> int | None:
    """The integer in the last ``\\boxed{}`` of a response, or ``None`` when there is none or it is not one."""
    boxed = _BOXED.findall(response)
    if not boxed:
        return None
    text = boxed[-1].strip()
    return int(text) if _INTEGER.fullmatch(text) else None


def is_correct(response: str, answer: int | str) -> bool:
    """Exact grading: the last boxed integer equals the gold answer."""
    predicted = extract_answer(response)
    return predicted is not None and predicted == int(answer)


def generate(task: ArithmeticTask, count: int, seed: int, exclude: Iterable[str] = ()) -> list[Problem]:
    """``count`` distinct problems from ``seed``, none of whose questions is in ``exclude``."""
    excluded = set(exclude)
    rng = random.Random(seed)
    problems: dict[str, Problem] = {}
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ConfigurationError(
                f"could not find {count} distinct problems with these settings; widen the value or term range"
            )
        problem = task.sample(rng)
        if problem.question not in excluded:
            problems.setdefault(problem.question, problem)
    return list(problems.values())


def stream(task: ArithmeticTask, seed: int, exclude: Iterable[str] = ()) -> Iterator[Problem]:
    """An endless seeded stream of problems (repeats allowed) that never yields a question in ``exclude``."""
    excluded = set(exclude)
    rng = random.Random(seed)
    while True:
        problem = task.sample(rng)
        if problem.question not in excluded:
            yield problem


@dataclass
class SplitSizes:
    """How many problems each held-out split has.

    Args:
        test: problems of the comparison (only there).
        dev: problems that measure the policy during training.
        reward_train: problems whose policy samples train the reward model.
        reward_val: problems whose policy samples measure it (pairwise accuracy, AUC, best-of-N).
    """

    test: int = 400
    dev: int = 200
    reward_train: int = 1500
    reward_val: int = 300

    def __post_init__(self) -> None:
        require_finite(self)
        if min(self.test, self.dev, self.reward_train, self.reward_val) < 1:
            raise ConfigurationError("every split needs at least one problem")


@dataclass
class Splits:
    """The held-out problem sets, disjoint by question. ``test`` is for the comparison only; ``dev`` measures the
    policy during training; ``reward_train`` / ``reward_val`` are the reward model's training and AUC problems.
    The policy trains on a stream that excludes all of them."""

    test: list[Problem]
    dev: list[Problem]
    reward_train: list[Problem]
    reward_val: list[Problem]

    @classmethod
    def build(cls, task: ArithmeticTask, seed: int, sizes: SplitSizes | None = None) -> Splits:
        sizes = sizes or SplitSizes()
        test, dev, reward_train, reward_val = sizes.test, sizes.dev, sizes.reward_train, sizes.reward_val
        taken: set[str] = set()
        parts: list[list[Problem]] = []
        for offset, size in enumerate((test, dev, reward_train, reward_val)):
            part = generate(task, size, seed=seed * 1000 + offset + 1, exclude=taken)
            taken.update(p.question for p in part)
            parts.append(part)
        return cls(*parts)

    def held_out(self) -> set[str]:
        return {p.question for part in (self.test, self.dev, self.reward_train, self.reward_val) for p in part}


def write_jsonl(problems: Iterable[Problem], path: str | Path) -> Path:
    """Problems as JSONL with ``id``, ``problem`` (the prompt), ``answer`` and ``solution`` fields."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for p in problems:
            record = {"id": p.id, "problem": p.question, "answer": str(p.answer), "solution": p.solution}
            handle.write(jsonio.dumps(record) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[Problem]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no problems file at {path}; write one with write_jsonl")
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            problems.append(Problem(record["id"], record["problem"], record["solution"], int(record["answer"])))
        except (json.JSONDecodeError, KeyError, ValueError) as error:
            raise DataError(f"{path}:{number}: not a problem record ({error}); regenerate the file") from error
    return problems
