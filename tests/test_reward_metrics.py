"""Within-problem metrics of a reward model on hand-made cases."""

from __future__ import annotations

import pytest

from nabla.eval.reward_metrics import pairwise_accuracy, reward_model_metrics


def test_pairwise_accuracy_counts_same_problem_pairs_only_and_ties_half():
    # problem A: right 0.9 vs wrong 0.5 and 0.95 -> one ordered, one not; problem B: right 0.2 vs wrong 0.2 -> a tie
    scores = [[0.9, 0.5, 0.95], [0.2, 0.2], [1.0, 2.0]]
    labels = [[True, False, False], [True, False], [False, False]]
    accuracy, pairs = pairwise_accuracy(scores, labels)
    assert pairs == 3
    assert accuracy == pytest.approx((1 + 0 + 0.5) / 3)
    assert pairwise_accuracy([[1.0]], [[True]]) == (None, 0)


def test_pairwise_accuracy_ignores_how_hard_problems_look():
    """A reward that only says which problem is easy has a perfect pooled AUC but orders no pair of one problem."""
    easy = [[5.0, 5.0], [5.0, 5.0]]
    hard = [[-5.0, -5.0], [-5.0, -5.0]]
    scores = [easy[0], hard[0]]
    labels = [[True, True], [False, False]]
    metrics = reward_model_metrics(scores + [[5.0, 5.0]], labels + [[True, False]], n=2)
    assert metrics["auc"] > 0.7
    assert metrics["pairwise_accuracy"] == pytest.approx(0.5)


def test_best_of_n_lift_and_oracle_ceiling():
    scores = [[0.1, 0.9, 0.3, 0.0], [0.8, 0.1, 0.2, 0.3], [0.0, 0.0, 0.0, 0.0]]
    labels = [[False, True, False, False], [False, True, False, False], [False, False, False, False]]
    m = reward_model_metrics(scores, labels, n=4, bootstrap=200)
    assert m["best_of_n_accuracy"] == pytest.approx(1 / 3)  # right on problem 1, wrong on 2, nothing to find on 3
    assert m["random_sample_accuracy"] == pytest.approx((0.25 + 0.25 + 0) / 3)
    assert m["best_of_n_lift"] == pytest.approx(1 / 3 - 1 / 6)
    assert m["pass_at_n"] == pytest.approx(2 / 3)
    low, high = m["best_of_n_lift_ci95"]
    assert low <= m["best_of_n_lift"] <= high
    # only the first n responses take part in best-of-n
    assert reward_model_metrics(scores, labels, n=1)["best_of_n_accuracy"] == 0.0
