"""∇-Reasoner's decoding loop as an exact Markov chain on the enumerable world.

With token selection off, the loop visits positions ``0, 1, …`` of the current response once each. At position ``i``
it runs DTO on the current response ``y``, resamples the token from the refined distribution ``q_i(·|y)`` and, for a
new token ``t``, draws a continuation ``w`` with the rollout sampling and tests ``y' = y_<i ⊕ t ⊕ w``: the transition

    K_i(y → y') = q_i(t | y) · π_c(w | y_<i ⊕ t) · α(y, y')

with ``α = 𝟙[r(y') > r(y)]`` (the paper's rule) or the Metropolis–Hastings probability (``sampler.acceptance:
metropolis``, docs/design.md). Here every response and continuation is enumerated: :func:`loop_kernel` is the exact
``K_i`` (the loop's own DTO runs, the library's acceptance ratio), and :func:`loop_law` the exact law of the loop's
output, ``π_ref · K_0 · K_1 · …`` (one sweep is the loop; more sweeps are what a longer chain would reach).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nabla.policy import Rollout
from nabla.sampler import MetropolisMove, metropolis_log_ratio, sampling_probabilities
from nabla.trainer import DecodingState

if TYPE_CHECKING:
    from nabla.trainer import TestTimeTrainer
    from nabla.worlds.enumerable.world import EnumerableWorld


class LoopChain:
    """The loop's pieces for one prompt, each computed once: π_ref's logits of every (prefix, tokens) pair and
    the refined distribution of every (response, position)."""

    def __init__(self, world: EnumerableWorld, trainer: TestTimeTrainer, prompt: str) -> None:
        self.world, self.trainer, self.prompt = world, trainer, prompt
        self.prompt_ids = world.policy.encode(prompt).tolist()
        self.responses = world.responses()
        self.index = world.index()
        self.rewards = world.rewards(prompt)
        self._rollouts: dict[tuple[tuple[int, ...], tuple[int, ...]], Rollout] = {}
        self._refined: dict[tuple[tuple[int, ...], int], Tensor] = {}

    @torch.no_grad()
    def rollout(self, context: tuple[int, ...], tokens: tuple[int, ...]) -> Rollout:
        """``tokens`` after ``context`` as a rollout, with π_ref's logits (temperature 1) that drew each."""
        key = (context, tokens)
        if key not in self._rollouts:
            ids = torch.tensor([list(context) + list(tokens)])
            out = self.world.policy.model(input_ids=ids).logits[0].float()
            logits = out[len(context) - 1 : len(context) - 1 + len(tokens)]
            eos = bool(tokens) and tokens[-1] in self.world.policy.eos_token_ids
            self._rollouts[key] = Rollout(list(tokens), "eos" if eos else "length", len(context), logits=logits)
        return self._rollouts[key]

    def state(self, response: tuple[int, ...], position: int) -> DecodingState:
        """The loop's state at ``response`` with the cursor at ``position``."""
        state = DecodingState(self.prompt, torch.tensor(self.prompt_ids), torch.Generator().manual_seed(0))
        rollout = self.rollout(tuple(self.prompt_ids), response)
        state.adopt([], rollout, float(self.rewards[self.index[response]]))
        state.cursor = position
        return state

    def refined(self, response: tuple[int, ...], position: int) -> Tensor:
        """``q_i(·|y)``: the resampling distribution after the loop's DTO run at ``position`` of ``response``."""
        key = (response, position)
        if key not in self._refined:
            trainer = self.trainer
            dto = _drive(trainer._optimise(self.state(response, position), position))
            self._refined[key] = trainer._resample_probabilities(dto)
        return self._refined[key]

    def continuation(self, context: tuple[int, ...], tokens: tuple[int, ...]) -> float:
        """``π_c(tokens | context)`` under the rollout sampling."""
        if not tokens:
            return 1.0
        probs = sampling_probabilities(self.rollout(context, tokens).logits, self.trainer.sampler.rollout)
        return math.prod(float(probs[j, t]) for j, t in enumerate(tokens))

    def acceptance(self, current: tuple[int, ...], proposal: tuple[int, ...], position: int, rule: str) -> float:
        """``α(y, y')`` by ``rule``: ``"metropolis"``, ``"reward"`` (the paper's ``r(y') > r(y)``) or ``"always"``
        (no rejection)."""
        rewards = float(self.rewards[self.index[current]]), float(self.rewards[self.index[proposal]])
        if rule == "always":
            return 1.0
        if rule == "reward":
            return float(rewards[1] > rewards[0] + self.trainer.sampler.acceptance_margin)
        context = tuple(self.prompt_ids) + current[:position]
        here = self.rollout(tuple(self.prompt_ids), current)
        move = MetropolisMove(
            rewards=rewards,
            base_logits=here.logits[position],  # type: ignore[index]
            tokens=(current[position], proposal[position]),
            refined=(self.refined(current, position), self.refined(proposal, position)),
            tails=(
                (here.logits[position + 1 :], list(current[position + 1 :])),  # type: ignore[index]
                self._tail(context + (proposal[position],), proposal[position + 1 :]),
            ),
        )
        sampler = self.trainer.sampler
        lam = self.trainer.optimizer.lam if sampler.target_lam is None else sampler.target_lam
        log_ratio = metropolis_log_ratio(move, lam, sampler.rollout)
        return 0.0 if math.isnan(log_ratio) else math.exp(min(0.0, log_ratio))

    def _tail(self, context: tuple[int, ...], tokens: tuple[int, ...]) -> tuple[Tensor | None, list[int]]:
        return (self.rollout(context, tokens).logits if tokens else None), list(tokens)


def loop_kernel(chain: LoopChain, position: int, rule: str = "metropolis") -> Tensor:
    """The loop's exact transition at ``position`` over the world's responses (``(n, n)``, rows sum to one);
    responses no longer than ``position`` are left alone."""
    responses = chain.responses
    matrix = torch.zeros((len(responses), len(responses)), dtype=torch.float64)
    for a, current in enumerate(responses):
        if len(current) <= position:
            matrix[a, a] = 1.0
            continue
        refined = chain.refined(current, position)
        for b, other in enumerate(responses):
            if len(other) <= position or other[:position] != current[:position] or other[position] == current[position]:
                continue
            token = other[position]
            move = float(refined[token])
            if move == 0.0:
                continue
            move *= chain.continuation(tuple(chain.prompt_ids) + other[: position + 1], other[position + 1 :])
            matrix[a, b] = move * chain.acceptance(current, other, position, rule)
        matrix[a, a] = 1.0 - matrix[a].sum()
    return matrix


def loop_law(chain: LoopChain, rule: str = "metropolis", sweeps: int = 1, start: Tensor | None = None) -> Tensor:
    """The exact law of the loop's output after ``sweeps`` left-to-right sweeps from ``start`` (default: π_ref,
    the law of the first rollout when rollouts sample π_ref itself); one sweep is the loop, when its rollout budget
    does not bind (it does not on this world: at most one proposal per position)."""
    law = chain.world.log_probs(chain.prompt).exp() if start is None else start
    kernels = [loop_kernel(chain, position, rule) for position in range(chain.world.max_new_tokens)]
    for _ in range(sweeps):
        for kernel in kernels:
            law = law @ kernel
    return law


def _drive(coroutine):  # type: ignore[no-untyped-def]
    """Run one of the trainer's coroutines alone, answering each objective request at once."""
    try:
        request = next(coroutine)
        while True:
            request = coroutine.send(request.objective.evaluate(request.tokens))
    except StopIteration as stop:
        return stop.value
