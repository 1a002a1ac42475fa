"""A Langevin variant of DTO (the dynamics of the paper's Theorem 4.1, on the straight-through relaxation).

Theorem 4.1 runs ``dy = -∇L(y) dt + √2 dW`` on ``L(y) = -λ·r(y) - log π_ref(y)`` from ``y ~ π_ref``; its
stationary law is ``∝ exp(-L) = π_ref · exp(λ r)``. Here the variable is the logits ``z`` of the whole response
(``K × V``, float32), read as text through the straight-through one-hot that DTO uses, and discretised as

    z ← z - η · ∇_z L + √(2η) · ξ,    ξ ~ N(0, I),

with ``∂L/∂y`` from :class:`nabla.DTOObjective` (``reward_weight = λ``, ``likelihood_weight = 1``: unlike Adam,
Langevin is not invariant to the scale of ``L``, so the weights are the theorem's). The start is a π_ref rollout
and its own logits; a position shows its rollout token until noise and gradient move its argmax away
(DTO's anchoring). The response is the forward text cut after its first end token; positions after it get no
gradient (they are not part of the response) but keep diffusing, and matter again only if the end token moves.

This is the theorem's recipe transplanted, not its setting: the forward text is piecewise constant in ``z``, so
``exp(-L)`` is not a normalisable density of ``z`` and the straight-through gradient is a surrogate. Whether its
samples approach ρ* is an empirical question, measured in ``docs/duality.md``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nabla.cost import CostMeter
from nabla.optimizer import DTOObjective, ObjectiveValue
from nabla.policy import LMPrefix, Policy
from nabla.reward import RewardModel
from nabla.sampler import SamplingConfig
from nabla.worlds.enumerable.command import LangevinDTO


@dataclass
class LangevinResult:
    response: list[int]
    start: list[int]
    changed: bool = False
    evaluations: int = 0
    losses: list[float] = field(default_factory=list)


def forward_tokens(z: Tensor, first_argmax: Tensor, anchors: Tensor) -> Tensor:
    """Each position's rollout token until its argmax has moved away from where it started."""
    argmax = z.argmax(-1)
    return torch.where(argmax == first_argmax, anchors, argmax)


def cut_after_end(tokens: Sequence[int], eos: set[int]) -> list[int]:
    for position, token in enumerate(tokens):
        if token in eos:
            return list(tokens[: position + 1])
    return list(tokens)


def langevin_sample(
    settings: LangevinDTO,
    policy: Policy,
    reward: RewardModel,
    prompt: str,
    generator: torch.Generator,
    max_new_tokens: int,
    meter: CostMeter | None = None,
) -> LangevinResult:
    """One Langevin-DTO sample for ``prompt`` (``reward`` must be bound to ``policy``)."""
    eos = policy.eos_token_ids
    prompt_ids = policy.encode(prompt)
    rollout = policy.generate(
        [prompt_ids], SamplingConfig(temperature=1.0, top_p=None), [generator], max_new_tokens,
        record_logits=True, meter=meter,
    )[0]  # fmt: skip
    assert rollout.logits is not None
    length = len(rollout)
    anchors = torch.tensor(rollout.token_ids + [min(eos)] * (max_new_tokens - length))
    z = torch.cat([rollout.logits, rollout.logits[-1:].expand(max_new_tokens - length, -1)]).float().clone()
    first_argmax = z.argmax(-1)
    objective = DTOObjective(
        policy,
        reward,
        LMPrefix(prompt_ids, policy.prefix_cache(prompt_ids, meter)),
        reward.context(prompt, [], use_cache=True, meter=meter),
        reward_weight=settings.lam,
        likelihood_weight=1.0,
        meter=meter,
    )
    result = LangevinResult(response=list(rollout.token_ids), start=list(rollout.token_ids))
    cached: tuple[list[int], ObjectiveValue] | None = None
    noise_scale = math.sqrt(2.0 * settings.step_size) if settings.noise else 0.0
    for _ in range(settings.steps):
        tokens = forward_tokens(z, first_argmax, anchors)
        response = cut_after_end(tokens.tolist(), eos)
        if not settings.drift:
            noise = torch.randn(z.shape, generator=generator) if noise_scale else torch.zeros_like(z)
            z = z + noise_scale * noise
            continue
        if cached is None or cached[0] != response:
            cached = (response, objective.evaluate(torch.tensor(response, device=policy.device)))
            result.evaluations += 1
        value = cached[1]
        if not value.finite:
            break
        result.losses.append(value.loss)
        grad_y = torch.zeros_like(z)
        grad_y[: len(response)] = value.grad.to(z.device)
        variable = z.clone().requires_grad_(True)
        soft = torch.softmax(variable / settings.temperature, dim=-1)
        straight_through = torch.nn.functional.one_hot(tokens, z.shape[-1]).float() + soft - soft.detach()
        (grad_y * straight_through).sum().backward()
        assert variable.grad is not None
        noise = torch.randn(z.shape, generator=generator) if noise_scale else torch.zeros_like(z)
        z = z - settings.step_size * variable.grad + noise_scale * noise
        if not torch.isfinite(z).all():
            break
    final = cut_after_end(forward_tokens(z, first_argmax, anchors).tolist(), eos)
    result.changed = final != result.start
    result.response = final
    return result
