import pytest
import torch
from test_rl import one_thread  # noqa: F401 - the autouse fixture: tiny models run fastest on one thread

from nabla import SamplingConfig
from nabla.rl.kl import total_variation
from nabla.worlds.enumerable.duality import DualitySettings, exact_rl, noise_floor
from nabla.worlds.enumerable.langevin import LangevinDTO, cut_after_end, langevin_sample
from nabla.worlds.enumerable.world import build_world, enumerate_responses


@pytest.fixture(scope="module")
def world():
    """The world's models at their random initialisation (training is what the duality run adds)."""
    return build_world(seed=0, policy_steps=0, reward_steps=0)


def test_responses_are_what_the_sampler_can_return():
    responses = enumerate_responses([1, 2, 3], [0], 3)
    assert len(responses) == 1 + 3 + 9 + 27 == len(set(responses))
    assert (0,) in responses and (1, 2, 0) in responses and (1, 2, 3) in responses
    assert (1, 2, 3, 0) not in responses and (0, 1) not in responses


def test_exact_probabilities_match_brute_force_and_rho_star_sums_to_one(world):
    responses = world.responses()
    for prompt in world.prompts:
        brute = world.brute_force_probabilities(prompt)
        assert set(brute) == set(responses)
        batched = world.log_probs(prompt).exp()
        assert float(batched.sum()) == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(batched, torch.tensor([brute[r] for r in responses], dtype=torch.float64), atol=1e-6)
        one_by_one = torch.tensor(
            [float(world.reward.score([prompt], [world.policy.decode(r)], [r])[0]) for r in responses],
            dtype=torch.float64,
        )
        assert torch.allclose(world.rewards(prompt), one_by_one, atol=1e-5)
        for lam in (0.0, 3.0, 50.0):
            rho = world.rho_star(prompt, lam)
            unnormalised = torch.tensor([brute[r] for r in responses], dtype=torch.float64) * torch.exp(
                lam * one_by_one
            )
            assert float(rho.sum()) == pytest.approx(1.0, abs=1e-12)
            assert torch.allclose(rho, unnormalised / unnormalised.sum(), atol=1e-5)
        assert total_variation(world.rho_star(prompt, 0.0), batched / batched.sum()) < 1e-9


def test_the_sampler_draws_from_the_exact_distribution(world):
    prompt, count = "a", 3000
    generators = [torch.Generator().manual_seed(seed) for seed in range(count)]
    contexts = [world.policy.encode(prompt)] * count
    rollouts = world.policy.generate(contexts, SamplingConfig(temperature=1.0, top_p=None), generators, 3)
    empirical = world.distribution([r.token_ids for r in rollouts])
    exact = world.log_probs(prompt).exp()
    floor, spread = noise_floor(exact, count, repeats=20, seed=0)
    assert total_variation(empirical, exact) < floor + 4 * spread
    assert noise_floor(exact, 100, 20, 0)[0] > floor  # fewer draws, more noise


def test_langevin_with_a_vanishing_step_returns_its_pi_ref_start_and_is_seeded(world):
    frozen = LangevinDTO(lam=4.0, steps=5, step_size=1e-9)
    result = langevin_sample(frozen, world.policy, world.reward, "a", torch.Generator().manual_seed(3), 3)
    assert result.response == result.start and not result.changed
    moving = LangevinDTO(lam=4.0, steps=20, step_size=0.5)
    first = [
        langevin_sample(moving, world.policy, world.reward, "b", torch.Generator().manual_seed(s), 3) for s in range(6)
    ]
    again = [
        langevin_sample(moving, world.policy, world.reward, "b", torch.Generator().manual_seed(s), 3) for s in range(6)
    ]
    assert [r.response for r in first] == [r.response for r in again]
    assert any(r.changed for r in first)
    index = world.index()
    assert all(tuple(r.response) in index for r in first)
    assert cut_after_end([2, 0, 3], {0}) == [2, 0] and cut_after_end([2, 1, 3], {0}) == [2, 1, 3]


def test_exact_rl_moves_the_adapter_toward_rho_star(world):
    from nabla.worlds.enumerable.world import build_world as rebuild

    fresh = rebuild(seed=0, policy_steps=0, reward_steps=0)
    lam = 60.0  # the untrained reward spans little, so a large λ is needed for ρ* to differ from π_ref
    before = [total_variation(fresh.log_probs(p).exp(), fresh.rho_star(p, lam)) for p in fresh.prompts]
    distributions, _ = exact_rl(fresh, lam, DualitySettings(exact_steps=40, exact_lr=1e-2))
    after = [total_variation(distributions[p], fresh.rho_star(p, lam)) for p in fresh.prompts]
    assert min(before) > 0.1 and all(a < b / 2 for a, b in zip(after, before))
