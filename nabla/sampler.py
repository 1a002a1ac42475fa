"""Sampling settings, seeded token sampling, token selection and the acceptance rule.

The :class:`Sampler` owns every *decision* of the decoding loop (how to sample, which look-ahead position is
worth optimising, whether a proposal replaces the current rollout, when to stop); the :class:`~nabla.Policy`
owns the model compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from nabla.errors import ConfigurationError


@dataclass
class SamplingConfig:
    """How one token is drawn from logits. ``temperature == 0`` is greedy."""

    temperature: float = 0.6
    top_k: int | None = None
    top_p: float | None = 0.95

    def __post_init__(self) -> None:
        if self.temperature < 0 or not math.isfinite(self.temperature):
            raise ConfigurationError(f"temperature must be >= 0 (got {self.temperature}); use 0 for greedy")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigurationError(f"top_k must be >= 1 or null (got {self.top_k})")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigurationError(f"top_p must be in (0, 1] or null (got {self.top_p})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sampling_probabilities(logits: Tensor, config: SamplingConfig) -> Tensor:
    """Probabilities after temperature, top-k and top-p, in float64 (``(..., V)``)."""
    scores = logits.detach().to(torch.float64)
    if config.greedy:
        return torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).to(torch.float64)
    scores = scores / config.temperature
    if config.top_k is not None and config.top_k < scores.shape[-1]:
        kth = torch.topk(scores, config.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    if config.top_p is not None and config.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= config.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_tokens(logits: Tensor, config: SamplingConfig, generators: list[torch.Generator]) -> Tensor:
    """One token per row of ``logits`` (``(B, V)``), row ``b`` drawn with ``generators[b]``.

    Inverse-CDF sampling on the CPU in float64 with one uniform per row: the draw of a row depends only on its
    own generator and logits, so a sequence samples the same tokens alone or inside any batch.
    """
    if logits.dim() != 2 or logits.shape[0] != len(generators):
        raise ValueError(f"expected logits (B, V) with B={len(generators)} generators, got {tuple(logits.shape)}")
    probs = sampling_probabilities(logits.cpu(), config)
    if config.greedy:
        return probs.argmax(-1)
    uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    cdf = probs.cumsum(-1)
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, targets).squeeze(-1)
    tokens = tokens.clamp(max=probs.shape[-1] - 1)
    # A zero-probability token can only be hit at an exact CDF plateau; step back to the last real one.
    bad = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) == 0
    if bad.any():
        tokens[bad] = probs[bad].argmax(-1)
    return tokens


def confidence_and_entropy(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Max probability and entropy (nats) of each row of ``logits`` at temperature 1."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    probs = logp.exp()
    entropy = -(probs * logp).nan_to_num().sum(-1)
    return probs.max(-1).values, entropy


@dataclass
class TokenSelection:
    """Which look-ahead positions are worth optimising. Each criterion is optional; the set ones are AND-ed.

    A position qualifies when ``confidence <= max_confidence`` and ``entropy >= min_entropy`` (both from the
    policy's own distribution) and ``||dL/dy_i|| >= min_grad_norm`` (the DTO loss gradient at the rollout text).
    The first qualifying position is optimised; the ones before it are committed unchanged.
    """

    max_confidence: float | None = 0.97
    min_entropy: float | None = 0.25
    min_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.max_confidence is not None and not 0.0 < self.max_confidence <= 1.0:
            raise ConfigurationError(f"max_confidence must be in (0, 1] or null (got {self.max_confidence})")
        if self.min_entropy is not None and self.min_entropy < 0:
            raise ConfigurationError(f"min_entropy must be >= 0 or null (got {self.min_entropy})")
        if self.min_grad_norm is not None and self.min_grad_norm < 0:
            raise ConfigurationError(f"min_grad_norm must be >= 0 or null (got {self.min_grad_norm})")

    @property
    def needs_gradient(self) -> bool:
        return self.min_grad_norm is not None

    def candidates(self, logits: Tensor) -> Tensor:
        """Boolean mask over look-ahead positions that pass the cheap (no-gradient) criteria."""
        confidence, entropy = confidence_and_entropy(logits)
        mask = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        if self.max_confidence is not None:
            mask &= confidence <= self.max_confidence
        if self.min_entropy is not None:
            mask &= entropy >= self.min_entropy
        return mask

    def passes_gradient(self, grad_norm: float) -> bool:
        return self.min_grad_norm is None or grad_norm >= self.min_grad_norm


@dataclass
class Sampler:
    """Every decision of the ∇-Reasoner loop besides the optimisation itself.

    Defaults follow the paper's MATH scripts: rollouts at temperature 0.6 / top-p 0.95, resampling after DTO at
    temperature 0.5 / top-p 0.95, a budget of 8 rollouts counting the first, and acceptance when the proposal's
    reward is strictly higher than the current rollout's.
    """

    rollout: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95))
    resample: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.5, top_p=0.95))
    selection: TokenSelection = field(default_factory=TokenSelection)
    rejection_sampling: bool = True
    acceptance_margin: float = 0.0
    max_rollouts: int = 8
    max_new_tokens: int = 256
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_rollouts < 1:
            raise ConfigurationError(f"max_rollouts must be >= 1 (got {self.max_rollouts}); 1 means plain sampling")
        if self.max_new_tokens < 1:
            raise ConfigurationError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.acceptance_margin < 0:
            raise ConfigurationError(f"acceptance_margin must be >= 0 (got {self.acceptance_margin})")

    def accepts(self, current_reward: float, proposal_reward: float) -> bool:
        """The acceptance rule: the proposal must beat the current rollout by more than the margin."""
        return proposal_reward > current_reward + self.acceptance_margin
