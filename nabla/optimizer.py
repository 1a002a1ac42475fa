"""Differentiable Textual Optimization (DTO): the per-position optimisation at the heart of ∇-Reasoner.

For a look-ahead ``a`` after prompt ``x`` and committed tokens ``c`` the loss is

    L(y) = -(reward_weight · r(x, c ⊕ y) + likelihood_weight · log π(y | x, c))

over straight-through one-hots ``y_i = onehot(t_i) + s_i - stopgrad(s_i)``, ``s_i = softmax(z_i / τ)``. The
paper writes ``L = -λ·r - log π``; since Adam is invariant to a common scale of the gradient, the two weights
act through their ratio ``λ = reward_weight / likelihood_weight`` (the authors' scripts use 1.0 and 1e-3, i.e.
λ = 1000). ``z_i`` are the position's logits ("logits" space) or ``lm_head(h_i)`` of a last-layer hidden state
("latents" space), always float32.

The forward value of ``y`` is a hard one-hot, so ``g = ∂L/∂y`` depends only on the forward tokens: it is
computed once and reused (exact *gradient caching*) until a forward token changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Literal

from nabla._typing import TYPE_CHECKING
from nabla.errors import ConfigurationError, RewardNotDifferentiableError, require_finite

if TYPE_CHECKING:  # torch is imported where it is used: the settings load without it (a fast `--help`)
    import torch
    from torch import Tensor

    from nabla.cost import CostMeter
    from nabla.policy import LMPrefix, Policy
    from nabla.reward import RewardContext, RewardModel


@dataclass
class ObjectiveValue:
    """The DTO loss at one hard text and its gradient with respect to the one-hots (``(T, V)``, float32)."""

    loss: float
    log_likelihood: float | None
    reward: float | None
    grad: Tensor

    @cached_property
    def finite(self) -> bool:
        """Loss and gradient are finite. Checked once per value: a cached DTO step reuses the value, and
        scanning its ``(T, V)`` gradient again at every step was a tenth of a pooled run's time."""
        import torch

        return math.isfinite(self.loss) and bool(torch.isfinite(self.grad).all())


class DTOObjective:
    """Evaluates ``L`` and ``∂L/∂y`` for one look-ahead after a fixed prefix (one LM and one RM forward and
    backward: four model calls, charged to ``charge`` — the per-kind parts for DTO steps, ``selector`` for the
    token-selection pass)."""

    def __init__(
        self,
        policy: Policy,
        reward: RewardModel | None,
        lm_prefix: LMPrefix,
        reward_context: RewardContext | None,
        *,
        reward_weight: float,
        likelihood_weight: float,
        meter: CostMeter | None = None,
        charge: Literal["dto", "selector"] = "dto",
    ) -> None:
        if reward_weight and (reward is None or not reward.differentiable or reward_context is None):
            raise RewardNotDifferentiableError(
                "DTO with reward_weight > 0 needs a differentiable reward model; pass one or set "
                "optimizer.reward_weight=0 (likelihood-only)"
            )
        self.policy, self.reward = policy, reward
        self.lm_prefix, self.reward_context = lm_prefix, reward_context
        self.reward_weight, self.likelihood_weight = reward_weight, likelihood_weight
        self.meter, self.charge = meter, charge

    def evaluate(self, tokens: Tensor) -> ObjectiveValue:
        """The loss at the hard look-ahead ``tokens`` (``(T,)``) and ``∂L/∂y`` there."""
        return DTOObjective.evaluate_batch([self], [tokens])[0]

    @staticmethod
    def evaluate_batch(objectives: Sequence[DTOObjective], tokens: Sequence[Tensor]) -> list[ObjectiveValue]:
        """:meth:`evaluate` of several objectives (same policy, reward and weights) with one batched forward and
        backward per model. Rows do not interact, so each row's gradient is its own objective's."""
        import torch

        first = objectives[0]
        policy, reward = first.policy, first.reward
        ys = [torch.nn.functional.one_hot(t, policy.vocab_size).float().requires_grad_(True) for t in tokens]
        losses = [torch.zeros((), device=y.device) for y in ys]
        likelihoods: list[float | None] = [None] * len(ys)
        rewards: list[float | None] = [None] * len(ys)
        if first.likelihood_weight:
            lls = policy.soft_log_likelihoods(ys, [o.lm_prefix for o in objectives])
            for b, (objective, ll) in enumerate(zip(objectives, lls)):
                total = ll.sum()
                losses[b] = losses[b] - objective.likelihood_weight * total
                likelihoods[b] = float(total.detach())
                objective._charge("lm", objective._lm_tokens(len(tokens[b])), len(tokens[b]) - 1)
        if first.reward_weight:
            assert reward is not None
            scores = reward.score_soft_batch(ys, [o.reward_context for o in objectives])  # type: ignore[misc]
            for b, (objective, score) in enumerate(zip(objectives, scores)):
                losses[b] = losses[b] - objective.reward_weight * score.to(losses[b].device)
                rewards[b] = float(score.detach())
                objective._charge("rm", objective._rm_tokens(len(tokens[b])), len(tokens[b]))
        total = torch.stack(losses).sum()
        grads = torch.autograd.grad(total, ys) if total.requires_grad else [torch.zeros_like(y) for y in ys]
        return [
            ObjectiveValue(float(loss.detach()), ll, r, grad.detach().float())
            for loss, ll, r, grad in zip(losses, likelihoods, rewards, grads)
        ]

    def _lm_tokens(self, lookahead: int) -> int:
        cached = self.lm_prefix.cache is not None
        return lookahead if cached else len(self.lm_prefix.ids) + lookahead - 1

    def _rm_tokens(self, lookahead: int) -> int:
        context = self.reward_context
        assert context is not None
        tail = lookahead + len(context.closing)
        return tail if context.cache is not None else tail + len(context.opening) + len(context.committed)

    def _charge(self, model: str, tokens: int, soft_tokens: int) -> None:
        if self.meter is None:
            return
        owner = self.policy if model == "lm" else self.reward
        flops = owner.forward_flops(tokens, soft_tokens)  # type: ignore[union-attr]
        if self.charge == "selector":
            self.meter.update("selector", 2, flops=3.0 * flops)
        else:
            self.meter.update(f"{model}_forward", 1, flops=flops)
            self.meter.update(f"{model}_backward", 1, flops=2.0 * flops)


