"""The DMALA sampler of ρ* (nabla/mcmc.py) and ∇-Reasoner's Metropolis acceptance, on a world small enough to
enumerate: two response positions, 13 responses, 16 sampler states."""

import itertools
import math

import pytest
import torch
from test_rl import one_thread  # noqa: F401 - the autouse fixture: tiny models run fastest on one thread

from nabla import Acceleration, Callback, ConfigurationError, LatentOptimizer, Sampler, SamplingConfig, TestTimeTrainer
from nabla.mcmc import MCMCSampler, MCMCSettings
from nabla.rl.kl import total_variation
from nabla.sampler import TokenSelection
from nabla.trainer import Revision
from nabla.worlds.enumerable.duality import noise_floor
from nabla.worlds.enumerable.loop import LoopChain, loop_kernel, loop_law
from nabla.worlds.enumerable.world import build_world

LAM = 10.0  # the untrained reward spans ~0.3: at λ = 10, ρ* is at TV 0.40 from π_ref
PROMPT = "a"
K = 2


@pytest.fixture(scope="module")
def world():
    return build_world(seed=0, prompts=(PROMPT,), max_new_tokens=K, policy_steps=0, reward_steps=0)


@pytest.fixture(scope="module")
def rho(world):
    return world.rho_star(PROMPT, LAM)


def all_states(world) -> list[tuple[int, ...]]:
    return list(itertools.product(range(world.policy.vocab_size), repeat=K))


@torch.no_grad()
def brute_log_target(world, state: tuple[int, ...]) -> float:
    """f̃(s) from plain forwards: log π_ref of all K tokens (past the end token too) + λ·r(response)."""
    ids = torch.tensor([[*world.policy.encode(PROMPT).tolist(), *state]])
    logits = world.policy.model(input_ids=ids).logits[0].double().log_softmax(-1)
    start = ids.shape[1] - K - 1
    log_pi = sum(float(logits[start + j, token]) for j, token in enumerate(state))
    cut = next((j + 1 for j, token in enumerate(state) if token in world.policy.eos_token_ids), K)
    response = list(state[:cut])
    reward = float(world.reward.score([PROMPT], [world.policy.decode(response)], [response])[0])
    return log_pi + LAM * reward


# ---------------------------------------------------------------------------------------------- the sampler
def test_settings_are_validated():
    for bad in (
        {"lam": -1.0},
        {"lam": math.nan},
        {"steps": -1},
        {"step_size": 0.0},
        {"step_size": math.inf},
        {"top_k": 0},
        {"max_new_tokens": 0},
        {"answer": "first"},
        {"batch_size": 0},
    ):
        with pytest.raises(ConfigurationError):
            MCMCSettings(**bad)
    assert MCMCSettings(steps=0, top_k=3).top_k == 3


@torch.no_grad()
def state_logits(world, state: tuple[int, ...]) -> torch.Tensor:
    """π_ref's logits at each of the K positions of ``state`` (what its rollout would have recorded)."""
    ids = torch.tensor([[*world.policy.encode(PROMPT).tolist(), *state]])
    return world.policy.model(input_ids=ids).logits[0, -K - 1 : -1].float()


def support_of(sampler, world, start: tuple[int, ...]):
    return sampler.support(state_logits(world, start), torch.tensor(start))


