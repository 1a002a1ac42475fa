import math

import pytest
import torch
from conftest import PROMPT

from nabla import CallableReward, ConfigurationError
from nabla.baselines import Baselines, best_index, derive_seed, majority_vote, row_generators, vote_weight
from nabla.sampler import SamplingConfig

HOT = SamplingConfig(temperature=1.0, top_p=None)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_majority_vote_ties_go_to_the_earliest_answer():
    assert majority_vote(["3", "5", "5", "3"]) == 0
    assert majority_vote(["5", "3", "3", "5"]) == 0
    assert majority_vote([None, "4", "9", "9"]) == 2
    assert majority_vote(["8", "7", "7.0"]) == 1  # 7 and 7.0 are one answer
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_weighted_vote_and_best_index():
    assert majority_vote(["3", "5"], [0.2, 0.9]) == 1
    assert majority_vote(["3", "5", "3"], [0.2, 0.9, 0.8]) == 0  # 1.0 for "3" beats 0.9
    assert majority_vote(["3", "5"], [0.5, 0.5]) == 0
    assert best_index([0.1, 0.7, 0.7]) == 1
    assert best_index([math.nan, -5.0]) == 1
    assert vote_weight(0.0) == pytest.approx(0.5) and vote_weight(-math.inf) == 0.0
    assert vote_weight(-800.0) == pytest.approx(0.0) and vote_weight(800.0) == pytest.approx(1.0)


def test_seeds_depend_only_on_what_they_derive_from():
    assert derive_seed(0, "svamp/test/3") == derive_seed(0, "svamp/test/3") != derive_seed(1, "svamp/test/3")
    draws = [torch.rand(2, generator=g) for g in row_generators(7, 3)]
    again = [torch.rand(2, generator=g) for g in row_generators(7, 5)[:3]]
    assert all(torch.equal(a, b) for a, b in zip(draws, again))


def test_greedy_is_temperature_zero_on_the_encoded_prompt(policy):
    result = Baselines(policy, max_new_tokens=10).greedy(PROMPT)
    reference = policy.generate(
        [policy.encode(PROMPT)], SamplingConfig(temperature=0.0, top_p=None), [torch.Generator()], 10
    )[0]
    assert result.token_ids == reference.token_ids and result.text == policy.decode(reference.token_ids)
    assert result.stats["generated_tokens"] == len(reference.token_ids)
    assert result.stats["model_calls"] == result.stats["generated_tokens"] + result.stats["prefill"]
    with pytest.raises(ConfigurationError, match="n must be 1"):
        Baselines(policy).run("greedy", PROMPT, n=2)


def test_batched_samples_match_one_by_one_and_nest_across_n(policy):
    baselines = Baselines(policy, sampling=HOT, max_new_tokens=10)
    four = baselines.sampling(PROMPT, n=4, seed=3)
    two = baselines.sampling(PROMPT, n=2, seed=3)
    assert [s.token_ids for s in four.samples[:2]] == [s.token_ids for s in two.samples]
    alone = policy.generate([policy.encode(PROMPT)], HOT, [row_generators(3, 4)[2]], 10)[0]
    assert four.samples[2].token_ids == alone.token_ids
    assert len({tuple(s.token_ids) for s in four.samples}) > 1
    assert four.stats["rollouts"] == 4 and four.stats["prefill"] >= 1
    assert four.stats["generated_tokens"] == sum(len(s.token_ids) for s in four.samples)


def test_self_consistency_returns_the_majority_answer_at_no_reward_cost(policy, reward):
    result = Baselines(policy, reward, sampling=HOT, max_new_tokens=10).self_consistency(PROMPT, n=6, seed=1)
    answers = [s.answer for s in result.samples]
    assert result.chosen == (majority_vote(answers) or 0) and result.answer == answers[result.chosen]
    assert result.stats["rm_forward"] == 0 and result.reward is not None  # reward reported, not charged


def test_best_of_n_charges_one_reward_pass_per_sample_and_returns_the_best(policy, reward):
    result = Baselines(policy, reward, sampling=HOT, max_new_tokens=10).best_of_n(PROMPT, n=4, seed=2)
    rewards = [s.reward for s in result.samples]
    assert result.reward == max(rewards) and result.chosen == rewards.index(max(rewards))
    assert result.stats["rm_forward"] == 4
    assert result.stats["model_calls"] == sum(result.stats[k] for k in ("generated_tokens", "prefill", "rm_forward"))
    with pytest.raises(ConfigurationError, match="reward"):
        Baselines(policy).best_of_n(PROMPT, n=2)


def test_weighted_majority_follows_the_reward(policy):
    baselines = Baselines(policy, sampling=HOT, max_new_tokens=10)
    samples = baselines.sampling(PROMPT, n=6, seed=5).samples
    answered = [i for i, s in enumerate(samples) if s.answer is not None]
    favourite = samples[answered[-1]].text
    judge = CallableReward(lambda prompt, response: 20.0 if response == favourite else -20.0)
    result = Baselines(policy, judge, sampling=HOT, max_new_tokens=10).weighted_majority(PROMPT, n=6, seed=5)
    assert result.answer == samples[answered[-1]].answer
    assert result.stats["rm_forward"] == 6


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.999])
def test_top_p_from_the_top_candidates_keeps_exactly_what_a_full_sort_keeps(top_p):
    from nabla.sampler import nucleus

    generator = torch.Generator().manual_seed(0)
    for scale in (0.05, 0.5, 3.0, 10.0):  # from a flat distribution (the nucleus outgrows the candidates) to a peak
        probs = torch.softmax(torch.randn(6, 5000, generator=generator, dtype=torch.float64) * scale, -1)
        ordered, order = torch.sort(probs, dim=-1, descending=True)
        expected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ordered.cumsum(-1) - ordered < top_p)
        assert torch.equal(nucleus(probs, top_p, candidates=16), expected)
