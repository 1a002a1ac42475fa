"""The arithmetic world: multi-step integer arithmetic with a chain of thought, a character tokenizer, a small Llama
policy and reward model trained on it from scratch with ``lightning.Trainer``, and the comparison of greedy,
self-consistency, best-of-N and ∇-Reasoner on held-out problems (``nabla arithmetic``; ``docs/arithmetic.md``).

- :mod:`~nabla.worlds.arithmetic.task`: ``ArithmeticTask`` (generator settings), ``Problem``, ``Splits`` (disjoint
  held-out sets), ``extract_answer`` / ``is_correct`` (exact integer grading), JSONL in the harness's fields.
- :mod:`~nabla.worlds.arithmetic.tokenizer`: ``arithmetic_tokenizer()``, a ``PreTrainedTokenizerFast``.
- :mod:`~nabla.worlds.arithmetic.models`: ``ModelSize`` and the Llama configurations.
- :mod:`~nabla.worlds.arithmetic.training`: the Lightning modules and data modules of both models.
- :mod:`~nabla.worlds.arithmetic.pipeline`: ``arithmetic(...)``, the one command.
"""

from typing import Any

from nabla.worlds.arithmetic.task import ArithmeticTask, Problem, Splits, extract_answer, is_correct


def __getattr__(name: str) -> Any:  # the tokenizer needs transformers: imported on first use (a fast `--help`)
    if name == "arithmetic_tokenizer":
        from nabla.worlds.arithmetic.tokenizer import arithmetic_tokenizer

        return arithmetic_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ArithmeticTask", "Problem", "Splits", "arithmetic_tokenizer", "extract_answer", "is_correct"]