@pytest.mark.parametrize("top_k", [None, 2])
def test_target_marginal_is_rho_star_and_mh_ratio_matches_brute_force_both_ways(world, rho, top_k):
    sampler = MCMCSampler(world.policy, world.reward, MCMCSettings(lam=LAM, step_size=0.7, top_k=top_k))
    states = all_states(world)
    support = support_of(sampler, world, states[6])
    assert (support is None) == (top_k is None)
    views = sampler.states(PROMPT, states, support)
    # the extended target's marginal over responses is ρ*, and f̃ is what plain forwards give
    index = world.index()
    log_target = torch.tensor([v.log_target for v in views], dtype=torch.float64)
    marginal = torch.zeros(len(index), dtype=torch.float64)
    for view, weight in zip(views, torch.softmax(log_target, 0)):
        marginal[index[tuple(view.response)]] += weight
    assert total_variation(marginal, rho) < 1e-5
    assert all(abs(v.log_target - brute_log_target(world, s)) < 1e-4 for v, s in zip(views[:5], states[:5]))
    # the joint proposal by enumeration: q(s'|s) ∝ exp(½<∇f̃(s), s'−s> − |s'−s|²/(2α)) over the product support
    for a in (0, 5, 9, 15):
        view = views[a]
        onehot = torch.nn.functional.one_hot(torch.tensor(states[a]), world.policy.vocab_size).double()
        allowed = torch.ones_like(onehot, dtype=torch.bool) if view.support is None else view.support
        scores = []
        for state in states:
            other = torch.nn.functional.one_hot(torch.tensor(state), world.policy.vocab_size).double()
            inside = all(bool(allowed[j, t]) for j, t in enumerate(state))
            gain = 0.5 * float((view.grad.double() * (other - onehot)).sum())
            scores.append(gain - float(((other - onehot) ** 2).sum()) / (2 * 0.7) if inside else -math.inf)
        joint = torch.log_softmax(torch.tensor(scores, dtype=torch.float64), 0)
        for b, proposal in enumerate(views):
            assert sampler.log_proposal(view, proposal.tokens) == pytest.approx(float(joint[b]), abs=1e-9)
        for b, proposal in enumerate(views):
            # the reverse move, enumerated at s' with its own gradient and support
            other = torch.nn.functional.one_hot(torch.tensor(states[b]), world.policy.vocab_size).double()
            allowed_back = torch.ones_like(other, dtype=torch.bool) if proposal.support is None else proposal.support
            back = []
            for state in states:
                target = torch.nn.functional.one_hot(torch.tensor(state), world.policy.vocab_size).double()
                inside = all(bool(allowed_back[j, t]) for j, t in enumerate(state))
                gain = 0.5 * float((proposal.grad.double() * (target - other)).sum())
                back.append(gain - float(((target - other) ** 2).sum()) / (2 * 0.7) if inside else -math.inf)
            reverse = float(torch.log_softmax(torch.tensor(back, dtype=torch.float64), 0)[a])
            forward = float(joint[b])
            expected = -math.inf if forward == -math.inf else proposal.log_target - view.log_target + reverse - forward
            got = sampler.log_acceptance(view, proposal)
            assert (got == expected == -math.inf) or got == pytest.approx(expected, abs=1e-9)
    if (
        top_k is not None
    ):  # the support holds the start's tokens and top-k: at most k + 1 a position, the same both ways
        assert bool(support[torch.arange(K), torch.tensor(states[6])].all()) and bool(
            support.sum(-1).le(top_k + 1).all()
        )
        assert any(sampler.log_acceptance(views[6], v) == -math.inf for v in views)  # a move out of it is refused


def kernel(sampler, views) -> torch.Tensor:
    """The chain's exact transition matrix over the enumerated states."""
    n = len(views)
    matrix = torch.zeros((n, n), dtype=torch.float64)
    for a, view in enumerate(views):
        for b, proposal in enumerate(views):
            if a == b:
                continue
            q = math.exp(sampler.log_proposal(view, proposal.tokens))
            accept = min(1.0, math.exp(min(0.0, sampler.log_acceptance(view, proposal))))
            matrix[a, b] = q * (accept if sampler.settings.metropolis else 1.0)
        matrix[a, a] = 1.0 - matrix[a].sum()
    return matrix


@pytest.mark.parametrize("top_k", [None, 2])
def test_the_kernel_leaves_the_target_invariant_and_dula_does_not(world, top_k):
    settings = MCMCSettings(lam=LAM, step_size=0.7, top_k=top_k)
    sampler = MCMCSampler(world.policy, world.reward, settings)
    support = support_of(sampler, world, (1, 2))
    inside = [s for s in all_states(world) if support is None or all(bool(support[j, t]) for j, t in enumerate(s))]
    assert len(inside) == 16 if top_k is None else 4 <= len(inside) <= 9  # top_k: the target on the product support
    views = sampler.states(PROMPT, inside, support)
    target = torch.softmax(torch.tensor([v.log_target for v in views], dtype=torch.float64), 0)
    exact = kernel(MCMCSampler(world.policy, world.reward, settings), views)
    assert float((target @ exact - target).abs().max()) < 1e-10
    unadjusted = MCMCSampler(
        world.policy, world.reward, MCMCSettings(lam=LAM, step_size=0.7, top_k=top_k, metropolis=False)
    )
    assert float((target @ kernel(unadjusted, views) - target).abs().max()) > 1e-3


