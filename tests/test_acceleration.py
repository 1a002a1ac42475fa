"""Every exact saving decodes the same tokens as the reference mode, and batching prompts changes nothing.

The policy here has peaked next-token distributions (``tiny_causal_lm(peak=20)``): with the nearly uniform random
one a resampled token is almost never the one already there, and the *kept* path would go untested. Each
equivalence test asserts that its runs took all three paths: kept, accepted and rejected.
"""

from collections import Counter
from dataclasses import replace

import pytest
from conftest import PROMPT

from nabla import Acceleration, LatentOptimizer, Policy, Sampler, TestTimeTrainer, TokenSelection

PROMPTS = [PROMPT, "what is 7 minus 2 ?", "pears and apples so we get the total ?"]
SELECTION = TokenSelection(max_confidence=0.97, min_entropy=0.25, min_grad_norm=0.0)
OUTCOMES = {"kept", "accepted", "rejected"}


@pytest.fixture(scope="module")
def peaked(tokenizer, reward):
    from nabla.tiny import tiny_causal_lm

    policy = Policy(tiny_causal_lm(tokenizer, seed=0, peak=20.0), tokenizer)
    reward.bind(policy)  # same vocabulary: the binding the session's reward already has
    return policy


@pytest.fixture(scope="module")
def reference_runs(peaked, reward):
    """The reference mode's results of the seeds below, shared by every saving's test (the same trainer each)."""
    reference = _trainer(peaked, reward, Acceleration.reference(), gradient_caching=False)
    return [reference.fit(PROMPT, seed=seed) for seed in range(3)]


def _outcomes(*results):
    return Counter(run.outcome for result in results for run in result.dto_runs)


def _trainer(policy, reward, acceleration, gradient_caching=True, lr=0.3):
    optimizer = LatentOptimizer(steps=6, lr=lr, gradient_caching=gradient_caching)
    sampler = Sampler(max_new_tokens=14, selection=SELECTION)
    return TestTimeTrainer(policy, reward, optimizer, sampler, acceleration=acceleration)


def _decisions(result):
    return result.token_ids, [(r.position, r.proposed_token, r.accepted) for r in result.revisions]


@pytest.mark.parametrize(
    "saving", ["prefix_cache", "reuse_rollout_gradient", "reuse_rollout_cache", "reuse_rollout_reward", "caching"]
)
def test_each_saving_alone_decodes_what_the_reference_decodes(peaked, reward, reference_runs, saving):
    if saving == "caching":
        accelerated = _trainer(peaked, reward, Acceleration.reference(), gradient_caching=True)
    else:
        accelerated = _trainer(peaked, reward, replace(Acceleration.reference(), **{saving: True}), False)
    saved = 0.0
    outcomes = Counter()
    for seed, slow in enumerate(reference_runs):
        fast = accelerated.fit(PROMPT, seed=seed)
        assert _decisions(fast) == _decisions(slow)
        assert [run.outcome for run in fast.dto_runs] == [run.outcome for run in slow.dto_runs]
        assert fast.stats["flops"] <= slow.stats["flops"]
        saved += slow.stats["flops"] - fast.stats["flops"]
        outcomes += _outcomes(fast)
    assert saved > 0
    assert set(outcomes) == OUTCOMES, outcomes


def test_all_savings_together_cut_passes_outside_rollouts(peaked, reward):
    # the paper's learning rate: argmaxes rarely flip, so cached DTO steps cost no model call
    fast_trainer = _trainer(peaked, reward, Acceleration(), lr=0.01)
    slow_trainer = _trainer(peaked, reward, Acceleration.reference(), gradient_caching=False, lr=0.01)
    outside = ("lm_forward", "lm_backward", "rm_forward", "rm_backward", "selector", "prefill")
    fast_calls = slow_calls = 0
    outcomes = Counter()
    for seed in range(4):
        fast, slow = fast_trainer.fit(PROMPT, seed=seed), slow_trainer.fit(PROMPT, seed=seed)
        assert _decisions(fast) == _decisions(slow)
        assert fast.stats["generated_tokens"] == slow.stats["generated_tokens"]
        assert (fast.stats["grad_steps"], fast.stats["cached_steps"]) == (
            sum(run.grad_steps for run in fast.dto_runs),
            sum(run.cached_steps for run in fast.dto_runs),
        )
        fast_calls += sum(fast.stats[k] for k in outside)
        slow_calls += sum(slow.stats[k] for k in outside)
        outcomes += _outcomes(fast)
    assert fast_calls * 3 < slow_calls
    assert set(outcomes) == OUTCOMES, outcomes


def test_fit_batch_equals_one_prompt_at_a_time(peaked, reward):
    trainer = _trainer(peaked, reward, Acceleration())
    batched = trainer.fit_batch(PROMPTS, seeds=[4, 5, 6])
    for prompt, seed, together in zip(PROMPTS, [4, 5, 6], batched):
        alone = trainer.fit(prompt, seed=seed)
        assert _decisions(together) == _decisions(alone)
        assert together.reward == pytest.approx(alone.reward, abs=1e-6)
        counts = {k: v for k, v in alone.stats.items() if k != "wall_time_s"}
        assert {k: together.stats[k] for k in counts} == pytest.approx(counts)
