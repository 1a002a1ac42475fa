"""Evaluation metrics as torchmetrics ``Metric``s (they sum across ranks like any other), and the summary of one
method's records.

Public API:

- ``wilson_interval(successes, trials, confidence=0.95) -> (low, high)``.
- ``pass_at_k(n, c, k) -> float``: the unbiased estimator ``1 - C(n-c, k) / C(n, k)`` of the chance that at least
  one of ``k`` samples is right, from ``n`` samples of which ``c`` are right (Chen et al. 2021).
- :class:`AnswerAccuracy`: accuracy over graded problems with a Wilson interval; problems whose gold answer
  cannot be graded (``correct is None``) are counted as skipped, not as wrong.
- :class:`PassAtK`: the mean of ``pass_at_k`` over problems.
- :class:`MajorityAtK`: maj@k, the share of problems where the majority answer of the first ``k`` samples is
  right (votes and ties as :func:`nabla.baselines.majority_vote`).
- Mean reward is ``torchmetrics.aggregation.MeanMetric``; cost sums are a :class:`nabla.CostMeter` fed with each
  record's ``cost`` (model calls and their parts, generated tokens, FLOPs, wall time, rejections/proposals, from
  which it derives the rejection rate).
- ``summarize(records) -> MethodSummary``: all of the above for one method's records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from statistics import NormalDist
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.aggregation import MeanMetric

from nabla.baselines import majority_vote
from nabla.cost import CALL_KINDS, EVENT_KINDS, CostMeter
from nabla.eval.grading import last_boxed


def wilson_interval(successes: float, trials: float, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion; ``(0, 1)`` without trials."""
    if trials <= 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def pass_at_k(n: int, c: int, k: int) -> float:
    """``1 - C(n-c, k) / C(n, k)``, computed as a stable product."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n (got n={n}, c={c})")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n samples (got n={n})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _sum_state(metric: Metric, *names: str) -> None:
    for name in names:
        metric.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")


class AnswerAccuracy(Metric):
    """Share of graded problems answered right, with a Wilson interval; ungradable problems are skipped."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, confidence: float = 0.95, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.confidence = confidence
        _sum_state(self, "correct", "graded", "skipped")

    def update(self, correct: Sequence[bool | None]) -> None:  # type: ignore[override]
        for value in correct:
            if value is None:
                self.skipped += 1
            else:
                self.graded += 1
                self.correct += float(bool(value))

    def compute(self) -> dict[str, float]:
        correct, graded = float(self.correct), float(self.graded)
        low, high = wilson_interval(correct, graded, self.confidence)
        accuracy = correct / graded if graded else math.nan
        return {"accuracy": accuracy, "ci_low": low, "ci_high": high, "graded": graded, "skipped": float(self.skipped)}


class _PerProblemMean(Metric):
    """The mean over problems of a per-problem score that depends on ``k`` samples."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, k: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if k < 1:
            raise ValueError(f"k must be >= 1 (got {k})")
        self.k = k
        _sum_state(self, "total", "problems")

    def compute(self) -> torch.Tensor:
        return self.total / self.problems if self.problems else torch.tensor(math.nan, dtype=torch.float64)


class PassAtK(_PerProblemMean):
    """Mean unbiased pass@k over problems, each given as (samples drawn, samples right)."""

    def update(self, num_samples: Sequence[int], num_correct: Sequence[int]) -> None:  # type: ignore[override]
        for n, c in zip(num_samples, num_correct, strict=True):
            self.total += pass_at_k(int(n), int(c), self.k)
            self.problems += 1


class MajorityAtK(_PerProblemMean):
    """maj@k: the majority answer of each problem's first ``k`` samples, right or not."""

    def update(  # type: ignore[override]
        self, answers: Sequence[Sequence[str | None]], correct: Sequence[Sequence[bool | None]]
    ) -> None:
        for problem_answers, problem_correct in zip(answers, correct, strict=True):
            if len(problem_answers) < self.k:
                raise ValueError(f"maj@{self.k} needs {self.k} samples per problem, got {len(problem_answers)}")
            winner = majority_vote(list(problem_answers[: self.k]))
            self.total += float(winner is not None and bool(problem_correct[winner]))
            self.problems += 1


