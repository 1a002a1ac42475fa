"""Answer extraction and grading with math-verify, safe in worker threads and processes, bounded in time.

Public functions:

- ``extract_answer(response) -> str | None``: the content of the last complete ``\\boxed{}`` (nested braces, also
  ``\\fbox{}``); failing that ``#### 72``; then "the (final) answer is 72"; then the last number in the text.
- ``grade(gold, response, timeout_s=5.0) -> Grade``: extraction then equivalence; ``Grade.correct`` is ``None``
  when the gold answer cannot be parsed (the caller skips and counts the problem), ``False`` when the response
  has no answer, a wrong one, or grading ran out of time.
- ``is_correct(gold, response) -> bool | None``: ``grade(...).correct``.
- ``answers_match(gold, answer) -> bool | None``: equivalence of an already extracted answer with the gold one.
- ``answer_key(answer) -> str | None``: a canonical form under which answers are counted as the same vote
  (``'72.0'``, ``'72'`` and ``'$72'`` share one key; ``'\\frac{1}{2}'`` and ``'0.5'`` share ``'1/2'``).
- ``last_boxed(text) -> str | None``: the content of the last complete ``\\boxed{}``.

Equivalence is ``math_verify.verify(gold, prediction)`` with the gold answer first (the check is not symmetric).
math-verify's own timeouts use ``signal.alarm``, which fails off the main thread; here its timeouts are always
off, and each call is bounded instead by an interval timer on the main thread, or by running it in a daemon
thread that is waited for ``timeout_s`` elsewhere. Answers longer than :data:`MAX_ANSWER_CHARS` are graded wrong
without parsing.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from functools import lru_cache
from typing import Any, Literal, TypeVar

MAX_ANSWER_CHARS = 300
DEFAULT_TIMEOUT_S = 5.0
Status = Literal["correct", "wrong", "no_answer", "gold_unparsable", "timeout"]

# Timeouts are handled here; math-verify's notice that its own are off would print once per process.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).setLevel(logging.ERROR)

_T = TypeVar("_T")


class GradingTimeout(BaseException):
    """Grading one answer took longer than its budget. A ``BaseException`` so that the broad ``except
    Exception`` clauses inside math-verify and sympy cannot swallow it."""


@dataclass(frozen=True)
class Grade:
    """The outcome of grading one response: ``correct`` is ``None`` when the gold answer is unparsable."""

    correct: bool | None
    answer: str | None
    status: Status


# ---------------------------------------------------------------------------------------------- extraction
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_INLINE_MATH = re.compile(r"\$\$?(.+?)\$\$?|\\\((.+?)\\\)")


def _braced(text: str, start: int) -> str | None:
    """The content of the brace group opening at ``text[start]``, or ``None`` if it never closes."""
    depth = 0
    for index in range(start, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : index]
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (``\\boxed 5`` also counts)."""
    for match in reversed(list(_BOXED.finditer(text))):
        end = match.end()
        if end < len(text) and text[end] == "{":
            content = _braced(text, end)
            if content is not None:
                return content.strip()
        elif match.group(0).endswith(" ") and end < len(text):
            word = re.match(r"[^\s$]+", text[end:])
            if word:
                return word.group(0)
    return None


def _clean(answer: str) -> str | None:
    answer = answer.strip().strip("$").strip()
    answer = re.sub(r"^(?:=|:)\s*", "", answer)
    answer = answer.rstrip(" .;,")
    return answer or None


def _from_answer_phrase(span: str) -> str | None:
    math = _INLINE_MATH.search(span)
    if math:
        return _clean(math.group(1) or math.group(2))
    number = _NUMBER.search(span)
    if number:
        return number.group(0).replace(",", "")
    return _clean(span[:MAX_ANSWER_CHARS])


def extract_answer(response: str) -> str | None:
    """The final answer of a response: last ``\\boxed{}``, then ``#### x``, then "the answer is x", then the
    last number; ``None`` when there is none."""
    if not response:
        return None
    boxed = last_boxed(response)
    if boxed is not None:
        return _clean(boxed)
    hashes = _HASHES.findall(response)
    if hashes:
        return _clean(hashes[-1].replace(",", ""))
    phrases = _ANSWER_IS.findall(response)
    if phrases:
        answer = _from_answer_phrase(phrases[-1])
        if answer is not None:
            return answer
    numbers = _NUMBER.findall(response)
    if numbers:
        return numbers[-1].replace(",", "")
    return None


