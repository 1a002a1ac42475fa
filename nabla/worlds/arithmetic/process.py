"""Process supervision for the arithmetic world: step labels of any response, and corrupted gold solutions.

A response is a chain of steps ``a±b=c`` separated by ``;`` and a final ``\\boxed{x}``. Two labels per step:

* ``first_error`` (the default): 1 while no error has occurred up to the end of this step, 0 from the first wrong
  step on. The task's correct chain is unique (left to right, one term per step), so "no error yet" means "the
  response so far is a prefix of the gold chain", which :func:`step_labels` checks exactly.
* ``state``: 1 when the running result written at this step equals the true partial result of the question
  (two errors that cancel make it 1 again).

The end of the response (its last token) always carries the outcome label: the last ``\\boxed{}`` is right.

:func:`corrupt` makes a wrong solution from a gold one at a chosen step, of a chosen kind, and says where its first
error is: no correct policy sample is needed to get labelled mistakes, and right and wrong versions of the same
problem come side by side. Kinds: a wrong result of one operation, a wrong operand copied from the question, a flipped
operator, a skipped step, a repeated step (each carried on consistently to the end, as a solver that made that slip
would), a right chain with a wrong final box, a chain cut short (with or without its end token), and ``lucky``: two
slips that cancel, so the final answer is right through wrong steps (a third of this world's policy's right answers
look like that, and only the outcome label says they are right).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from nabla.worlds.arithmetic.task import STEP_SEPARATOR, Problem, is_correct

CorruptionKind = Literal[
    "wrong_result",
    "wrong_operand",
    "wrong_operator",
    "skipped_step",
    "repeated_step",
    "wrong_box",
    "truncated",
    "lucky",
]
CORRUPTION_KINDS: tuple[str, ...] = get_args(CorruptionKind)
StepLabel = Literal["first_error", "state"]
_STEP = re.compile(r"^([+-]?\d+)([+-])(\d+)=([+-]?\d+)$")
_EXPRESSION = re.compile(r"([+-]?)(\d+)")


@dataclass(frozen=True)
class Terms:
    """A problem as its signed terms: ``values[0]`` then ``signs[i]`` ``values[i]`` for ``i >= 1``."""

    values: tuple[int, ...]
    signs: tuple[str, ...]

    @classmethod
    def of(cls, problem: Problem) -> Terms:
        expression = problem.question.removesuffix("=?")
        parts = _EXPRESSION.findall(expression)
        values = tuple(int(number) for _, number in parts)
        signs = ("+", *(sign or "+" for sign, _ in parts[1:]))
        if parts and parts[0][0] == "-":
            values = (-values[0], *values[1:])
        return cls(values, signs)

    def partial_sums(self) -> list[int]:
        """The running result after each term (``len(values)`` entries; the last is the answer)."""
        total, sums = self.values[0], [self.values[0]]
        for sign, value in zip(self.signs[1:], self.values[1:]):
            total = total + value if sign == "+" else total - value
            sums.append(total)
        return sums


@dataclass(frozen=True)
class LabelledResponse:
    """A response with one label per step (each ``;``-terminated step) and the outcome label of its end."""

    text: str
    step_labels: tuple[float, ...]
    outcome: float
    kind: str = "gold"
    first_error: int | None = None  # index of the first wrong step; len(step_labels) when only the box is wrong

    @property
    def labels(self) -> tuple[float, ...]:
        """Step labels, then the outcome: one label per score a process reward model reads."""
        return (*self.step_labels, self.outcome)


def _step(total: int, sign: str, value: int, result: int | None = None) -> str:
    result = (total + value if sign == "+" else total - value) if result is None else result
    return f"{total}{sign}{value}={result}"


def _chain(steps: Sequence[str], box: int | None) -> str:
    text = STEP_SEPARATOR.join(steps)
    if box is None:
        return text + (STEP_SEPARATOR if steps else "")
    return (text + STEP_SEPARATOR if steps else "") + f"\\boxed{{{box}}}"


def step_labels(problem: Problem, response: str, kind: StepLabel = "first_error") -> LabelledResponse:
    """Exact labels of any response to ``problem`` (a policy sample, a corruption): see the module docstring."""
    pieces = response.split(STEP_SEPARATOR)
    steps = pieces[:-1]  # every piece followed by a separator is a step; the rest is the tail (box or cut-off)
    terms = Terms.of(problem)
    gold = problem.solution.split(STEP_SEPARATOR)[:-1]
    sums = terms.partial_sums()
    labels: list[float] = []
    clean = True
    first_error: int | None = None
    for index, step in enumerate(steps):
        clean = clean and index < len(gold) and step == gold[index]
        if not clean and first_error is None:
            first_error = index
        if kind == "first_error":
            labels.append(float(clean))
        else:
            match = _STEP.match(step)
            right = match is not None and index + 1 < len(sums) and int(match.group(4)) == sums[index + 1]
            labels.append(float(right))
    outcome = float(is_correct(response, problem.answer))
    if first_error is None and not outcome:
        first_error = len(steps)
    return LabelledResponse(response, tuple(labels), outcome, first_error=first_error)


def corrupt(problem: Problem, kind: str, rng: random.Random, step: int | None = None) -> LabelledResponse:
    """A wrong (or, for ``lucky``, right-through-wrong-steps) solution of ``problem`` made from its gold chain at
    ``step`` (default: drawn), labelled by :func:`step_labels`. Every kind keeps the chain well formed."""
    if kind not in CORRUPTION_KINDS:
        raise ValueError(f"unknown corruption kind {kind!r}; choose from {', '.join(CORRUPTION_KINDS)}")
    terms = Terms.of(problem)
    steps = valid_steps(terms, kind)
    if step is None:
        step = rng.choice(steps) if steps else None
    if step is None or step not in steps:
        raise ValueError(f"no {kind} corruption at step {step} of {problem.question} (possible: {steps})")
    text = {
        "wrong_result": _wrong_result,
        "wrong_operand": _wrong_operand,
        "wrong_operator": _wrong_operator,
        "skipped_step": _skipped_step,
        "repeated_step": _repeated_step,
        "wrong_box": _wrong_box,
        "truncated": _truncated,
        "lucky": _lucky,
    }[kind](terms, step, rng)
    labelled = step_labels(problem, text)
    return LabelledResponse(labelled.text, labelled.step_labels, labelled.outcome, kind, labelled.first_error)


def valid_steps(terms: Terms, kind: str) -> list[int]:
    """The steps where a ``kind`` corruption really is an error there. Skipping or repeating term ``k + 1`` is
    not one when term ``k + 2`` is the same operation (the chain would read exactly as the gold one)."""
    n = len(terms.values) - 1
    if kind not in ("skipped_step", "repeated_step"):
        return list(range(n))
    pairs = list(zip(terms.signs[1:], terms.values[1:]))
    return [k for k in range(n) if k + 1 >= n or pairs[k] != pairs[k + 1]]


def _run(terms: Terms, start_total: int, start: int, skip: int | None = None) -> tuple[list[str], int]:
    """Steps carrying ``start_total`` on from term ``start`` (1-based term index), each computed right."""
    steps, total = [], start_total
    for i in range(start, len(terms.values)):
        if i == skip:
            continue
        steps.append(_step(total, terms.signs[i], terms.values[i]))
        total = total + terms.values[i] if terms.signs[i] == "+" else total - terms.values[i]
    return steps, total


def _delta(rng: random.Random) -> int:
    return rng.choice([-10, -3, -2, -1, 1, 1, 2, 3, 10])


def _gold_steps(terms: Terms, count: int) -> tuple[list[str], int]:
    """The first ``count`` gold steps and the running result after them."""
    steps, _ = _run(terms, terms.values[0], 1)
    return steps[:count], terms.partial_sums()[count]


def _wrong_result(terms: Terms, step: int, rng: random.Random) -> str:
    head, total = _gold_steps(terms, step)
    sign, value = terms.signs[step + 1], terms.values[step + 1]
    wrong = (total + value if sign == "+" else total - value) + _delta(rng)
    tail, final = _run(terms, wrong, step + 2)
    return _chain([*head, _step(total, sign, value, wrong), *tail], final)


def _wrong_operand(terms: Terms, step: int, rng: random.Random) -> str:
    head, total = _gold_steps(terms, step)
    sign, value = terms.signs[step + 1], terms.values[step + 1]
    others = [v for v in terms.values if v != value] or [value + 1]
    operand = rng.choice(others) if rng.random() < 0.5 else max(0, value + rng.choice([-2, -1, 1, 2]))
    operand = operand if operand != value else value + 1
    wrong = total + operand if sign == "+" else total - operand
    tail, final = _run(terms, wrong, step + 2)
    return _chain([*head, _step(total, sign, operand), *tail], final)


def _wrong_operator(terms: Terms, step: int, rng: random.Random) -> str:
    head, total = _gold_steps(terms, step)
    sign, value = terms.signs[step + 1], terms.values[step + 1]
    flipped = "-" if sign == "+" else "+"
    wrong = total + value if flipped == "+" else total - value
    tail, final = _run(terms, wrong, step + 2)
    return _chain([*head, _step(total, flipped, value), *tail], final)


def _skipped_step(terms: Terms, step: int, rng: random.Random) -> str:
    head, total = _gold_steps(terms, step)
    tail, final = _run(terms, total, step + 2)
    return _chain([*head, *tail], final)


def _repeated_step(terms: Terms, step: int, rng: random.Random) -> str:
    head, total = _gold_steps(terms, step + 1)
    sign, value = terms.signs[step + 1], terms.values[step + 1]
    again = total + value if sign == "+" else total - value
    tail, final = _run(terms, again, step + 2)
    return _chain([*head, _step(total, sign, value), *tail], final)


def _wrong_box(terms: Terms, step: int, rng: random.Random) -> str:
    steps, total = _run(terms, terms.values[0], 1)
    return _chain(steps, total + _delta(rng))


def _truncated(terms: Terms, step: int, rng: random.Random) -> str:
    head, _ = _gold_steps(terms, step)
    return _chain(head, None)


def _lucky(terms: Terms, step: int, rng: random.Random) -> str:
    """A wrong result at ``step`` and the opposite slip at a later step (or in the box's line when ``step`` is the
    last), so the final answer is right."""
    head, total = _gold_steps(terms, step)
    sign, value = terms.signs[step + 1], terms.values[step + 1]
    delta = _delta(rng)
    wrong = (total + value if sign == "+" else total - value) + delta
    steps = [*head, _step(total, sign, value, wrong)]
    later = list(range(step + 2, len(terms.values)))
    mend = rng.choice(later) if later else None
    running = wrong
    for i in later:
        result = running + terms.values[i] if terms.signs[i] == "+" else running - terms.values[i]
        if i == mend:
            result -= delta
        steps.append(_step(running, terms.signs[i], terms.values[i], result))
        running = result
    answer = terms.partial_sums()[-1]
    return _chain(steps, answer)