@dataclass
class MethodSummary:
    """One method's results over its records: accuracy, sample metrics, reward and mean costs per problem.

    Accuracy is over the ``graded`` problems. ``skipped`` ones were not graded: their gold answer does not parse,
    or the policy could not read the question; ``failed`` ones hit a NaN, infinite or non-numeric reward.
    ``skip_reasons`` gives the reason of each skipped or failed problem by id. ``cut_off_rate``: share of the
    final responses stopped by the length limit; ``boxed_rate``: share with a ``\\boxed{}`` answer, where the
    prompt asks for it (the rest are graded on a fallback such as the last number)."""

    method: str
    method_name: str
    n: int
    problems: int
    graded: int
    skipped: int
    correct: int
    accuracy: float
    ci_low: float
    ci_high: float
    mean_reward: float | None
    pass_at: dict[int, float] = field(default_factory=dict)
    maj_at: dict[int, float] = field(default_factory=dict)
    mean_cost: dict[str, float] = field(default_factory=dict)
    total_cost: dict[str, float] = field(default_factory=dict)
    failed: int = 0
    skip_reasons: dict[str, str] = field(default_factory=dict)
    cut_off_rate: float | None = None
    boxed_rate: float | None = None

    @property
    def rejection_rate(self) -> float:
        return self.total_cost.get("rejection_rate", 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sample_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return sorted({*ks, n})


def summarize(records: Sequence[dict[str, Any]]) -> MethodSummary:
    """The summary of one method's records (all with the same ``method`` label)."""
    if not records:
        raise ValueError("no records to summarize")
    labels = {r["method"] for r in records}
    if len(labels) != 1:
        raise ValueError(f"records of several methods given together: {sorted(labels)}")
    first = records[0]
    accuracy = AnswerAccuracy()
    accuracy.update([r["correct"] for r in records])
    reward = MeanMetric(nan_strategy="ignore")
    rewards = [r["reward"] for r in records if r["reward"] is not None]
    if rewards:
        reward.update(torch.tensor(rewards, dtype=torch.float64))
    cost = CostMeter()
    for record in records:
        for kind in CALL_KINDS + EVENT_KINDS:
            cost.update(kind, record["cost"].get(kind, 0.0))
    graded = [r for r in records if r["correct"] is not None]
    pass_at: dict[int, float] = {}
    maj_at: dict[int, float] = {}
    sampled = [r for r in graded if r["samples"]]
    if sampled and len(sampled) == len(graded):
        n = min(len(r["samples"]) for r in sampled)
        for k in _sample_ks(n):
            pass_metric, maj_metric = PassAtK(k), MajorityAtK(k)
            pass_metric.update(
                [len(r["samples"]) for r in sampled], [sum(bool(s["correct"]) for s in r["samples"]) for r in sampled]
            )
            maj_metric.update(
                [[s["answer"] for s in r["samples"]] for r in sampled],
                [[s["correct"] for s in r["samples"]] for r in sampled],
            )
            pass_at[k], maj_at[k] = float(pass_metric.compute()), float(maj_metric.compute())
    scores = accuracy.compute()
    totals = cost.compute()
    problems = len(records)
    unsolved = [r for r in records if r.get("status", "ok") != "ok"]
    failed = sum(r["status"] == "failed" for r in unsolved)
    return MethodSummary(
        method=first["method"],
        method_name=first["method_name"],
        n=int(first["n"]),
        problems=problems,
        graded=int(scores["graded"]),
        skipped=int(scores["skipped"]) - failed,
        correct=int(accuracy.correct),
        accuracy=scores["accuracy"],
        ci_low=scores["ci_low"],
        ci_high=scores["ci_high"],
        mean_reward=float(reward.compute()) if rewards else None,
        pass_at=pass_at,
        maj_at=maj_at,
        mean_cost={key: value / problems for key, value in totals.items() if key != "rejection_rate"},
        total_cost=totals,
        failed=failed,
        skip_reasons={r["problem_id"]: f"{r['status']}: {r['error']}" for r in unsolved},
        **_response_shape([r for r in records if r.get("status", "ok") == "ok" and "response" in r]),
    )


def _response_shape(records: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """How the final responses end: cut off by the length limit, and with a boxed answer."""
    if not records:
        return {"cut_off_rate": None, "boxed_rate": None}
    return {
        "cut_off_rate": sum(r.get("finish_reason") == "length" for r in records) / len(records),
        "boxed_rate": sum(last_boxed(r["response"] or "") is not None for r in records) / len(records),
    }
