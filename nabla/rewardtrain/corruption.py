"""Synthetic process supervision for natural-language solutions: a right response corrupted at one step.

A response the grader marks right is changed at a chosen step into one that is wrong, so the reward model sees a
right answer and a minimally different wrong one to the same problem, side by side in one batch (the arithmetic
world's :mod:`nabla.worlds.arithmetic.process` does the same for its token chains). The kinds:

- ``wrong_result``: one equation ``a op b = c`` gets a wrong result ``c'``, carried on to the rest of the text
  (the final answer included), as a slip of arithmetic propagates;
- ``wrong_operand``: one operand is replaced by another number of the question (or a nearby one), the result
  recomputed and carried on: right arithmetic on the wrong quantity;
- ``wrong_operator``: the operation is changed, the result recomputed and carried on: the wrong operation;
- ``wrong_box``: the chain is kept and only the boxed final answer changes;
- ``truncated``: the response stops before its last result (and so before its final answer).

Every corruption is graded by :func:`nabla.eval.grading.is_correct` and kept only when the grader marks it wrong,
so its label is exact; the step where it goes wrong is known (``error_at``: the character offset of the change).
Held-out problems are never corrupted: evaluation reads the policy's own responses only.
"""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from nabla.errors import ConfigurationError
from nabla.eval.grading import is_correct

KINDS = ("wrong_result", "wrong_operand", "wrong_operator", "wrong_box", "truncated")

_NUMBER = r"\d+(?:\.\d+)?"
#: ``a op b = c`` with ``+ - * / x × ÷``, numbers possibly with a decimal point.
EQUATION = re.compile(rf"({_NUMBER})\s*([+\-*/x×÷])\s*({_NUMBER})\s*=\s*({_NUMBER})")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
NUMBER = re.compile(_NUMBER)
_OPERATIONS = {"+": "+", "-": "-", "*": "*", "x": "*", "×": "*", "/": "/", "÷": "/"}


@dataclass(frozen=True)
class Corruption:
    """A wrong version of a response: its text, the kind, and where (character offset) it first goes wrong."""

    text: str
    kind: str
    error_at: int


def _spell(value: Fraction) -> str | None:
    """A value as the policy writes numbers: an integer, or a short decimal; ``None`` when it is neither."""
    if value.denominator == 1:
        return str(value.numerator)
    scaled = value * 100
    return f"{float(value):.2f}".rstrip("0").rstrip(".") if scaled.denominator == 1 else None


def _apply(a: Fraction, operation: str, b: Fraction) -> Fraction | None:
    operation = _OPERATIONS[operation]
    if operation == "+":
        return a + b
    if operation == "-":
        return a - b
    if operation == "*":
        return a * b
    return a / b if b != 0 else None


def _carry(text: str, old: str, new: str) -> str:
    """``text`` with every whole-number occurrence of ``old`` spelt ``new`` (the error carries on)."""
    return re.sub(rf"(?<![\d.]){re.escape(old)}(?![\d]|\.\d)", new, text)


def _nearby(value: Fraction, rng: random.Random) -> Fraction:
    offset = rng.choice([-10, -2, -1, 1, 2, 10])
    shifted = value + offset
    return shifted if shifted >= 0 else value + abs(offset)


def _with_result(text: str, match: re.Match[str], a: str, operation: str, b: str, result: str) -> str:
    """Rewrite one equation's operands, operator and result, and carry the new result on after it."""
    parts = (a, operation, b, result)
    # the text between the equation's four parts (spaces, "=") is kept as the policy wrote it
    rebuilt = "".join(part + text[match.end(i + 1) : match.start(i + 2)] for i, part in enumerate(parts[:3]))
    return text[: match.start()] + rebuilt + result + _carry(text[match.end() :], match.group(4), result)


