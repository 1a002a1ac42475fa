import math

import pytest

from nabla.eval.metrics import AnswerAccuracy, MajorityAtK, PassAtK, pass_at_k, summarize, wilson_interval


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 2 / 5),
        (5, 2, 2, 1 - 3 / 10),  # 1 - C(3,2)/C(5,2)
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (4, 0, 2, 0.0),
        (3, 3, 2, 1.0),
        (8, 1, 8, 1.0),
        (4, 2, 3, 1.0),  # fewer wrong samples than k: some right sample is always drawn
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_impossible_inputs():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_pass_at_k_metric_averages_problems():
    metric = PassAtK(k=2)
    metric.update([5, 4], [2, 0])
    metric.update([3], [3])
    assert float(metric.compute()) == pytest.approx((0.7 + 0.0 + 1.0) / 3)


def test_wilson_interval_known_value():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(0, 20)
    assert low == pytest.approx(0.0, abs=1e-12) and 0 < high < 0.2


def test_accuracy_counts_ungradable_problems_as_skipped():
    metric = AnswerAccuracy()
    metric.update([True, False, None, True])
    metric.update([None])
    result = metric.compute()
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["graded"] == 3 and result["skipped"] == 2
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(wilson_interval(2, 3))


def test_majority_at_k_uses_the_first_k_samples_and_breaks_ties_by_first_appearance():
    metric = MajorityAtK(k=4)
    # tie 2-2 between "3" (first at index 0, wrong) and "5" (right): "3" wins, so wrong
    metric.update([["3", "5", "5", "3", "5"]], [[False, True, True, False, True]])
    # "7" and "7.0" are one answer and outvote "8"
    metric.update([["8", "7", "7.0", None]], [[False, True, True, False]])
    assert float(metric.compute()) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metric.update([["1"]], [[True]])


def _record(method, correct, reward, samples=(), **cost):
    base = {"model_calls": 0.0, "generated_tokens": 0.0, "flops": 0.0, "wall_time_s": 0.0}
    return {
        "method": method,
        "method_name": method.split("@")[0],
        "n": max(1, len(samples)),
        "problem_id": str(id(cost)),
        "correct": correct,
        "reward": reward,
        "samples": [{"answer": a, "correct": c} for a, c in samples],
        "cost": {**base, **cost},
    }


def test_summarize_combines_accuracy_samples_reward_and_costs():
    records = [
        _record("sc@2", True, 1.0, [("3", True), ("4", False)], generated_tokens=10, prefill=1, rm_forward=2),
        _record("sc@2", False, None, [("5", False), ("6", False)], generated_tokens=20, prefill=1, rm_forward=2),
        _record("sc@2", None, 3.0, [("x", None), ("y", None)], generated_tokens=30, prefill=1, rm_forward=2),
    ]
    summary = summarize(records)
    assert (summary.problems, summary.graded, summary.skipped, summary.correct) == (3, 2, 1, 1)
    assert summary.accuracy == pytest.approx(0.5)
    assert summary.mean_reward == pytest.approx(2.0)
    assert summary.pass_at == {1: pytest.approx(0.25), 2: pytest.approx(0.5)}
    assert summary.maj_at[2] == pytest.approx(0.5)
    assert summary.mean_cost["generated_tokens"] == pytest.approx(20)
    assert summary.mean_cost["model_calls"] == pytest.approx(20 + 1 + 2)  # derived from the parts


def test_summarize_reports_how_final_responses_end():
    endings = [("eos", "so 3 + 4 = 7. \\boxed{7}"), ("length", "so 3 + 4 = 7 and then"), ("eos", "The answer is 7.")]
    records = [{**_record("greedy", True, None), "finish_reason": f, "response": text} for f, text in endings]
    summary = summarize(records)
    assert summary.cut_off_rate == pytest.approx(1 / 3) and summary.boxed_rate == pytest.approx(1 / 3)
    assert summarize([_record("greedy", True, None)]).cut_off_rate is None  # records without responses


def test_summarize_reports_the_rejection_rate_over_all_proposals():
    records = [
        _record("nabla@4", True, 0.5, proposals=3, rejections=1),
        _record("nabla@4", False, 0.1, proposals=1, rejections=1),
    ]
    summary = summarize(records)
    assert summary.rejection_rate == pytest.approx(0.5) and summary.pass_at == {}
    with pytest.raises(ValueError, match="several methods"):
        summarize(records + [_record("greedy", True, 0.0)])


def test_metrics_are_torchmetrics_that_merge_and_reset():
    left, right = PassAtK(k=1), PassAtK(k=1)
    left.update([2], [1])
    right.update([2], [2])
    left.merge_state(right)  # what a cross-rank sync does with the summed states
    assert float(left.compute()) == pytest.approx(0.75)
    left.reset()
    assert float(left.problems) == 0
