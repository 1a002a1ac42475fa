"""Sampling settings, seeded token sampling, token selection and the acceptance rule.

The :class:`Sampler` owns every *decision* of the decoding loop (how to sample, which look-ahead position is
worth optimising, whether a proposal replaces the current rollout, when to stop); the :class:`~nabla.Policy`
owns the model compute.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from nabla._typing import TYPE_CHECKING
from nabla.errors import ConfigurationError, require_finite

if TYPE_CHECKING:  # torch is imported where it is used: the settings load without it (a fast `--help`)
    import torch
    from torch import Tensor

#: The response budget wherever one is set (the sampler, evaluation methods, baselines). SmolLM2-135M-Instruct
#: ends most answers to short word problems within it: 19 of 20 greedy and sampled responses to four prompts had
#: 23-186 tokens, one 303 (docs/user_guide.md, "Response length").
DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class SamplingConfig:
    """How one token is drawn from logits. ``temperature == 0`` is greedy.

    Args:
        temperature: the logits are divided by it before the softmax; 0 is greedy decoding.
        top_k: keep only the ``top_k`` most likely tokens (``null``: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p`` (``null``: all).
    """

    temperature: float = 0.6
    top_k: int | None = None
    top_p: float | None = 0.95

    def __post_init__(self) -> None:
        require_finite(self)
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
    import torch

    scores = logits.detach().to(torch.float64)
    if config.greedy:
        return torch.nn.functional.one_hot(scores.argmax(-1), scores.shape[-1]).to(torch.float64)
    scores = scores / config.temperature
    if config.top_k is not None and config.top_k < scores.shape[-1]:
        kth = torch.topk(scores, config.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    if config.top_p is not None and config.top_p < 1.0:
        probs = probs.masked_fill(~nucleus(probs, config.top_p), 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def nucleus(probs: Tensor, top_p: float, candidates: int = 256) -> Tensor:
    """The tokens top-p keeps (``(..., V)`` bool): those whose probability mass ranked above them is below
    ``top_p``. The nucleus is found among the ``candidates`` most likely tokens (4x more while a row's nucleus
    may reach past them), not by sorting the whole vocabulary: the same set as a full sort, ~10x cheaper at a
    49k vocabulary."""
    import torch

    vocab = probs.shape[-1]
    size = min(candidates, vocab)
    while True:
        # a small vocabulary is sorted whole, exactly as before this shortcut existed (ties keep their old order)
        top, order = torch.sort(probs, dim=-1, descending=True) if size == vocab else torch.topk(probs, size, dim=-1)
        inside = (top.cumsum(-1) - top) < top_p
        if size == vocab or not bool(inside[..., -1].any()):
            return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, inside)
        size = min(vocab, size * 4)


def sample_tokens(logits: Tensor, config: SamplingConfig, generators: list[torch.Generator]) -> Tensor:
    """One token per row of ``logits`` (``(B, V)``), row ``b`` drawn with ``generators[b]``.

    Inverse-CDF sampling on the CPU in float64 with one uniform per row: the draw of a row depends only on its
    own generator and logits, so a sequence samples the same tokens alone or inside any batch.
    """
    import torch

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
    import torch

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

    Args:
        max_confidence: optimise a position only if the policy's top probability there is at most this
            (``null``: no limit).
        min_entropy: optimise a position only if the policy's entropy there (nats) is at least this (``null``: no
            limit).
        min_grad_norm: optimise a position only if the DTO loss gradient's norm there is at least this; costs one
            gradient pass per rollout (``null``: not checked; the paper's MATH setting uses 4).
    """

    max_confidence: float | None = 0.97
    min_entropy: float | None = 0.25
    min_grad_norm: float | None = None

    def __post_init__(self) -> None:
        require_finite(self)
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
        import torch

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

    Args:
        rollout: how rollouts (the first one and every proposal) are sampled.
        resample: how the token is drawn again from DTO's refined logits.
        selection: which positions are worth optimising.
        rejection_sampling: adopt a proposal only if the acceptance rule says so; ``false`` adopts every proposal.
        acceptance_margin: a proposal must beat the current rollout's reward by more than this (``reward`` rule).
        acceptance: ``"reward"``, the paper's rule (adopt when the proposal's reward is higher); ``"metropolis"``,
            the Metropolis–Hastings test whose stationary law is ``ρ* ∝ π_ref · exp(λ r)`` (docs/design.md,
            "Metropolis acceptance": one more DTO run per proposal, for the reverse move).
        target_lam: λ of the Metropolis target (``null``: the optimizer's ``reward_weight / likelihood_weight``).
        max_rollouts: the rollout budget per prompt, the first rollout counted (1 is plain sampling).
        max_new_tokens: the longest response, in tokens.
        stop_strings: strings that end a response (besides the end-of-sequence token).
    """

    rollout: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95))
    resample: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.5, top_p=0.95))
    selection: TokenSelection = field(default_factory=TokenSelection)
    rejection_sampling: bool = True
    acceptance_margin: float = 0.0
    acceptance: Literal["reward", "metropolis"] = "reward"
    target_lam: float | None = None
    max_rollouts: int = 8
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        require_finite(self)
        if self.max_rollouts < 1:
            raise ConfigurationError(f"max_rollouts must be >= 1 (got {self.max_rollouts}); 1 means plain sampling")
        if self.max_new_tokens < 1:
            raise ConfigurationError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.acceptance_margin < 0:
            raise ConfigurationError(f"acceptance_margin must be >= 0 (got {self.acceptance_margin})")
        if self.acceptance not in ("reward", "metropolis"):
            raise ConfigurationError(f"acceptance must be 'reward' or 'metropolis' (got {self.acceptance!r})")
        if self.target_lam is not None and not self.target_lam >= 0:
            raise ConfigurationError(f"target_lam must be >= 0 or null (got {self.target_lam})")
        if self.acceptance == "metropolis" and not self.rejection_sampling:
            raise ConfigurationError("acceptance=metropolis is a rejection test; set sampler.rejection_sampling=true")
        if self.acceptance == "metropolis" and self.acceptance_margin:
            raise ConfigurationError("acceptance_margin belongs to the reward rule; set it to 0 with metropolis")

    def accepts(self, current_reward: float, proposal_reward: float) -> bool:
        """The acceptance rule: the proposal must beat the current rollout by more than the margin."""
        return proposal_reward > current_reward + self.acceptance_margin


@dataclass
class MetropolisMove:
    """One proposal of the ∇-Reasoner loop, from both ends: the current response ``y = c ⊕ a ⊕ u`` and the
    proposal ``y' = c ⊕ t ⊕ w`` differ from position ``i`` on (docs/design.md, "Metropolis acceptance").

    Args:
        rewards: ``(r(y), r(y'))``.
        base_logits: π_ref's logits at ``i`` after ``c`` (``(V,)``, temperature 1), the same for both.
        tokens: ``(a, t)``.
        refined: the resampling probabilities at ``i`` after DTO on ``y`` and on ``y'`` (``(V,)`` each).
        tails: ``((logits, tokens) of u, (logits, tokens) of w)``: each continuation and the logits it was drawn
            from (``(n, V)``, temperature 1; ``None`` for an empty one).
    """

    rewards: tuple[float, float]
    base_logits: Tensor
    tokens: tuple[int, int]
    refined: tuple[Tensor, Tensor]
    tails: tuple[tuple[Tensor | None, Sequence[int]], tuple[Tensor | None, Sequence[int]]]


def metropolis_log_ratio(move: MetropolisMove, lam: float, rollout: SamplingConfig) -> float:
    """``log [ρ*(y') Q(y'→y)] − log [ρ*(y) Q(y→y')]`` for the loop's proposal ``Q`` (token from the refined
    distribution, then a continuation drawn with ``rollout``); the test accepts with ``min(1, exp(·))``.

    With ``ρ* ∝ π_ref · exp(λ r)`` and ``Q(y→y') = q_i(t | y) · π_c(w | c ⊕ t)``, the prefix ``c`` cancels:

        λ·(r' − r) + log π_ref(t|c) − log π_ref(a|c) + log q_i(a | y') − log q_i(t | y)
                   + [log π_ref(w) − log π_c(w)] − [log π_ref(u) − log π_c(u)],

    and the bracketed continuation terms vanish when rollouts sample π_ref itself (temperature 1, no truncation).
    """
    import torch

    current, proposal = move.tokens
    base = torch.log_softmax(move.base_logits.detach().double().cpu(), dim=-1)
    forward, reverse = (p.detach().double().cpu() for p in move.refined)
    value = lam * (move.rewards[1] - move.rewards[0]) + float(base[proposal] - base[current])
    value += math.log(float(reverse[current])) if float(reverse[current]) > 0 else -math.inf
    value -= math.log(float(forward[proposal]))
    current_tail, proposal_tail = (_continuation_ratio(logits, ids, rollout) for logits, ids in move.tails)
    return value + proposal_tail - current_tail


def _continuation_ratio(logits: Tensor | None, tokens: Sequence[int], rollout: SamplingConfig) -> float:
    """``log π_ref(tokens) − log π_c(tokens)`` of a continuation drawn with ``rollout`` from ``logits``."""
    import torch

    if logits is None or not len(tokens):
        return 0.0
    if rollout.temperature == 1.0 and rollout.top_k is None and rollout.top_p in (None, 1.0):
        return 0.0
    index = torch.tensor(list(tokens))[:, None]
    scores = logits[: len(tokens)].detach().double().cpu()
    reference = torch.log_softmax(scores, dim=-1).gather(1, index).sum()
    drawn = sampling_probabilities(scores, rollout).gather(1, index).log().sum()
    return float(reference - drawn)
