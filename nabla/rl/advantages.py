"""Advantages of a group of G completions of one prompt, from their (possibly KL-shaped) rewards.

``rewards`` is ``(P, G)``: P prompts, G completions each.

- GRPO (Shao et al., 2024): ``(r_i - mean(r)) / (std(r) + eps)``; ``std`` is the unbiased sample standard
  deviation over the group (as in TRL); ``scale=False`` keeps only the centring (Dr. GRPO).
- RLOO (Ahmadian et al., 2024): ``r_i - mean_{j≠i} r_j``, the leave-one-out baseline; an unbiased policy
  gradient because the baseline of completion i does not depend on completion i. It equals
  ``G / (G - 1) · (r_i - mean(r))``.
"""

from __future__ import annotations

from nabla._typing import TYPE_CHECKING
from nabla.errors import ConfigurationError
from nabla.rl.settings import AdvantageKind

if TYPE_CHECKING:
    from torch import Tensor


def _check_groups(rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ConfigurationError(f"rewards must be (prompts, group) shaped, got {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ConfigurationError(f"a group needs at least 2 completions (got {rewards.shape[1]}); set group_size >= 2")


def grpo_advantages(rewards: Tensor, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    _check_groups(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def rloo_advantages(rewards: Tensor) -> Tensor:
    _check_groups(rewards)
    group = rewards.shape[1]
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group - 1)
    return rewards - others_mean


def advantages(rewards: Tensor, kind: AdvantageKind = "rloo", *, scale: bool = True) -> Tensor:
    if kind == "grpo":
        return grpo_advantages(rewards, scale=scale)
    if kind == "rloo":
        return rloo_advantages(rewards)
    raise ConfigurationError(f"unknown advantage {kind!r}; use grpo or rloo")
