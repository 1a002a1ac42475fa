"""Every exact saving decodes the same tokens as the reference mode, and batching prompts changes nothing."""

from dataclasses import replace

import pytest
from conftest import PROMPT

from nabla import Acceleration, LatentOptimizer, Sampler, TestTimeTrainer, TokenSelection

PROMPTS = [PROMPT, "what is 7 minus 2 ?", "pears and apples so we get the total ?"]
SELECTION = TokenSelection(max_confidence=0.97, min_entropy=0.25, min_grad_norm=0.0)


def _trainer(policy, reward, acceleration, gradient_caching=True, lr=0.3):
    optimizer = LatentOptimizer(steps=6, lr=lr, gradient_caching=gradient_caching)
    sampler = Sampler(max_new_tokens=14, selection=SELECTION)
    return TestTimeTrainer(policy, reward, optimizer, sampler, acceleration=acceleration)


def _decisions(result):
    return result.token_ids, [(r.position, r.proposed_token, r.accepted) for r in result.revisions]


@pytest.mark.parametrize(
    "saving", ["prefix_cache", "reuse_rollout_gradient", "reuse_rollout_cache", "reuse_rollout_reward", "caching"]
)
def test_each_saving_alone_decodes_what_the_reference_decodes(policy, reward, saving):
    reference = _trainer(policy, reward, Acceleration.reference(), gradient_caching=False)
    if saving == "caching":
        accelerated = _trainer(policy, reward, Acceleration.reference(), gradient_caching=True)
    else:
        accelerated = _trainer(policy, reward, replace(Acceleration.reference(), **{saving: True}), False)
    saved = 0.0
    for seed in range(3):
        slow, fast = reference.fit(PROMPT, seed=seed), accelerated.fit(PROMPT, seed=seed)
        assert _decisions(fast) == _decisions(slow)
        assert fast.stats["flops"] <= slow.stats["flops"]
        saved += slow.stats["flops"] - fast.stats["flops"]
    assert saved > 0


def test_all_savings_together_cut_passes_outside_rollouts(policy, reward):
    # the paper's learning rate: argmaxes rarely flip, so cached DTO steps cost no model call
    fast_trainer = _trainer(policy, reward, Acceleration(), lr=0.01)
    slow_trainer = _trainer(policy, reward, Acceleration.reference(), gradient_caching=False, lr=0.01)
    outside = ("lm_forward", "lm_backward", "rm_forward", "rm_backward", "selector", "prefill")
    fast_calls = slow_calls = 0
    for seed in range(3):
        fast, slow = fast_trainer.fit(PROMPT, seed=seed), slow_trainer.fit(PROMPT, seed=seed)
        assert _decisions(fast) == _decisions(slow)
        assert fast.stats["generated_tokens"] == slow.stats["generated_tokens"]
        fast_calls += sum(fast.stats[k] for k in outside)
        slow_calls += sum(slow.stats[k] for k in outside)
    assert fast_calls * 3 < slow_calls


def test_fit_batch_equals_one_prompt_at_a_time(policy, reward):
    trainer = _trainer(policy, reward, Acceleration())
    batched = trainer.fit_batch(PROMPTS, seeds=[4, 5, 6])
    for prompt, seed, together in zip(PROMPTS, [4, 5, 6], batched):
        alone = trainer.fit(prompt, seed=seed)
        assert _decisions(together) == _decisions(alone)
        assert together.reward == pytest.approx(alone.reward, abs=1e-6)
        counts = {k: v for k, v in alone.stats.items() if k != "wall_time_s"}
        assert {k: together.stats[k] for k in counts} == pytest.approx(counts)