# ---------------------------------------------------------------------------------------------- voting keys
def _as_fraction(answer: str) -> Fraction | None:
    text = answer.replace("\\$", "").replace("$", "").replace(",", "").replace(" ", "")
    text = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", r"\1/\2", text)
    text = re.sub(r"^\\text\{(.*)\}$", r"\1", text)
    try:
        if re.fullmatch(r"-?\d+/-?\d+", text):
            return Fraction(text)
        return Fraction(Decimal(text))
    except (InvalidOperation, ValueError, ZeroDivisionError):
        return None


def answer_key(answer: str | None) -> str | None:
    """A canonical text for counting votes: numbers as reduced fractions (``'72'``, ``'1/2'``), anything else
    with spacing and ``\\left``/``\\right``/``\\dfrac`` variations removed. ``None`` stays ``None``."""
    if answer is None:
        return None
    number = _as_fraction(answer)
    if number is not None:
        return str(number)
    text = re.sub(r"\\(?:left|right|!|,|;)", "", answer)
    text = re.sub(r"\\[dt]frac", r"\\frac", text)
    return re.sub(r"\s+", "", text).lower()


# ---------------------------------------------------------------------------------------------- equivalence
def _parse(text: str) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(
        f"\\boxed{{{text}}}",
        extraction_config=[LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],
        fallback_mode="no_fallback",
        parsing_timeout=None,
    )


@lru_cache(maxsize=4096)
def _parsed_gold(gold: str) -> tuple[Any, ...]:
    return tuple(_parse(gold)) if gold.strip() else ()


@lru_cache(maxsize=16384)
def _verify(gold: str, answer: str) -> bool:
    from math_verify import verify

    parsed_gold = list(_parsed_gold(gold))
    prediction = _parse(answer)
    return bool(prediction) and bool(verify(parsed_gold, prediction, timeout_seconds=None))


def _bounded(function: Callable[[], _T], timeout_s: float) -> _T:
    """Run ``function`` for at most ``timeout_s`` seconds or raise :class:`GradingTimeout`."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _bounded_by_timer(function, timeout_s)
    return _bounded_by_thread(function, timeout_s)


def _bounded_by_timer(function: Callable[[], _T], timeout_s: float) -> _T:
    def expire(signum: int, frame: Any) -> None:
        raise GradingTimeout

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_delay, _ = signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return function()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay:  # an outer timer was running: give it back what it had left (at least a tick)
            signal.setitimer(signal.ITIMER_REAL, max(previous_delay - (time.monotonic() - started), 1e-3))


def _bounded_by_thread(function: Callable[[], _T], timeout_s: float) -> _T:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller below
            outcome["error"] = error

    worker = threading.Thread(target=target, name="nabla-grading", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():  # left to finish on its own; a daemon thread never blocks exit
        raise GradingTimeout
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _grade_unbounded(gold: str, answer: str | None, progress: dict[str, bool]) -> Grade:
    if not _parsed_gold(gold):
        return Grade(None, answer, "gold_unparsable")
    progress["gold_parsed"] = True
    if answer is None:
        return Grade(False, None, "no_answer")
    if len(answer) > MAX_ANSWER_CHARS:
        return Grade(False, answer, "wrong")
    if _as_fraction(gold) is not None and answer_key(gold) == answer_key(answer):
        return Grade(True, answer, "correct")  # equal numbers: no need for sympy
    correct = _verify(gold, answer)
    return Grade(correct, answer, "correct" if correct else "wrong")


def _grade_answer(gold: str, answer: str | None, timeout_s: float) -> Grade:
    progress = {"gold_parsed": False}
    try:
        return _bounded(lambda: _grade_unbounded(gold, answer, progress), timeout_s)
    except GradingTimeout:
        if not progress["gold_parsed"]:
            return Grade(None, answer, "gold_unparsable")
        return Grade(False, answer, "timeout")


def answers_match(gold: str, answer: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool | None:
    """Whether an extracted ``answer`` equals ``gold``; ``None`` when the gold answer is unparsable."""
    return _grade_answer(gold, answer, timeout_s).correct


def gold_parses(gold: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether math-verify can read the gold answer (problems whose gold does not parse are skipped)."""
    return _grade_answer(gold, None, timeout_s).status != "gold_unparsable"


def grade(gold: str, response: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Grade:
    """Extract the answer of ``response`` and compare it with ``gold`` (gold first, as math-verify wants)."""
    return _grade_answer(gold, extract_answer(response), timeout_s)


def is_correct(gold: str, response: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool | None:
    """``True``/``False`` for a gradable problem, ``None`` when the gold answer is unparsable."""
    return grade(gold, response, timeout_s).correct