def corrupt(text: str, question: str, kind: str, rng: random.Random) -> Corruption | None:
    """One corruption of ``kind`` of a response ``text`` to ``question``, or ``None`` when that kind does not apply
    (no equation for the equation kinds, no boxed answer for ``wrong_box``, a result that cannot be spelt)."""
    if kind not in KINDS:
        raise ConfigurationError(f"unknown corruption kind {kind!r}; choose from {', '.join(KINDS)}")
    equations = list(EQUATION.finditer(text))
    boxes = list(BOXED.finditer(text))
    if kind == "wrong_box":
        if not boxes:
            return None
        box = boxes[-1]
        old = box.group(1).strip()
        try:
            new = _spell(_nearby(Fraction(old), rng))
        except (ValueError, ZeroDivisionError):
            return None
        if new is None or new == old:
            return None
        return Corruption(text[: box.start(1)] + new + text[box.end(1) :], kind, box.start(1))
    if kind == "truncated":
        # cut at the last result (or the box when there is no equation): the last number left is not the answer
        cut = equations[-1].start(4) if equations else (boxes[-1].start() if boxes else None)
        if cut is None or cut < 1:
            return None
        kept = text[:cut].rstrip()
        return Corruption(kept, kind, len(kept))  # wrong from where it stops
    if not equations:
        return None
    match = rng.choice(equations)
    a, operation, b, result = match.groups()
    if kind == "wrong_result":
        new = _spell(_nearby(Fraction(result), rng))
        if new is None or new == result:
            return None
        return Corruption(_with_result(text, match, a, operation, b, new), kind, match.start(4))
    if kind == "wrong_operand":
        others = [n for n in NUMBER.findall(question) if n not in (a, b)]
        side = rng.randrange(2)
        replacement = rng.choice(others) if others else _spell(_nearby(Fraction((a, b)[side]), rng))
        if replacement is None:
            return None
        a, b = (replacement, b) if side == 0 else (a, replacement)
        at = match.start(1 + 2 * side)
    else:  # wrong_operator
        choices = [op for op in ("+", "-", "*", "/") if op != _OPERATIONS[operation]]
        operation = rng.choice(choices)
        at = match.start(2)
    value = _apply(Fraction(a), operation, Fraction(b))
    new = None if value is None or value < 0 else _spell(value)
    if new is None or new == result:
        return None
    return Corruption(_with_result(text, match, a, operation, b, new), kind, at)


def corruptions_of(
    text: str,
    question: str,
    gold: str,
    count: int,
    seed: int,
    kinds: Sequence[str] = KINDS,
) -> list[Corruption]:
    """Up to ``count`` distinct corruptions of a right response, each of a kind drawn without replacement from
    ``kinds`` (seeded by ``seed``), each graded wrong against ``gold`` (one the grader calls right is dropped)."""
    rng = random.Random(seed)
    order = list(kinds)
    rng.shuffle(order)
    found: list[Corruption] = []
    seen = {text}
    for kind in order:
        if len(found) >= count:
            break
        corruption = corrupt(text, question, kind, rng)
        if corruption is None or corruption.text in seen or not corruption.text.strip():
            continue
        if is_correct(gold, corruption.text) is not False:
            continue
        seen.add(corruption.text)
        found.append(corruption)
    return found


def with_corruptions(
    records: Sequence[dict[str, Any]],
    per_response: int,
    seed: int,
    encode: Any,
    kinds: Sequence[str] = KINDS,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Graded training records with ``per_response`` corruptions of each right response appended to its problem's
    responses (label wrong, ``corruption`` naming the kind); ``encode(text, ended) -> token ids``, with the end
    token when ``ended`` (a truncated response has none, as a response cut by the length limit). Held-out records
    are returned as they are. Also returns how many corruptions of each kind were added."""
    counts = dict.fromkeys(kinds, 0)
    out = []
    for record in records:
        if record.get("heldout") or per_response < 1:
            out.append(record)
            continue
        extra = []
        question = record.get("question", record["prompt"])
        for index, response in enumerate(record["responses"]):
            if not response["correct"]:
                continue
            rng_seed = zlib.crc32(f"{seed}/corrupt/{record['id']}/{index}".encode())
            for corruption in corruptions_of(
                response["text"], question, record["answer"], per_response, rng_seed, kinds
            ):
                counts[corruption.kind] += 1
                extra.append(
                    {
                        "text": corruption.text,
                        "token_ids": list(encode(corruption.text, corruption.kind != "truncated")),
                        "finish_reason": "corrupted",
                        "correct": False,
                        "corruption": corruption.kind,
                        "error_at": corruption.error_at,
                    }
                )
        out.append({**record, "responses": list(record["responses"]) + extra})
    return out, counts
