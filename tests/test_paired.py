"""Paired comparisons on the same problems."""

from __future__ import annotations

import pytest

from nabla.errors import DataError
from nabla.eval.paired import mcnemar_exact, paired_comparison, paired_from_records


def test_exact_mcnemar_is_the_two_sided_binomial_tail():
    assert mcnemar_exact(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)


def test_only_discordant_problems_decide_and_the_interval_covers_the_difference():
    a = {f"p{i}": i < 70 for i in range(100)}  # 70 right
    b = {f"p{i}": 10 <= i < 75 for i in range(100)}  # 65 right; a alone solves p0..p9, b alone p70..p74
    result = paired_comparison(a, b, ("nabla", "greedy"), rounds=500)
    assert (result.only_a, result.only_b, result.problems) == (10, 5, 100)
    assert result.difference == pytest.approx(0.05)
    low, high = result.difference_ci95
    assert low <= 0.05 <= high and high - low < 0.2
    assert result.mcnemar_p == pytest.approx(mcnemar_exact(10, 5))
    # problems only one method has are left out
    assert paired_comparison({**a, "extra": True}, b).problems == 100


def test_records_of_unsolved_problems_are_left_out():
    records = [
        {"method": "x", "problem_id": "1", "correct": True, "status": "ok"},
        {"method": "x", "problem_id": "2", "correct": False, "status": "failed"},
        {"method": "y", "problem_id": "1", "correct": False, "status": "ok"},
        {"method": "y", "problem_id": "2", "correct": False, "status": "ok"},
    ]
    result = paired_from_records(records, "x", "y", rounds=50)
    assert result.problems == 1 and result.only_a == 1
    with pytest.raises(DataError, match="no graded records of method 'z'"):
        paired_from_records(records, "x", "z")
