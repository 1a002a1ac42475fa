import math

import pytest
import torch
from conftest import PROMPT, TokenBonusReward

from nabla import ConfigurationError, LatentOptimizer
from nabla.optimizer import DTOObjective, ObjectiveValue
from nabla.policy import LMPrefix
from nabla.sampler import SamplingConfig


def _schedule(step, *, steps, warmup, floor):
    """The learning-rate factor written out from its definition, independently of ``LatentOptimizer.lr_factor``:
    linear warm-up (step + 1) / (warmup + 1) over the first ``warmup`` steps, then half a cosine period from 1 down
    towards ``floor`` over the remaining ``steps - warmup`` (the last step stops one step short of the floor)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    angle = math.pi * (step - warmup) / (steps - warmup)
    return floor + (1 - floor) * (1 + math.cos(angle)) / 2


def _setup(policy, reward, *, reward_weight=1.0, likelihood_weight=1e-3, length=6, seed=0):
    prompt = policy.encode(PROMPT)
    rollout = policy.generate(
        [prompt],
        SamplingConfig(0.6),
        [torch.Generator().manual_seed(seed)],
        length,
        record_logits=True,
        record_hidden=True,
        keep_cache=True,
    )[0]
    context = reward.context(PROMPT, [], use_cache=True) if reward_weight else None
    objective = DTOObjective(
        policy,
        reward,
        LMPrefix(prompt, rollout.cache),
        context,
        reward_weight=reward_weight,
        likelihood_weight=likelihood_weight,
    )
    return rollout, objective


def test_gradient_caching_gives_the_same_update_as_recomputing(policy, reward):
    rollout, objective = _setup(policy, reward)
    anchors = torch.tensor(rollout.token_ids)
    results = {}
    for caching in (True, False):
        optimizer = LatentOptimizer(steps=20, lr=0.05, gradient_caching=caching, update="suffix")
        results[caching] = optimizer.run(objective.evaluate, rollout.logits, anchors)
    cached, fresh = results[True], results[False]
    assert torch.equal(cached.logits, fresh.logits)
    assert fresh.grad_steps == 20 and fresh.cached_steps == 0
    assert cached.grad_steps + cached.cached_steps == 20 and cached.grad_steps < 20


def test_a_rewarded_token_gains_probability_and_likelihood_only_does_not(policy, tokenizer):
    target = tokenizer.convert_tokens_to_ids("apples")
    bonus = TokenBonusReward(target, tokenizer)
    moved = {}
    for name, weights in {"reward": (1.0, 1e-3), "likelihood": (0.0, 1.0)}.items():
        rollout, objective = _setup(policy, bonus, reward_weight=weights[0], likelihood_weight=weights[1])
        assert rollout.token_ids[0] != target
        before = torch.softmax(rollout.logits[0], -1)[target]
        result = LatentOptimizer(steps=20, reward_weight=weights[0], likelihood_weight=weights[1]).run(
            objective.evaluate, rollout.logits[:1], torch.tensor(rollout.token_ids)
        )
        moved[name] = float(torch.softmax(result.logits[0], -1)[target] / before)
    assert moved["reward"] > 1.1  # lr 0.01 x 20 steps moves a logit by ~0.1-0.2, as the paper observes
    assert moved["likelihood"] < 1.0


def test_likelihood_only_dto_sharpens_the_next_token_distribution(policy, reward):
    # With a one-token look-ahead, dL/dy_1 = -log p_1: the straight-through step moves mass toward likelier tokens.
    rollout, objective = _setup(policy, reward, reward_weight=0.0, likelihood_weight=1.0, length=1)
    result = LatentOptimizer(steps=10, reward_weight=0.0, likelihood_weight=1.0).run(
        objective.evaluate, rollout.logits[:1], torch.tensor(rollout.token_ids)
    )
    before, after = torch.softmax(rollout.logits[0], -1), torch.softmax(result.logits[0], -1)
    mode = int(before.argmax())
    assert after[mode] > before[mode]
    entropy = lambda p: float(-(p * p.log()).sum())  # noqa: E731
    assert entropy(after) < entropy(before)


def test_latents_space_optimises_hidden_states_through_the_head(policy, tokenizer):
    target = tokenizer.convert_tokens_to_ids("apples")
    rollout, objective = _setup(policy, TokenBonusReward(target, tokenizer))
    optimizer = LatentOptimizer(space="latents", steps=10, lr=0.05)
    result = optimizer.run(
        objective.evaluate, rollout.hidden[:1], torch.tensor(rollout.token_ids), head=policy.head_logits
    )
    assert result.logits.shape == (1, policy.vocab_size)
    gain = torch.softmax(result.logits[0], -1)[target] / torch.softmax(rollout.logits[0], -1)[target]
    assert gain > 1.0


def test_history_records_every_step_with_a_cosine_schedule(policy, reward):
    rollout, objective = _setup(policy, reward)
    optimizer = LatentOptimizer(steps=8, lr=0.01, min_lr_ratio=0.1)
    result = optimizer.run(objective.evaluate, rollout.logits[:1], torch.tensor(rollout.token_ids))
    lrs = [record.lr for record in result.history]
    assert len(lrs) == 8 and lrs[0] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] >= 0.001
    assert lrs == pytest.approx([0.01 * _schedule(t, steps=8, warmup=0, floor=0.1) for t in range(8)], rel=1e-12)
    # e.g. half-way: 0.01 * (0.1 + 0.9 * (1 + cos(pi / 2)) / 2) = 0.0055
    assert lrs[4] == pytest.approx(0.0055, rel=1e-12)
    assert all(record.reward is not None and record.log_likelihood is not None for record in result.history)
    assert optimizer.lam == pytest.approx(1000.0)


def test_non_finite_objective_stops_without_corrupting_the_logits(policy):
    start = torch.randn(1, policy.vocab_size)
    calls = []

    def broken(tokens):
        calls.append(1)
        grad = torch.full((len(tokens), policy.vocab_size), math.nan)
        return ObjectiveValue(float("nan"), None, None, grad)

    result = LatentOptimizer(steps=5).run(broken, start, torch.tensor([3, 4]))
    assert result.stopped_on_nonfinite and len(calls) == 1
    assert torch.equal(result.logits, start)


def test_a_cached_value_is_checked_for_finiteness_once(policy, monkeypatch):
    """Cached DTO steps reuse one value: its (T, V) gradient is scanned once per run, not once per step."""
    start = torch.randn(1, policy.vocab_size)
    grad = torch.zeros((2, policy.vocab_size))
    grad[0, 0] = 1.0  # a gradient that barely moves the argmax: every step after the first is a cache hit
    value = ObjectiveValue(0.5, None, None, grad)
    scans = []
    real_isfinite = torch.isfinite

    def counting_isfinite(tensor):
        if tensor is grad:
            scans.append(1)
        return real_isfinite(tensor)

    monkeypatch.setattr(torch, "isfinite", counting_isfinite)
    result = LatentOptimizer(steps=6, lr=1e-4).run(lambda tokens: value, start, start.argmax(-1).repeat(2))
    assert result.cached_steps == 5 and result.grad_steps == 1 and not result.stopped_on_nonfinite
    assert len(scans) == 1
    value.grad[1, 3] = math.inf  # a new value is checked anew
    assert not ObjectiveValue(0.5, None, None, value.grad).finite


def test_bf16_models_keep_the_optimised_variable_in_fp32(policy, reward):
    rollout, objective = _setup(policy, reward)
    result = LatentOptimizer(steps=3).run(
        objective.evaluate, rollout.logits[:1].bfloat16(), torch.tensor(rollout.token_ids)
    )
    assert result.logits.dtype == torch.float32


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"steps": 0}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr": -1.0}, "lr"),
        ({"space": "words"}, "space"),
        ({"reward_weight": 0.0, "likelihood_weight": 0.0}, "nothing to do"),
        ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
    ],
)
def test_bad_optimizer_settings_raise_configuration_errors(settings, match):
    with pytest.raises(ConfigurationError, match=match):
        LatentOptimizer(**settings)


def test_batched_objective_evaluation_equals_one_at_a_time(policy, reward):
    prompts = [PROMPT, "what is 7 minus 2 ?"]
    objectives, anchors = [], []
    for seed, prompt in enumerate(prompts):
        ids = policy.encode(prompt)
        rollout = policy.generate(
            [ids],
            SamplingConfig(0.6),
            [torch.Generator().manual_seed(seed)],
            5 + 2 * seed,
            record_logits=True,
            keep_cache=True,
        )[0]
        context = reward.context(prompt, [], use_cache=True)
        objectives.append(
            DTOObjective(
                policy, reward, LMPrefix(ids, rollout.cache), context, reward_weight=1.0, likelihood_weight=0.5
            )
        )
        anchors.append(torch.tensor(rollout.token_ids))
    together = DTOObjective.evaluate_batch(objectives, anchors)
    for objective, tokens, batched in zip(objectives, anchors, together):
        alone = objective.evaluate(tokens)
        assert batched.loss == pytest.approx(alone.loss, abs=1e-5)
        assert batched.reward == pytest.approx(alone.reward, abs=1e-5)
        torch.testing.assert_close(batched.grad, alone.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_closed_form_logits_gradient_equals_autograd(temperature):
    optimizer = LatentOptimizer(temperature=temperature)
    torch.manual_seed(0)
    logits, grad_y = torch.randn(2, 11), torch.randn(2, 11)
    tokens = logits.argmax(-1)
    closed = logits.clone().requires_grad_(True)
    optimizer._backward(grad_y, closed, closed, tokens, analytic=True)
    graph = logits.clone().requires_grad_(True)
    optimizer._backward(grad_y, graph, graph, tokens, analytic=False)
    assert torch.allclose(closed.grad, graph.grad, atol=1e-6)


def test_dto_adam_matches_torch_adam_with_the_cosine_schedule():
    from nabla.optimizer import _Adam

    settings = LatentOptimizer(steps=6, lr=0.1, warmup_steps=2)
    torch.manual_seed(0)
    ours, theirs = torch.randn(3, 5), None
    theirs = ours.clone().requires_grad_(True)
    reference = torch.optim.Adam([theirs], lr=settings.lr, betas=settings.betas)
    factor = [_schedule(t, steps=settings.steps, warmup=2, floor=settings.min_lr_ratio) for t in range(settings.steps)]
    assert [settings.lr_factor(t) for t in range(settings.steps)] == pytest.approx(factor, rel=1e-12)
    assert factor[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # warm-up, then the cosine starts at the peak
    schedule = torch.optim.lr_scheduler.LambdaLR(reference, lambda step: factor[min(step, settings.steps - 1)])
    adam = _Adam(ours, settings.betas)
    for step in range(settings.steps):
        grad = torch.randn(3, 5)
        adam.step(grad, settings.lr * settings.lr_factor(step))
        theirs.grad = grad.clone()
        reference.step()
        schedule.step()
    assert torch.allclose(ours, theirs.detach(), atol=1e-7)
