"""Evaluation: datasets, grading, metrics, the resumable sharded runner and its reports.

- :mod:`nabla.eval.datasets`: ``Problem``, ``load_dataset``, ``load_jsonl``, ``format_question``, ``DatasetSpec``,
  ``dataset_purpose`` / ``require_training_split`` (evaluation-only sets must never be trained on).
- :mod:`nabla.eval.grading`: ``extract_answer``, ``grade``, ``is_correct``, ``answers_match``, ``answer_key``.
- :mod:`nabla.eval.metrics`: torchmetrics ``Metric``s (accuracy with a Wilson interval, pass@k, maj@k) and
  ``summarize(records)``.
- :mod:`nabla.eval.methods`: ``MethodSpec`` and ``Solver`` (one problem, one method, one record).
- :mod:`nabla.eval.runner`: ``evaluate`` and ``compare`` (the ``nabla evaluate`` / ``nabla compare`` commands).
- :mod:`nabla.eval.report`: the rich summary table, the markdown table and the accuracy-vs-cost plot.

The baselines themselves live in :mod:`nabla.baselines`.
"""

from nabla.eval.datasets import (
    PROMPT_TEMPLATE,
    DatasetSpec,
    Problem,
    dataset_purpose,
    format_question,
    load_dataset,
    load_jsonl,
    require_training_split,
)
from nabla.eval.grading import Grade, answer_key, answers_match, extract_answer, grade, is_correct

__all__ = [
    "PROMPT_TEMPLATE",
    "DatasetSpec",
    "Grade",
    "Problem",
    "answer_key",
    "answers_match",
    "compare",
    "dataset_purpose",
    "evaluate",
    "extract_answer",
    "format_question",
    "grade",
    "is_correct",
    "load_dataset",
    "load_jsonl",
    "require_training_split",
]


def __getattr__(name: str):
    if name in {"evaluate", "compare"}:
        from nabla.eval import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'nabla.eval' has no attribute {name!r}")