def test_samples_match_rho_star_within_sampling_noise_and_the_unadjusted_chain_does_not(world, rho):
    count = 300
    floor, spread = noise_floor(rho, count, repeats=20, seed=0)
    tolerance = floor + 4 * spread
    distances = {}
    for metropolis in (True, False):
        settings = MCMCSettings(
            lam=LAM, steps=4, step_size=2.0, max_new_tokens=K, metropolis=metropolis, batch_size=count
        )
        results = MCMCSampler(world.policy, world.reward, settings).sample_batch([PROMPT] * count, seeds=0)
        distances[metropolis] = total_variation(world.distribution([r.token_ids for r in results]), rho)
        start = total_variation(world.distribution([r.start for r in results]), rho)
    assert distances[True] < tolerance < distances[False]
    assert start > tolerance  # the chain moved: its π_ref start is far from ρ*


def test_sampling_is_seeded_batch_independent_and_costed(world):
    settings = MCMCSettings(lam=LAM, steps=5, step_size=1.0, max_new_tokens=K, batch_size=4, answer="best")
    sampler = MCMCSampler(world.policy, world.reward, settings)
    batch = sampler.sample_batch([PROMPT] * 6, seeds=[3, 4, 5, 6, 7, 8])
    alone = [sampler.sample(PROMPT, seed=seed) for seed in (3, 4, 8)]
    assert [r.token_ids for r in alone] == [batch[0].token_ids, batch[1].token_ids, batch[5].token_ids]
    for result in batch:
        stats = result.stats
        assert result.evaluations == 1 + stats["proposals"] <= 1 + settings.steps
        assert stats["lm_forward"] == stats["lm_backward"] == stats["rm_forward"] == stats["rm_backward"]
        assert stats["lm_backward"] == result.evaluations and stats["rollouts"] == 1
        assert stats["proposals"] == stats["acceptances"] + stats["rejections"]
        assert stats["generated_tokens"] == K and stats["model_calls"] >= 4 * result.evaluations + K
        assert len(result.rewards) == settings.steps + 1 and result.reward == max(r for r in result.rewards)
        assert tuple(result.token_ids) in world.index()
    frozen = MCMCSampler(world.policy, world.reward, MCMCSettings(lam=LAM, steps=0, max_new_tokens=K))
    assert frozen.sample(PROMPT, seed=3).token_ids == batch[0].start


# ---------------------------------------------------------------------------------------------- ∇-Reasoner's loop
def loop_trainer(world, resample: SamplingConfig, rollout: SamplingConfig) -> TestTimeTrainer:
    """∇-Reasoner with the Metropolis test, DTO strong enough to move the resampling distribution."""
    return TestTimeTrainer(
        world.policy,
        world.reward,
        LatentOptimizer(steps=4, lr=0.5, reward_weight=LAM, likelihood_weight=1.0),
        Sampler(
            rollout=rollout,
            resample=resample,
            selection=TokenSelection(max_confidence=None, min_entropy=None, min_grad_norm=None),
            acceptance="metropolis",
            max_new_tokens=K,
        ),
        acceleration=Acceleration(False, False, False, True),  # no caches: DTO runs alike from any state
        enable_progress_bar=False,
    )


@pytest.mark.parametrize(
    "resample, rollout",
    [
        (SamplingConfig(temperature=1.0, top_p=None), SamplingConfig(temperature=1.0, top_p=None)),
        (SamplingConfig(temperature=0.9, top_p=0.95), SamplingConfig(temperature=0.8, top_p=None)),
    ],
)
def test_metropolis_acceptance_makes_the_loop_leave_rho_star_invariant(world, rho, resample, rollout):
    chain = LoopChain(world, loop_trainer(world, resample, rollout), PROMPT)
    for position in range(K):
        exact = loop_kernel(chain, position, "metropolis")
        assert float(exact.min()) >= -1e-12 and torch.allclose(exact.sum(1), torch.ones(len(rho), dtype=torch.float64))
        assert float((rho @ exact - rho).abs().max()) < 1e-6
        assert float(exact.diagonal().min()) < 0.99  # it moves
    for rule in ("reward", "always"):  # the paper's r' > r keeps climbing, no test keeps π_ref's proposals
        assert float((rho @ loop_kernel(chain, 0, rule) - rho).abs().max()) > 1e-2
    one_sweep = loop_law(chain)
    assert float(one_sweep.sum()) == pytest.approx(1.0) and total_variation(loop_law(chain, sweeps=30), rho) < 0.05


