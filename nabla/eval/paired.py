"""Paired comparison of two methods on the same problems: exact McNemar test and a paired bootstrap interval.

Two methods run on the same problems are compared problem by problem: only the problems one solves and the other
does not carry information about which is better. The exact McNemar test asks whether those discordant problems
split evenly (a two-sided binomial test at p = 1/2); the paired bootstrap resamples problems to put a 95% interval
on the difference in accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from nabla.errors import DataError
from nabla.eval.reward_metrics import bootstrap_mean_ci

#: The table of paired tests written beside a comparison's records.
PAIRED_FILE = "paired.md"


@dataclass(frozen=True)
class PairedResult:
    """``a`` against ``b`` on ``problems`` shared problems."""

    a: str
    b: str
    problems: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_a - accuracy_b
    difference_ci95: tuple[float, float]
    only_a: int  # problems a solves and b does not
    only_b: int
    mcnemar_p: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: ``P(X <= min)`` doubled for ``X ~ Binomial(only_a + only_b, 1/2)``."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired_comparison(
    a: Mapping[str, bool], b: Mapping[str, bool], names: tuple[str, str] = ("a", "b"), rounds: int = 2000, seed: int = 0
) -> PairedResult:
    """Compare per-problem correctness ``a[problem_id]`` and ``b[problem_id]`` on the problems both have."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise DataError(f"{names[0]} and {names[1]} share no problem; run both on the same problems")
    pairs = [(bool(a[p]), bool(b[p])) for p in shared]
    differences = [int(x) - int(y) for x, y in pairs]
    count = len(pairs)
    low, high = bootstrap_mean_ci(differences, rounds, seed)
    only_a = sum(x and not y for x, y in pairs)
    only_b = sum(y and not x for x, y in pairs)
    return PairedResult(
        a=names[0],
        b=names[1],
        problems=count,
        accuracy_a=sum(x for x, _ in pairs) / count,
        accuracy_b=sum(y for _, y in pairs) / count,
        difference=sum(differences) / count,
        difference_ci95=(low, high),
        only_a=only_a,
        only_b=only_b,
        mcnemar_p=mcnemar_exact(only_a, only_b),
    )


def paired_from_records(
    records: Sequence[Mapping[str, Any]], a: str, b: str, rounds: int = 2000, seed: int = 0
) -> PairedResult:
    """:func:`paired_comparison` of methods labelled ``a`` and ``b`` from evaluation records (graded ones only)."""

    def correct(label: str) -> dict[str, bool]:
        rows = [r for r in records if r["method"] == label and r.get("status", "ok") == "ok"]
        if not rows:
            raise DataError(f"no graded records of method {label!r}; check the method labels")
        return {str(r["problem_id"]): bool(r["correct"]) for r in rows}

    return paired_comparison(correct(a), correct(b), (a, b), rounds, seed)


def paired_tests(folder: Path, pairs: Sequence[Sequence[str]], title: str) -> list[dict[str, Any]]:
    """Paired tests of the method pairs ``(a, b)`` on the records in ``folder`` (pairs naming a method the records
    lack are skipped), written as a table to ``folder/paired.md`` and returned."""
    from nabla.eval.runner import read_records

    records = read_records(folder)
    labels = {r["method"] for r in records}
    results = [paired_from_records(records, a, b).to_dict() for a, b in pairs if a in labels and b in labels]
    lines = [
        f"## Paired tests · {title}",
        "",
        "| A | B | problems | accuracy A | accuracy B | A − B [95% CI] | only A | only B | exact McNemar p |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        low, high = r["difference_ci95"]
        lines.append(
            f"| {r['a']} | {r['b']} | {r['problems']} | {r['accuracy_a']:.1%} | {r['accuracy_b']:.1%} | "
            f"{r['difference']:+.1%} [{low:+.1%}, {high:+.1%}] | {r['only_a']} | {r['only_b']} | "
            f"{r['mcnemar_p']:.3g} |"
        )
    (folder / PAIRED_FILE).write_text("\n".join(lines) + "\n")
    return results