@dataclass
class StepRecord:
    """One DTO step. ``loss``, ``log_likelihood`` and ``reward`` are exact at the step's forward text (cached steps
    reuse them because the text has not changed)."""

    step: int
    loss: float
    log_likelihood: float | None
    reward: float | None
    lr: float
    cached: bool
    changed_tokens: int
    update_norm: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DTOResult:
    """``grad_steps`` steps asked for the objective (a pass each); ``cached_steps`` reused a known one, the first
    step's being ``initial`` when ``first_step_cached``."""

    logits: Tensor
    tokens: Tensor
    history: list[StepRecord] = field(default_factory=list)
    grad_steps: int = 0
    cached_steps: int = 0
    stopped_on_nonfinite: bool = False
    first_step_cached: bool = False


@dataclass
class LatentOptimizer:
    """DTO settings and the optimisation loop (defaults: the paper's scripts).

    Args:
        space: ``"logits"`` optimises each position's logits; ``"latents"`` its last-layer hidden state.
        steps: Adam steps per DTO run.
        lr: peak learning rate; cosine decay to ``min_lr_ratio * lr`` after ``warmup_steps`` of linear warm-up.
        min_lr_ratio: the learning rate at the last step, as a share of ``lr``.
        warmup_steps: steps of linear warm-up before the cosine decay.
        reward_weight: the reward's weight in the loss (λ = reward_weight / likelihood_weight; 0: likelihood-only).
        likelihood_weight: the log-likelihood's weight in the loss, which holds the text near the policy.
        temperature: temperature τ of the straight-through softmax.
        gumbel: add fresh Gumbel noise to the straight-through forward at each step (off in the paper).
        update: ``"first"`` updates only the token being decided; ``"suffix"`` the whole look-ahead.
        gradient_caching: reuse ``∂L/∂y`` while the forward text is unchanged (exact).
        betas: Adam's decay rates of the gradient's first and second moments.
    """

    space: Literal["logits", "latents"] = "logits"
    steps: int = 20
    lr: float = 0.01
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    reward_weight: float = 1.0
    likelihood_weight: float = 1e-3
    temperature: float = 1.0
    gumbel: bool = False
    update: Literal["first", "suffix"] = "first"
    gradient_caching: bool = True
    betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        require_finite(self)
        if self.space not in ("logits", "latents"):
            raise ConfigurationError(f"space must be 'logits' or 'latents' (got {self.space!r})")
        if self.update not in ("first", "suffix"):
            raise ConfigurationError(f"update must be 'first' or 'suffix' (got {self.update!r})")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigurationError(f"steps must be a positive integer (got {self.steps}); set optimizer.steps >= 1")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigurationError(f"lr must be a positive number (got {self.lr}); set optimizer.lr > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigurationError(f"min_lr_ratio must be in [0, 1] (got {self.min_lr_ratio})")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ConfigurationError(f"warmup_steps must be in [0, steps] (got {self.warmup_steps})")
        if self.reward_weight < 0 or self.likelihood_weight < 0:
            raise ConfigurationError("reward_weight and likelihood_weight must be >= 0")
        if self.reward_weight == 0 and self.likelihood_weight == 0:
            raise ConfigurationError("reward_weight and likelihood_weight are both 0: DTO would have nothing to do")
        if not self.temperature > 0:
            raise ConfigurationError(f"temperature must be > 0 (got {self.temperature})")
        if len(self.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigurationError(f"betas must be two numbers in [0, 1) (got {self.betas})")

    @property
    def lam(self) -> float:
        """λ of the paper's ``L = -λ·r - log π`` (infinite for reward-only DTO)."""
        return self.reward_weight / self.likelihood_weight if self.likelihood_weight else math.inf

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def run(
        self,
        evaluate: Callable[[Tensor], ObjectiveValue],
        variable: Tensor,
        anchors: Tensor,
        *,
        head: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
        initial: ObjectiveValue | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> DTOResult:
        """Optimise ``variable`` (``(U, V)`` logits or ``(U, d)`` latents of the first ``U`` look-ahead positions).

        Args:
            evaluate: the objective at a hard look-ahead (``(T,)`` token ids).
            anchors: the look-ahead's current tokens (``(T,)``); positions past ``U`` stay fixed.
            head: latents → logits (required in latents space).
            initial: the objective at ``anchors`` when it is already known (from the selection pass).
        """
        loop = self.iterate(variable, anchors, head=head, generator=generator, initial=initial, on_step=on_step)
        try:
            tokens = next(loop)
            while True:
                tokens = loop.send(evaluate(tokens))
        except StopIteration as stop:
            return stop.value

    def iterate(
        self,
        variable: Tensor,
        anchors: Tensor,
        *,
        head: Callable[[Tensor], Tensor] | None = None,
        generator: torch.Generator | None = None,
        initial: ObjectiveValue | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
    ) -> Generator[Tensor, ObjectiveValue, DTOResult]:
        """:meth:`run` as a coroutine: it yields each hard look-ahead it needs the objective at and is sent the
        :class:`ObjectiveValue` back (so that the objectives of several prompts can be evaluated as one batch)."""
        import torch

        if self.space == "latents" and head is None:
            raise ConfigurationError("latents space needs the policy's LM head")
        to_logits = head if self.space == "latents" else (lambda v: v)
        z = variable.detach().float().clone().requires_grad_(True)
        start = z.detach().clone()
        rows = z.shape[0]
        adam = _Adam(z, self.betas)
        with torch.no_grad():
            first_argmax = to_logits(z).argmax(-1)
        cached = initial if self.gradient_caching else None
        cached_tokens = anchors.clone() if cached is not None else None
        result = DTOResult(logits=to_logits(z).detach(), tokens=anchors.clone())
        for step in range(self.steps):
            logits = to_logits(z)
            noise = self._gumbel(logits, generator) if self.gumbel else None
            forward_logits = logits if noise is None else logits + noise
            tokens = anchors.clone()
            tokens[:rows] = self._forward_tokens(forward_logits.detach(), first_argmax, anchors[:rows], noise is None)
            hit = cached is not None and cached_tokens is not None and torch.equal(tokens, cached_tokens)
            if hit:
                value = cached
                result.cached_steps += 1
                result.first_step_cached = result.first_step_cached or step == 0
            else:
                value = yield tokens
                result.grad_steps += 1
                if self.gradient_caching:
                    cached, cached_tokens = value, tokens
            assert value is not None
            if not value.finite:
                result.stopped_on_nonfinite = True
                break
            z.grad = None
            self._backward(value.grad[:rows], z, forward_logits, tokens[:rows], analytic=self.space == "logits")
            if z.grad is None or not torch.isfinite(z.grad).all():
                result.stopped_on_nonfinite = True
                break
            lr = self.lr * self.lr_factor(step)
            previous = z.detach().clone()
            adam.step(z.grad, lr)
            if not torch.isfinite(z).all():
                with torch.no_grad():
                    z.copy_(previous)
                result.stopped_on_nonfinite = True
                break
            record = StepRecord(
                step=step,
                loss=value.loss,
                log_likelihood=value.log_likelihood,
                reward=value.reward,
                lr=lr,
                cached=hit,
                changed_tokens=int((tokens[:rows] != anchors[:rows]).sum()),
                update_norm=float((z.detach() - start).norm()),
            )
            result.history.append(record)
            if on_step is not None:
                on_step(record)
        with torch.no_grad():
            result.logits = to_logits(z).detach().float()
        result.tokens = anchors.clone()
        result.tokens[:rows] = self._forward_tokens(result.logits, first_argmax, anchors[:rows], True)
        return result

    def _backward(self, grad_y: Tensor, z: Tensor, forward_logits: Tensor, tokens: Tensor, analytic: bool) -> None:
        """``z.grad`` of the surrogate ``<∂L/∂y, y(z)>`` with the straight-through ``y = hard + s - sg(s)``,
        ``s = softmax(forward_logits / τ)``: only ``s`` carries gradient. In logits space (``forward_logits`` is
        ``z`` plus constant noise) it is the softmax Jacobian in closed form, ``s ⊙ (g - <g, s>) / τ``, with no
        autograd graph (most DTO steps are cached ones, where that graph was most of the cost)."""
        import torch

        g = grad_y.to(forward_logits.device, torch.float32)
        if analytic:
            with torch.no_grad():
                soft = torch.softmax(forward_logits.detach() / self.temperature, dim=-1)
                z.grad = soft * (g - (g * soft).sum(-1, keepdim=True)) / self.temperature
            return
        soft = torch.softmax(forward_logits / self.temperature, dim=-1)
        hard = torch.nn.functional.one_hot(tokens, soft.shape[-1]).to(soft.dtype)
        y = hard + (soft - soft.detach())  # exactly `hard` forward: (s - s) is 0
        (g * y).sum().backward()

    @staticmethod
    def _forward_tokens(logits: Tensor, first_argmax: Tensor, anchors: Tensor, anchored: bool) -> Tensor:
        """The straight-through forward's tokens: a position shows its rollout token until the optimisation
        moves its argmax away from where it started (the rollout token is a sample, not always the argmax)."""
        import torch

        argmax = logits.argmax(-1)
        if not anchored:
            return argmax
        return torch.where(argmax == first_argmax.to(argmax.device), anchors.to(argmax.device), argmax)

    @staticmethod
    def _gumbel(logits: Tensor, generator: torch.Generator | None) -> Tensor:
        import torch

        uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float32).clamp_(1e-10, 1.0 - 1e-7)
        return -torch.log(-torch.log(uniform)).to(logits.device)


class _Adam:
    """Adam on one tensor, the arithmetic of ``torch.optim.Adam`` (no weight decay, no amsgrad) without its
    per-step dispatch overhead: DTO takes thousands of tiny steps, where that overhead dominated."""

    def __init__(self, parameter: Tensor, betas: tuple[float, float], eps: float = 1e-8) -> None:
        import torch

        self.parameter, self.betas, self.eps, self.steps = parameter, betas, eps, 0
        self.first = torch.zeros_like(parameter, memory_format=torch.preserve_format)
        self.second = torch.zeros_like(parameter, memory_format=torch.preserve_format)

    def step(self, grad: Tensor, lr: float) -> None:
        import torch

        beta1, beta2 = self.betas
        self.steps += 1
        with torch.no_grad():
            self.first.lerp_(grad, 1 - beta1)
            self.second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = lr / (1 - beta1**self.steps)
            denominator = (self.second.sqrt() / math.sqrt(1 - beta2**self.steps)).add_(self.eps)
            self.parameter.addcdiv_(self.first, denominator, value=-step_size)