def test_the_loop_accepts_with_the_derived_probability(world):
    unit = SamplingConfig(temperature=1.0, top_p=None)
    trainer = loop_trainer(world, unit, unit)
    accepted: list[tuple[tuple[int, ...], tuple[int, ...], Revision]] = []
    current: dict[int, tuple[int, ...]] = {}  # the prompts of a batch interleave: one slot per decoding state

    class Record(Callback):
        def on_revision(self, trainer, state, revision):
            current[id(state)] = tuple(state.response)

        def on_accept(self, trainer, state, revision):
            accepted.append((current[id(state)], tuple(state.response), revision))

    trainer.callbacks.append(Record())
    results = trainer.fit_batch([PROMPT] * 10, seeds=list(range(10)))
    revisions = [r for result in results for r in result.revisions]
    assert {r.accepted for r in revisions} == {True, False} and len(accepted) >= 2
    assert all(0.0 <= r.acceptance_probability <= 1.0 for r in revisions)
    # every proposal runs a second DTO, for the reverse move
    stats = [r.stats for r in results]
    assert sum(s["dto_runs"] for s in stats) == sum(len(r.dto_runs) + s["proposals"] for r, s in zip(results, stats))
    # the recorded probability is min(1, e^{λ(r'−r)} · π_ref(t|c) q_i(a|y') / (π_ref(a|c) q_i(t|y))), from the world
    chain = LoopChain(world, trainer, PROMPT)
    log_pi, rewards, index = world.log_probs(PROMPT), world.rewards(PROMPT), world.index()
    responses = world.responses()

    def prefix_probability(prefix: tuple[int, ...]) -> float:
        return sum(math.exp(float(log_pi[i])) for i, r in enumerate(responses) if r[: len(prefix)] == prefix)

    for before, after, revision in accepted:
        i, a, t = revision.position, before[revision.position], after[revision.position]
        c = before[:i]
        step = prefix_probability(c + (t,)) / prefix_probability(c + (a,))
        forward = float(chain.refined(before, i)[t])
        reverse = float(chain.refined(after, i)[a])
        ratio = math.exp(LAM * float(rewards[index[after]] - rewards[index[before]])) * step * reverse / forward
        assert revision.acceptance_probability == pytest.approx(min(1.0, ratio), rel=1e-4, abs=1e-6)


def test_metropolis_settings_are_refused_where_they_cannot_hold(world):
    with pytest.raises(ConfigurationError):
        Sampler(acceptance="metropolis", rejection_sampling=False)
    with pytest.raises(ConfigurationError):
        Sampler(acceptance="metropolis", acceptance_margin=0.1)
    with pytest.raises(ConfigurationError):
        Sampler(acceptance="greedy")
    with pytest.raises(ConfigurationError):
        TestTimeTrainer(world.policy, world.reward, LatentOptimizer(gumbel=True), Sampler(acceptance="metropolis"))


def test_the_evaluation_harness_runs_both_as_methods(policy, reward):
    from nabla.eval.datasets import Problem
    from nabla.eval.methods import NEEDS_REWARD, MethodSpec, Solver

    problems = [Problem("p0", "what is 2 plus 3 ?", "5", "test"), Problem("long", "what " * 400, "5", "test")]
    problems.append(Problem("p1", "what is 4 minus 1 ?", "3", "test"))
    mcmc = MethodSpec("mcmc", n=3, max_new_tokens=6, mcmc=MCMCSettings(lam=2.0, top_k=8))
    metropolis = MethodSpec("nabla_metropolis", n=2, max_new_tokens=6, optimizer=LatentOptimizer(steps=2))
    assert (mcmc.display_label, metropolis.display_label) == ("mcmc@3", "nabla_metropolis@2")
    assert {"mcmc", "nabla_metropolis"} <= NEEDS_REWARD and mcmc.mcmc_settings().steps == 3
    assert metropolis.nabla_sampler().acceptance == "metropolis" and "acceptance" not in MethodSpec("nabla").to_dict()
    with pytest.raises(ConfigurationError):
        MethodSpec("mcmc", n=3, mcmc=MCMCSettings(steps=5))  # the steps are n
    for spec in (mcmc, metropolis):
        solver = Solver(spec, policy, reward, "{question}")
        records = {r["problem_id"]: r for r in solver.solve_many(problems, base_seed=1, pool=2)}
        assert records["long"]["status"] == "skipped"
        for key in ("p0", "p1"):
            record = records[key]
            assert record["status"] == "ok" and record["method_name"] == spec.name and record["cost"]["model_calls"] > 0
            assert record["response"] == solver.solve(problems[0 if key == "p0" else 2], base_seed=1)["response"]
