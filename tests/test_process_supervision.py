"""Synthetic process supervision of the arithmetic world: corruptions carry the labels they claim."""

from __future__ import annotations

import random

import pytest

from nabla.worlds.arithmetic.process import CORRUPTION_KINDS, Terms, corrupt, step_labels, valid_steps
from nabla.worlds.arithmetic.task import STEP_SEPARATOR, ArithmeticTask, extract_answer, generate, make_problem

#: where each kind's first error must be, for a corruption at ``step`` of a chain of ``n`` steps
EXPECTED_FIRST_ERROR = {
    "wrong_result": lambda step, n: step,
    "wrong_operand": lambda step, n: step,
    "wrong_operator": lambda step, n: step,
    "skipped_step": lambda step, n: step,
    "repeated_step": lambda step, n: step + 1,
    "wrong_box": lambda step, n: n,
    "truncated": lambda step, n: step,
    "lucky": lambda step, n: step,
}


def test_gold_solutions_are_all_right():
    for problem in generate(ArithmeticTask(), 50, seed=3):
        labelled = step_labels(problem, problem.solution)
        assert labelled.first_error is None and labelled.outcome == 1.0
        assert all(labelled.step_labels) and len(labelled.step_labels) == len(Terms.of(problem).values) - 1
        assert Terms.of(problem).partial_sums()[-1] == problem.answer


@pytest.mark.parametrize("kind", CORRUPTION_KINDS)
def test_each_corruption_has_its_first_error_where_it_claims(kind):
    rng = random.Random(0)
    for problem in generate(ArithmeticTask(), 40, seed=1):
        n = len(Terms.of(problem).values) - 1
        for step in valid_steps(Terms.of(problem), kind):
            bad = corrupt(problem, kind, rng, step=step)
            assert bad.kind == kind and bad.text != problem.solution
            assert bad.first_error == EXPECTED_FIRST_ERROR[kind](step, n), (kind, step, bad.text)
            # "no error yet" holds exactly up to the first error, then never again
            steps = bad.step_labels
            assert all(steps[: bad.first_error]) and not any(steps[bad.first_error :])
            # the steps before the first error are the gold steps; the one at it is not
            gold_steps = problem.solution.split(STEP_SEPARATOR)[:-1]
            assert bad.text.split(STEP_SEPARATOR)[: bad.first_error] == gold_steps[: bad.first_error]
            # only two cancelling slips end right; a cut-off chain has no answer at all
            assert bad.outcome == (1.0 if kind == "lucky" else 0.0)
            if kind == "truncated":
                assert extract_answer(bad.text) is None
            elif kind != "lucky":
                assert extract_answer(bad.text) not in (None, problem.answer)


def test_a_degenerate_skip_or_repeat_is_refused_not_mislabelled():
    problem = make_problem([6, 4, 4], ["+", "+", "+"])  # repeating or skipping the first +4 reads as the gold chain
    assert valid_steps(Terms.of(problem), "repeated_step") == [1]
    with pytest.raises(ValueError, match="no repeated_step corruption at step 0"):
        corrupt(problem, "repeated_step", random.Random(0), step=0)
    assert corrupt(problem, "repeated_step", random.Random(0)).first_error == 2


def test_corruptions_stay_consistent_after_the_slip():
    """Every step after the slip is computed right from the wrong running result (as a solver would carry on)."""
    rng = random.Random(5)
    problem = make_problem([7, 5, 9, 6], ["+", "+", "-", "+"])
    for kind in ("wrong_result", "wrong_operand", "wrong_operator", "skipped_step", "repeated_step"):
        bad = corrupt(problem, kind, rng, step=0)
        steps = bad.text.split(STEP_SEPARATOR)[:-1]
        for before, after in zip(steps, steps[1:]):
            assert after.startswith(before.split("=")[1])  # each step starts from the previous result
        last = int(steps[-1].split("=")[1])
        assert extract_answer(bad.text) == last


def test_state_labels_mark_a_mended_chain_right_again():
    problem = make_problem([2, 5, 2], ["+", "-", "-"])  # 2-5=-3;-3-2=-5
    lucky = "2-5=-4;-4-2=-5;\\boxed{-5}"  # two slips that cancel
    assert step_labels(problem, lucky).labels == (0.0, 0.0, 1.0)
    assert step_labels(problem, lucky, "state").labels == (0.0, 1.0, 1.0)


def test_a_deepened_policy_starts_as_the_policy_exactly(tmp_path):
    import torch

    from nabla.worlds.arithmetic.models import ModelSize, deepened_policy, new_policy
    from nabla.worlds.arithmetic.tokenizer import arithmetic_tokenizer

    tokenizer = arithmetic_tokenizer()
    policy = new_policy(
        tokenizer,
        ModelSize(hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=32, max_positions=32),
        seed=0,
    )
    policy.save_pretrained(tmp_path)
    deeper = deepened_policy(tmp_path, extra_layers=2, seed=1)
    assert deeper.config.num_hidden_layers == 4
    ids = torch.randint(0, len(tokenizer), (3, 10))
    with torch.no_grad():
        assert torch.equal(deeper(input_ids=ids).logits, policy.eval()(input_ids=ids).logits)
    loss = deeper.train()(input_ids=ids, labels=ids).loss
    loss.backward()  # the new layers learn: their zeroed projections get a gradient
    assert deeper.model.layers[3].mlp.down_proj.weight.grad.abs().sum() > 0
