"""KL divergence to the reference policy: per-token sample estimators and exact values.

With ``x ~ π`` and ``log_ratio = log π(x) - log π_ref(x)`` (J. Schulman, "Approximating KL divergence", 2020):

- ``k1 = log_ratio``: unbiased for ``KL(π ‖ π_ref)``, high variance, can be negative;
- ``k2 = ½ · log_ratio²``: biased, low variance, ≥ 0;
- ``k3 = (r - 1) - log r`` with ``r = π_ref(x) / π(x)``: unbiased, ≥ 0, low variance.

Unbiasedness is about the *value*. As a loss term differentiated through ``log π`` at samples from π, ``k1`` in the
loss has zero expected gradient and ``k3`` in the loss has the expected gradient of ``KL(π_ref ‖ π)`` (the
forward KL): only ``k1`` moved into the reward (with its gradient stopped) gives the policy gradient of the
reverse-KL-regularised objective whose optimum is ``ρ* ∝ π_ref · exp(λ·r)``. :mod:`nabla.rl.module` offers both
placements and ``docs/duality.md`` measures the difference.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from nabla.errors import ConfigurationError

Estimator = Literal["k1", "k2", "k3"]


def kl_k1(log_p: Tensor, log_ref: Tensor) -> Tensor:
    return log_p - log_ref


def kl_k2(log_p: Tensor, log_ref: Tensor) -> Tensor:
    return 0.5 * (log_p - log_ref) ** 2


def kl_k3(log_p: Tensor, log_ref: Tensor) -> Tensor:
    log_r = log_ref - log_p
    return torch.expm1(log_r) - log_r


def kl_estimate(log_p: Tensor, log_ref: Tensor, estimator: Estimator = "k3") -> Tensor:
    """Elementwise estimate of ``KL(π ‖ π_ref)`` at samples of π (sum over tokens for a sequence's KL)."""
    functions = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}
    if estimator not in functions:
        raise ConfigurationError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")
    return functions[estimator](log_p, log_ref)


def exact_kl(log_p: Tensor, log_q: Tensor, dim: int = -1) -> Tensor:
    """``KL(p ‖ q) = Σ p · (log p - log q)`` of normalised log-probabilities along ``dim`` (0 · log 0 = 0)."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim)


def logits_kl(logits_p: Tensor, logits_q: Tensor) -> Tensor:
    """Exact per-position ``KL(softmax(logits_p) ‖ softmax(logits_q))`` over the last dimension."""
    return exact_kl(torch.log_softmax(logits_p.float(), -1), torch.log_softmax(logits_q.float(), -1))


def total_variation(p: Tensor, q: Tensor) -> float:
    """``½ Σ |p - q|`` of two distributions over the same outcomes."""
    return 0.5 * float((p.double() - q.double()).abs().sum())
