"""How well a reward model orders answers to the same problem: the figures that decide whether it can drive search.

Best-of-N and ∇-Reasoner's acceptance test compare responses *to the same problem*, so the first figure is the
within-problem pairwise accuracy: over every (right, wrong) pair of responses to one problem, the share the
reward orders right above wrong (ties count half). The pooled AUC is reported beside it, but it also rewards
telling easy problems from hard ones, which no search needs. Best-of-N lift is what the reward buys in accuracy:
the best-scored of a problem's first ``n`` responses against a random one of them (its expectation: the share
right), with a bootstrap 95% interval over problems, beside the oracle ceiling (best-of-N with an exact grader,
i.e. pass@N).

:func:`reward_model_metrics` is the one function every place that judges a reward model calls (``nabla
train-reward``, the arithmetic world's reward stage, tests).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torchmetrics.functional.classification import binary_auroc

from nabla.baselines import best_index


def pairwise_accuracy(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[bool]]) -> tuple[float | None, int]:
    """Share of same-problem (right, wrong) pairs ordered right above wrong, ties half; ``(None, 0)`` without a
    pair. ``scores[i]`` / ``labels[i]``: the responses of problem ``i``."""
    ordered, pairs = 0.0, 0
    for row_scores, row_labels in zip(scores, labels, strict=True):
        right = [s for s, good in zip(row_scores, row_labels, strict=True) if good]
        wrong = [s for s, good in zip(row_scores, row_labels, strict=True) if not good]
        for r in right:
            for w in wrong:
                pairs += 1
                ordered += 1.0 if r > w else 0.5 if r == w else 0.0
    return (ordered / pairs if pairs else None), pairs


def reward_model_metrics(
    scores: Sequence[Sequence[float]],
    labels: Sequence[Sequence[bool]],
    n: int = 8,
    bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Pairwise accuracy, AUC, best-of-``n`` lift over a random sample (95% CI) and pass@``n`` of one reward model.

    Every problem contributes all its responses to the pairwise accuracy and the AUC, and its first ``n``
    responses to best-of-``n`` (problems with fewer responses use what they have).
    """
    if len(scores) != len(labels) or not scores:
        raise ValueError(f"need scores and labels for the same problems (got {len(scores)} and {len(labels)})")
    flat_scores = torch.tensor([float(s) for row in scores for s in row], dtype=torch.float64)
    flat_labels = torch.tensor([int(x) for row in labels for x in row])
    both = 0 < int(flat_labels.sum()) < len(flat_labels)
    pairwise, pairs = pairwise_accuracy(scores, labels)
    heads = [(list(s[:n]), list(lab[:n])) for s, lab in zip(scores, labels)]
    best = [float(lab[best_index(s)]) for s, lab in heads]
    single = [sum(lab) / len(lab) for _, lab in heads]
    problems = len(heads)
    metrics: dict[str, Any] = {
        "problems": problems,
        "responses": len(flat_labels),
        "correct_responses": int(flat_labels.sum()),
        "pairwise_accuracy": pairwise,
        "pairs": pairs,
        "auc": float(binary_auroc(flat_scores.float(), flat_labels)) if both else None,
        "n": n,
        "best_of_n_accuracy": sum(best) / problems,
        "random_sample_accuracy": sum(single) / problems,
        "pass_at_n": sum(any(lab) for _, lab in heads) / problems,
    }
    metrics["best_of_n_lift"] = metrics["best_of_n_accuracy"] - metrics["random_sample_accuracy"]
    metrics["best_of_n_lift_ci95"] = bootstrap_mean_ci([b - s for b, s in zip(best, single)], bootstrap, seed)
    return metrics


def bootstrap_mean_ci(values: Sequence[float], rounds: int = 2000, seed: int = 0) -> list[float]:
    """Percentile bootstrap 95% interval of the mean of ``values`` (resampling the values)."""
    rng = random.Random(seed)
    count = len(values)
    means = sorted(sum(values[rng.randrange(count)] for _ in range(count)) / count for _ in range(rounds))
    return [means[int(0.025 * rounds)], means[int(0.975 * rounds) - 1]]
