"""The test-time trainer: ``fit(prompt)`` runs ∇-Reasoner's decoding loop, one prompt as one small optimisation.

roll out ─► select the first position worth optimising (commit the ones before it) ─► DTO at it
─► resample the token ─► same token: commit it, keep the rollout
                       ─► new token: roll out a proposal ─► reward higher? adopt it : commit the original
─► until the rollout is fully committed or the rollout budget is spent
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from nabla.acceleration import Acceleration
from nabla.callbacks import Callback, LoggerCallback, ProgressBar
from nabla.cost import CostMeter
from nabla.errors import ConfigurationError, DeviceMismatchError, RewardNotDifferentiableError, check_seed
from nabla.kv import prefix_view
from nabla.optimizer import DTOObjective, DTOResult, LatentOptimizer, ObjectiveValue, StepRecord
from nabla.policy import LMPrefix, Policy, Rollout
from nabla.progress import mode as progress_mode
from nabla.reward import RewardContext, RewardModel, require_finite_rewards
from nabla.sampler import MetropolisMove, Sampler, metropolis_log_ratio, sample_tokens, sampling_probabilities
from nabla.scheduling import PromptPool


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
    acceptance_probability: float | None = None  # the Metropolis test's min(1, ratio), with acceptance=metropolis


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


def _reporting_exceptions(method: Callable[..., Any]) -> Callable[..., Any]:
    """Fire ``on_exception`` before an error (or an interrupt) leaves ``method``, so callbacks can clean up."""

    @functools.wraps(method)
    def wrapper(self: TestTimeTrainer, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException as error:
            self._hook("on_exception", error)
            raise

    return wrapper


class TestTimeTrainer:
    """Composes a :class:`Policy`, a :class:`RewardModel`, a :class:`LatentOptimizer` and a :class:`Sampler`.

    Args:
        reward: the reward; ``None`` is allowed for likelihood-only DTO without rejection sampling.
        acceleration: exact savings (all on by default; :meth:`Acceleration.reference` turns them off).
        callbacks: extra :class:`Callback` instances.
        logger: a Lightning logger that receives DTO steps and fit statistics.
        enable_progress_bar: show progress from the first token (:class:`ProgressBar`); ``None``: a bar when
            stderr is a terminal, nothing otherwise; ``True``: also plain lines elsewhere; ``False``: nothing.
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
        enable_progress_bar: bool | None = None,
    ) -> None:
        self.policy = policy
        self.reward = reward
        self.optimizer = optimizer or LatentOptimizer()
        self.sampler = sampler or Sampler()
        self.acceleration = acceleration or Acceleration()
        self.callbacks = list(callbacks or [])
        if logger is not None:
            self.callbacks.append(LoggerCallback(logger))
        shown = progress_mode(enable_progress_bar)
        if shown != "off" and not any(isinstance(callback, ProgressBar) for callback in self.callbacks):
            self.callbacks.append(ProgressBar(mode=shown))
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
        if self.sampler.acceptance == "metropolis" and optimizer.gumbel:
            raise ConfigurationError(
                "acceptance=metropolis needs the refined distribution, which Gumbel noise makes random; set "
                "optimizer.gumbel=false"
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

    @_reporting_exceptions
    def fit_batch(
        self, prompts: Sequence[str], seeds: int | Sequence[int] = 0, pool: int | None = None
    ) -> list[FitResult]:
        """Decode several prompts together; the results in the order given (:meth:`fit_pool`, collected).

        ``pool``: how many prompts decode at once (``None``: all of them), a finished prompt's slot refilled from
        the queue at once. Each prompt keeps its own generator (``seeds[i]``, or ``seeds + i`` for an int), so its
        result is the one ``fit(prompts[i], seed)`` gives, for any pool. No prompts, no results.
        """
        results = dict(self.fit_pool(prompts, seeds, pool))
        return [results[i] for i in range(len(prompts))]

    def fit_pool(
        self,
        prompts: Sequence[str],
        seeds: int | Sequence[int] = 0,
        pool: int | None = None,
        errors: tuple[type[Exception], ...] = (),
    ) -> Iterator[tuple[int, FitResult]]:
        """Continuous batching: yield ``(index, result)`` as each prompt finishes, ``pool`` prompts decoding at once.

        Every round, the pending rollouts of all running prompts are one batched generation and their objective
        evaluations one batched forward/backward per model (:meth:`_serve`); a finished prompt's slot is refilled
        from the queue at once (:class:`~nabla.scheduling.PromptPool`). ``wall_time_s`` of a result is its share
        of the run: its own loop's time plus an equal share of each round it was served in.

        ``errors``: error types that end one prompt instead of the run; such a prompt yields ``(index, error)``.
        """
        seeds = [seeds + i for i in range(len(prompts))] if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(prompts):
            raise ConfigurationError(f"{len(prompts)} prompts need {len(prompts)} seeds, got {len(seeds)}")
        for seed in seeds:
            check_seed(seed)
        encoded: dict[int, Tensor] = {}
        for index, prompt in enumerate(prompts):  # a bad prompt fails (or is set aside) before any decoding
            try:
                encoded[index] = self.policy.encode(prompt)
            except errors as error:
                yield index, error  # type: ignore[misc]
        queue = sorted(encoded)
        states: dict[int, DecodingState] = {}

        def start(slot: int) -> Generator[Request, Any, FitResult]:
            index = queue[slot]
            states[slot] = DecodingState(prompts[index], encoded[index], torch.Generator().manual_seed(seeds[index]))
            return self._decode(states[slot], seeds[index])

        scheduler = PromptPool(lambda requests: self._serve(states, requests), pool, catch=errors)
        for done in scheduler.run(len(queue), start):
            state, index = states.pop(done.index), queue[done.index]
            if done.error is not None:
                yield index, done.error  # type: ignore[misc]
                continue
            state.meter.update("wall_time_s", done.wall_time_s)
            result: FitResult = done.result
            result.stats = state.meter.snapshot()
            self._hook("on_fit_end", result)
            if index == len(prompts) - 1:
                self.meter = state.meter
            yield index, result

    def _decode(self, state: DecodingState, seed: int) -> Generator[Request, Any, FitResult]:
        """The loop of one prompt, as a coroutine that yields each rollout it needs (so rollouts of several
        prompts can run as one batch) and returns the result."""
        self._hook("on_fit_start", state)
        first = yield RolloutRequest(state.prompt_ids, self.sampler.max_new_tokens, None)
        state.adopt([], first, None)
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
        if self.sampler.acceptance == "metropolis":
            accepted = yield from self._accept_metropolis(state, position, dto, proposal, revision)
        else:
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

    def _serve(self, states: Mapping[int, DecodingState], requests: dict[int, Request]) -> dict[int, Any]:
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
            on_step=self._generation_hook(states),
        )
        for state in states:
            state.meter.update("rollouts")
        return rollouts

    def _generation_hook(self, states: list[DecodingState]) -> Callable[[list[int]], None] | None:
        """``on_generate`` for each row after every decoding step (progress from the first token)."""
        if not self.callbacks:
            return None
        return lambda counts: [self._hook("on_generate", state, count) for state, count in zip(states, counts)]

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

    def _accept_metropolis(
        self, state: DecodingState, position: int, dto: DTOResult, proposal: Rollout, revision: Revision
    ) -> Generator[Request, Any, bool]:
        """The Metropolis–Hastings test of ``ρ* ∝ π_ref · exp(λ r)`` for the loop's own proposal (docs/design.md,
        "Metropolis acceptance"). The reverse move needs the refined distribution at ``position`` on the proposal:
        one more DTO run there (its passes are charged like any DTO run's)."""
        assert state.rollout is not None and state.rollout.logits is not None
        committed, token = state.committed, revision.proposed_token
        self._accept(state, committed + [token] + proposal.token_ids, revision)  # both rewards, on the revision
        reverse = yield from self._optimise_proposal(state, position, token, proposal)
        lam = self.optimizer.lam if self.sampler.target_lam is None else self.sampler.target_lam
        assert revision.current_reward is not None and revision.proposal_reward is not None
        move = MetropolisMove(
            rewards=(revision.current_reward, revision.proposal_reward),
            base_logits=state.rollout.logits[position],
            tokens=(revision.original_token, token),
            refined=(self._resample_probabilities(dto), self._resample_probabilities(reverse)),
            tails=(
                (state.rollout.logits[position + 1 :], state.rollout.token_ids[position + 1 :]),
                (proposal.logits, proposal.token_ids),
            ),
        )
        log_ratio = metropolis_log_ratio(move, lam, self.sampler.rollout)
        probability = 0.0 if math.isnan(log_ratio) else math.exp(min(0.0, log_ratio))
        revision.acceptance_probability = probability
        return float(torch.rand(1, generator=state.generator, dtype=torch.float64)) < probability

    def _resample_probabilities(self, dto: DTOResult) -> Tensor:
        """The distribution the resampled token is drawn from (what :func:`sample_tokens` draws with)."""
        return sampling_probabilities(dto.logits[:1].cpu(), self.sampler.resample)[0]

    def _optimise_proposal(
        self, state: DecodingState, position: int, token: int, proposal: Rollout
    ) -> Generator[Request, Any, DTOResult]:
        """DTO at ``position`` as the loop would run it on the proposal: the same prefix and start (π_ref's logits
        or latents there), the look-ahead ``token ⊕ proposal``, the objective evaluated afresh."""
        assert state.rollout is not None and state.rollout.logits is not None
        anchors = torch.tensor([token] + proposal.token_ids, device=self.policy.device)
        rows = 1 if self.optimizer.update == "first" else len(anchors)
        latents = self.optimizer.space == "latents"
        here = state.rollout.hidden if latents else state.rollout.logits
        after = proposal.hidden if latents else proposal.logits
        assert here is not None
        parts = [here[position : position + 1]] + ([after[: rows - 1]] if rows > 1 and after is not None else [])
        steps = self.optimizer.iterate(
            torch.cat(parts), anchors, head=self.policy.head_logits, generator=state.generator
        )
        objective = self._objective(state, position)
        try:
            tokens = next(steps)
            while True:
                tokens = steps.send((yield GradientRequest(objective, tokens)))
        except StopIteration as stop:
            result: DTOResult = stop.value
        state.meter.update("dto_runs")
        state.meter.update("dto_passes", result.grad_steps)
        state.meter.update("grad_steps", result.grad_steps)
        state.meter.update("cached_steps", result.cached_steps)
        return result

    def _score(self, state: DecodingState, response: list[int]) -> float:
        """The reward of one full response; both candidates of an acceptance test go through here alone."""
        assert self.reward is not None
        text = self.policy.decode(response)
        scores = self.reward.score([state.prompt], [text], [response], meter=state.meter)
        return float(require_finite_rewards(self.reward, [state.prompt], [text], scores)[0])

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
        passes = result.grad_steps + fresh  # passes run for this run's steps (``fresh``: its first one)
        if result.first_step_cached:
            # the first step's gradient is the rollout's gradient at this very text, from a full pass (run now,
            # or earlier for token selection or another position): a gradient step, not a cached one
            result.grad_steps += 1
            result.cached_steps -= 1
        state.meter.update("dto_runs")
        state.meter.update("dto_passes", passes)
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
