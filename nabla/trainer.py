"""The test-time trainer: ``fit(prompt)`` runs ∇-Reasoner's decoding loop, one prompt as one small optimisation.

roll out ─► select the first position worth optimising (commit the ones before it) ─► DTO at it
─► resample the token ─► same token: commit it, keep the rollout
                       ─► new token: roll out a proposal ─► reward higher? adopt it : commit the original
─► until the rollout is fully committed or the rollout budget is spent
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from nabla.callbacks import Callback, LoggerCallback, ProgressBar
from nabla.cost import CostMeter
from nabla.errors import ConfigurationError, DeviceMismatchError, RewardNotDifferentiableError
from nabla.kv import prefix_view
from nabla.optimizer import DTOObjective, DTOResult, LatentOptimizer, ObjectiveValue, StepRecord
from nabla.policy import LMPrefix, Policy, Rollout
from nabla.reward import RewardContext, RewardModel
from nabla.sampler import Sampler, sample_tokens


@dataclass
class Acceleration:
    """Exact savings of the loop; none of them changes the decoded tokens.

    Args:
        prefix_cache: reuse the key/value states of prompt ⊕ committed tokens across DTO steps (policy and
            reward model) instead of re-encoding them at every step.
        reuse_rollout_gradient: one gradient pass per rollout serves token selection at every position and the
            first DTO step at each selected position (causality: committing leading tokens unchanged leaves the
            gradient of the later one-hots as it was).
        reuse_rollout_cache: proposals continue from the current rollout's key/value states.
        reuse_rollout_reward: the current rollout's reward is computed once, not at every acceptance test.
    """

    prefix_cache: bool = True
    reuse_rollout_gradient: bool = True
    reuse_rollout_cache: bool = True
    reuse_rollout_reward: bool = True

    @classmethod
    def reference(cls) -> Acceleration:
        """Everything recomputed every time (the authors' release, for debugging and benchmarks)."""
        return cls(False, False, False, False)


@dataclass
class RolloutRequest:
    """A rollout the loop of one prompt needs: continue ``context`` for at most ``budget`` tokens, reusing
    ``cache`` (states of a leading part of ``context``) when given."""

    context: Tensor
    budget: int
    cache: Any = None


@dataclass
class GradientRequest:
    """An objective evaluation the loop of one prompt needs: ``objective`` at the hard look-ahead ``tokens``."""

    objective: DTOObjective
    tokens: Tensor


Request = RolloutRequest | GradientRequest


@dataclass
class Revision:
    """A token that DTO and resampling changed, and what the acceptance test made of it."""

    position: int
    original_token: int
    proposed_token: int
    original_text: str
    proposed_text: str
    current_reward: float | None
    proposal_reward: float | None
    accepted: bool | None = None


@dataclass
class DTORun:
    """One DTO run: where, which token it started from and which it resampled, and its steps."""

    position: int
    original_token: int
    sampled_token: int
    outcome: str
    grad_steps: int
    cached_steps: int
    steps: list[StepRecord]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps"] = [step.to_dict() for step in self.steps]
        return out


@dataclass
class FitResult:
    """What ``fit`` returns: the response, its reward, the full cost accounting and the loop's history."""

    prompt: str
    text: str
    token_ids: list[int]
    reward: float | None
    finish_reason: str
    stats: dict[str, float]
    revisions: list[Revision] = field(default_factory=list)
    dto_runs: list[DTORun] = field(default_factory=list)
    seed: int = 0

    def to_dict(self, history: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": self.prompt,
            "text": self.text,
            "token_ids": self.token_ids,
            "reward": self.reward,
            "finish_reason": self.finish_reason,
            "seed": self.seed,
            "stats": self.stats,
            "revisions": [asdict(r) for r in self.revisions],
        }
        if history:
            out["dto_runs"] = [run.to_dict() for run in self.dto_runs]
        return out


@dataclass
class DecodingState:
    """The one mutable thing of the loop. The committed response is ``base`` (tokens committed before the
    current rollout started) followed by the first ``cursor`` tokens of ``rollout``."""

    prompt: str
    prompt_ids: Tensor
    generator: torch.Generator
    base: list[int] = field(default_factory=list)
    rollout: Rollout | None = None
    cursor: int = 0
    rollout_reward: float | None = None
    rollout_gradient: tuple[int, ObjectiveValue] | None = None
    reward_context: RewardContext | None = None
    meter: CostMeter = field(default_factory=CostMeter)

    @property
    def committed(self) -> list[int]:
        assert self.rollout is not None
        return self.base + self.rollout.token_ids[: self.cursor]

    @property
    def response(self) -> list[int]:
        """The whole current response: committed tokens and the rest of the rollout."""
        assert self.rollout is not None
        return self.base + self.rollout.token_ids

    def adopt(self, base: list[int], rollout: Rollout, reward: float | None) -> None:
        self.base, self.rollout, self.cursor = base, rollout, 0
        self.rollout_reward, self.rollout_gradient = reward, None


class TestTimeTrainer:
    """Composes a :class:`Policy`, a :class:`RewardModel`, a :class:`LatentOptimizer` and a :class:`Sampler`.

    Args:
        reward: the reward; ``None`` is allowed for likelihood-only DTO without rejection sampling.
        acceleration: exact savings (all on by default; :meth:`Acceleration.reference` turns them off).
        callbacks: extra :class:`Callback` instances.
        logger: a Lightning logger that receives DTO steps and fit statistics.
        enable_progress_bar: show a rich progress bar while fitting.
    """

    __test__ = False  # not a pytest class

    def __init__(
        self,
        policy: Policy,
        reward: RewardModel | None,
        optimizer: LatentOptimizer | None = None,
        sampler: Sampler | None = None,
        *,
        acceleration: Acceleration | None = None,
        callbacks: list[Callback] | None = None,
        logger: Any = None,
        enable_progress_bar: bool = False,
    ) -> None:
        self.policy = policy
        self.reward = reward
        self.optimizer = optimizer or LatentOptimizer()
        self.sampler = sampler or Sampler()
        self.acceleration = acceleration or Acceleration()
        self.callbacks = list(callbacks or [])
        if logger is not None:
            self.callbacks.append(LoggerCallback(logger))
        if enable_progress_bar:
            self.callbacks.append(ProgressBar())
        self._validate()
        if reward is not None:
            reward.bind(policy)
        self.meter = CostMeter()

    def _validate(self) -> None:
        reward, optimizer = self.reward, self.optimizer
        if reward is None:
            if optimizer.reward_weight:
                raise ConfigurationError("no reward model given; pass one or set optimizer.reward_weight=0")
            if self.sampler.rejection_sampling:
                raise ConfigurationError(
                    "rejection sampling needs a reward model; set sampler.rejection_sampling=false"
                )
            return
        if optimizer.reward_weight and not reward.differentiable:
            raise RewardNotDifferentiableError(
                f"{type(reward).__name__} has no gradient but optimizer.reward_weight={optimizer.reward_weight}; "
                "use a transformer reward model for DTO, or set optimizer.reward_weight=0"
            )
        if reward.device is not None and reward.device != self.policy.device:
            raise DeviceMismatchError(
                f"the policy is on {self.policy.device} and the reward model on {reward.device}; "
                "load both on the same device"
            )

    def reference(self) -> TestTimeTrainer:
        """The same trainer with every exact saving off (prefix caches, gradient reuse and caching)."""
        twin = TestTimeTrainer.__new__(TestTimeTrainer)
        twin.__dict__.update(self.__dict__)
        twin.optimizer = replace(self.optimizer, gradient_caching=False)
        twin.acceleration = Acceleration.reference()
        twin.meter = CostMeter()
        return twin

    # ------------------------------------------------------------------ the loop
    def fit(self, prompt: str, seed: int = 0) -> FitResult:
        """Decode one prompt with ∇-Reasoner; deterministic for a given ``seed`` on CPU."""
        return self.fit_batch([prompt], seeds=[seed])[0]

    def fit_batch(self, prompts: Sequence[str], seeds: int | Sequence[int] = 0) -> list[FitResult]:
        """Decode several prompts at once: their rollouts run as one batch, everything else per prompt.

        Each prompt keeps its own generator (``seeds[i]``, or ``seeds + i`` for an int), so its result is the
        one ``fit(prompts[i], seed)`` gives. ``wall_time_s`` of each result is the batch's time over its size.
        """
        seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(prompts):
            raise ConfigurationError(f"{len(prompts)} prompts need {len(prompts)} seeds, got {len(seeds)}")
        started = time.perf_counter()
        states = [
            DecodingState(prompt, self.policy.encode(prompt), torch.Generator().manual_seed(seed))
            for prompt, seed in zip(prompts, seeds)
        ]
        loops = {i: self._decode(state, seed) for i, (state, seed) in enumerate(zip(states, seeds))}
        requests: dict[int, Request] = {i: next(loop) for i, loop in loops.items()}
        results: dict[int, FitResult] = {}
        while requests:
            for i, answer in self._serve(states, requests).items():
                try:
                    requests[i] = loops[i].send(answer)
                except StopIteration as stop:
                    results[i] = stop.value
                    del requests[i]
        share = (time.perf_counter() - started) / len(prompts)
        for i, state in enumerate(states):
            state.meter.update("wall_time_s", share)
            results[i].stats = state.meter.snapshot()
            self._hook("on_fit_end", results[i])
        self.meter = states[-1].meter
        return [results[i] for i in range(len(prompts))]

    def _decode(self, state: DecodingState, seed: int) -> Generator[Request, Any, FitResult]:
        """The loop of one prompt, as a coroutine that yields each rollout it needs (so rollouts of several
        prompts can run as one batch) and returns the result."""
        first = yield RolloutRequest(state.prompt_ids, self.sampler.max_new_tokens, None)
        state.adopt([], first, None)
        self._hook("on_fit_start", state)
        self._hook("on_rollout", state, first)
        revisions: list[Revision] = []
        runs: list[DTORun] = []
        assert state.rollout is not None
        while state.cursor < len(state.rollout) and state.meter.snapshot()["rollouts"] < self.sampler.max_rollouts:
            position = yield from self._select(state)
            if position is None:
                break
            state.cursor = position
            run, revision = yield from self._revise(state, position)
            runs.append(run)
            if revision is not None:
                revisions.append(revision)
        state.cursor = len(state.rollout)
        return self._finish(state, revisions, runs, seed)

    def _revise(self, state: DecodingState, position: int) -> Generator[Request, Any, tuple[DTORun, Revision | None]]:
        """DTO at ``position``, resample, and (for a new token) propose and test a new rollout."""
        assert state.rollout is not None
        dto = yield from self._optimise(state, position)
        token = int(sample_tokens(dto.logits[:1], self.sampler.resample, [state.generator])[0])
        original = state.rollout.token_ids[position]
        run = DTORun(
            position=len(state.base) + position,
            original_token=original,
            sampled_token=token,
            outcome="kept",
            grad_steps=dto.grad_steps,
            cached_steps=dto.cached_steps,
            steps=dto.history,
        )
        if token == original:
            state.cursor = position + 1
            return run, None
        committed = state.committed
        proposal = yield from self._propose(state, committed, token)
        revision = Revision(
            position=len(committed),
            original_token=original,
            proposed_token=token,
            original_text=self.policy.decode([original]),
            proposed_text=self.policy.decode([token]),
            current_reward=None,
            proposal_reward=None,
        )
        self._hook("on_revision", state, revision)
        accepted = self._accept(state, committed + [token] + proposal.token_ids, revision)
        revision.accepted = accepted
        state.meter.update("proposals")
        if accepted:
            state.meter.update("acceptances")
            run.outcome = "accepted"
            state.adopt(committed + [token], proposal, revision.proposal_reward)
            self._hook("on_rollout", state, proposal)
            self._hook("on_accept", state, revision)
        else:
            state.meter.update("rejections")
            run.outcome = "rejected"
            state.cursor = position + 1
            self._hook("on_reject", state, revision)
        return run, revision

    def _serve(self, states: list[DecodingState], requests: dict[int, Request]) -> dict[int, Any]:
        """Answer every pending request: all rollouts as one batched generation, all objective evaluations as
        one batched forward/backward per model."""
        answers: dict[int, Any] = {}
        rollouts = [i for i in sorted(requests) if isinstance(requests[i], RolloutRequest)]
        gradients = [i for i in sorted(requests) if isinstance(requests[i], GradientRequest)]
        if rollouts:
            done = self._generate([states[i] for i in rollouts], [requests[i] for i in rollouts])  # type: ignore[misc]
            answers.update(zip(rollouts, done))
        if gradients:
            pending: list[GradientRequest] = [requests[i] for i in gradients]  # type: ignore[misc]
            values = DTOObjective.evaluate_batch([r.objective for r in pending], [r.tokens for r in pending])
            answers.update(zip(gradients, values))
        return answers

    # ------------------------------------------------------------------ rollouts
    def _generate(self, states: list[DecodingState], requests: list[RolloutRequest]) -> list[Rollout]:
        """Every pending rollout of a batch of prompts in one batched generation, each with its own generator."""
        rollouts = self.policy.generate(
            [request.context for request in requests],
            self.sampler.rollout,
            [state.generator for state in states],
            [request.budget for request in requests],
            stop_strings=self.sampler.stop_strings,
            record_logits=True,
            record_hidden=self.optimizer.space == "latents",
            caches=[request.cache for request in requests],
            keep_cache=True,
            meter=[state.meter for state in states],
        )
        for state in states:
            state.meter.update("rollouts")
        return rollouts

    def _propose(self, state: DecodingState, committed: list[int], token: int) -> Generator[Request, Any, Rollout]:
        """The policy's continuation after ``committed ⊕ token``."""
        assert state.rollout is not None
        context = torch.cat([state.prompt_ids, torch.tensor(committed + [token], device=state.prompt_ids.device)])
        budget = self.sampler.max_new_tokens - len(committed) - 1
        if token in self.policy.eos_token_ids or budget < 1:
            state.meter.update("rollouts")
            return Rollout([], "eos" if token in self.policy.eos_token_ids else "length", len(context))
        cache = None
        if self.acceleration.reuse_rollout_cache and state.rollout.cache is not None:
            cache = prefix_view(state.rollout.cache, len(context) - 1)
        return (yield RolloutRequest(context, budget, cache))

    def _accept(self, state: DecodingState, proposal: list[int], revision: Revision) -> bool:
        if not self.sampler.rejection_sampling:
            return True
        current = state.rollout_reward
        if current is None or not self.acceleration.reuse_rollout_reward:
            current = self._score(state, state.response)
            state.rollout_reward = current
        revision.current_reward = current
        revision.proposal_reward = self._score(state, proposal)
        return self.sampler.accepts(current, revision.proposal_reward)

    def _score(self, state: DecodingState, response: list[int]) -> float:
        """The reward of one full response; both candidates of an acceptance test go through here alone."""
        assert self.reward is not None
        text = self.policy.decode(response)
        return float(self.reward.score([state.prompt], [text], [response], meter=state.meter)[0])

    # ------------------------------------------------------------------ token selection
    def _select(self, state: DecodingState) -> Generator[Request, Any, int | None]:
        """The first look-ahead position at or after the cursor that qualifies for optimisation."""
        assert state.rollout is not None and state.rollout.logits is not None
        selection = self.sampler.selection
        mask = selection.candidates(state.rollout.logits[state.cursor :])
        for offset in torch.nonzero(mask).flatten().tolist():
            position = state.cursor + offset
            if not selection.needs_gradient:
                return position
            value = yield from self._gradient_at(state, position, charge="selector")
            if selection.passes_gradient(float(value.grad[0].norm())):
                return position
        return None

    def _gradient_at(self, state: DecodingState, position: int, charge: str) -> Generator[Request, Any, ObjectiveValue]:
        """``∂L/∂y`` of the look-ahead from ``position`` on, its row 0 at ``position``.

        With gradient reuse one pass per rollout (from the cursor at first need) serves every later position;
        otherwise each call is a fresh pass.
        """
        if charge == "selector" and (not self.acceleration.reuse_rollout_gradient or state.rollout_gradient is None):
            state.meter.update("selector_passes")
        if not self.acceleration.reuse_rollout_gradient:
            objective = self._objective(state, position, charge)
            return (yield GradientRequest(objective, self._lookahead(state, position)))
        if state.rollout_gradient is None:
            start = state.cursor
            objective = self._objective(state, start, charge)
            state.rollout_gradient = (start, (yield GradientRequest(objective, self._lookahead(state, start))))
        start, value = state.rollout_gradient
        return replace(value, grad=value.grad[position - start :])

    def _lookahead(self, state: DecodingState, position: int) -> Tensor:
        assert state.rollout is not None
        return torch.tensor(state.rollout.token_ids[position:], device=self.policy.device)

    # ------------------------------------------------------------------ DTO
    def _objective(self, state: DecodingState, position: int, charge: str = "dto") -> DTOObjective:
        assert state.rollout is not None
        committed = state.base + state.rollout.token_ids[:position]
        ids = torch.cat([state.prompt_ids, torch.tensor(committed, dtype=torch.long, device=state.prompt_ids.device)])
        prefix = LMPrefix(ids, state.rollout.cache if self.acceleration.prefix_cache else None)
        return DTOObjective(
            self.policy,
            self.reward,
            prefix,
            self._reward_context(state, committed) if self.optimizer.reward_weight else None,
            reward_weight=self.optimizer.reward_weight,
            likelihood_weight=self.optimizer.likelihood_weight,
            meter=state.meter,
            charge="selector" if charge == "selector" else "dto",
        )

    def _reward_context(self, state: DecodingState, committed: list[int]) -> RewardContext:
        assert self.reward is not None
        if not self.acceleration.prefix_cache:
            return self.reward.context(state.prompt, committed, use_cache=False, meter=state.meter)
        if state.reward_context is None:
            state.reward_context = self.reward.context(state.prompt, committed, use_cache=True, meter=state.meter)
        else:
            known = len(state.reward_context.committed)
            if state.reward_context.committed.tolist() != committed[:known]:
                raise RuntimeError("committed tokens changed under the reward model's prefix cache")
            state.reward_context = self.reward.extend(state.reward_context, committed[known:], meter=state.meter)
        return state.reward_context

    def _optimise(self, state: DecodingState, position: int) -> Generator[Request, Any, DTOResult]:
        assert state.rollout is not None and state.rollout.logits is not None
        anchors = self._lookahead(state, position)
        rows = 1 if self.optimizer.update == "first" else len(anchors)
        if self.optimizer.space == "latents":
            assert state.rollout.hidden is not None
            variable = state.rollout.hidden[position : position + rows]
        else:
            variable = state.rollout.logits[position : position + rows]
        initial = None
        fresh = False
        if self.acceleration.reuse_rollout_gradient and self.optimizer.gradient_caching:
            fresh = state.rollout_gradient is None
            initial = yield from self._gradient_at(state, position, charge="dto")
        steps = self.optimizer.iterate(
            variable,
            anchors,
            head=self.policy.head_logits,
            generator=state.generator,
            initial=initial,
            on_step=lambda record: self._hook("on_dto_step", state, record),
        )
        objective: DTOObjective | None = None
        try:
            tokens = next(steps)
            while True:
                objective = objective or self._objective(state, position)
                tokens = steps.send((yield GradientRequest(objective, tokens)))
        except StopIteration as stop:
            result: DTOResult = stop.value
        if fresh:  # the first step's gradient was computed for this run: a full step, not a cached one
            result.grad_steps += 1
            result.cached_steps -= 1
        state.meter.update("dto_runs")
        state.meter.update("grad_steps", result.grad_steps)
        state.meter.update("cached_steps", result.cached_steps)
        return result

    # ------------------------------------------------------------------ end
    def _finish(self, state: DecodingState, revisions: list[Revision], runs: list[DTORun], seed: int) -> FitResult:
        assert state.rollout is not None
        response = state.response
        reward = state.rollout_reward
        if self.reward is not None and reward is None:
            reward = self._score(state, response)
        return FitResult(
            prompt=state.prompt,
            text=self.policy.decode(response),
            token_ids=response,
            reward=reward,
            finish_reason=state.rollout.finish_reason,
            stats=state.meter.snapshot(),
            revisions=revisions,
            dto_runs=runs,
            seed=seed,
        )

    def _hook(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, name)(self, *args)
