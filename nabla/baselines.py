"""Baselines of ∇-Reasoner, built from the same :class:`~nabla.Policy`, :class:`~nabla.RewardModel` and
:class:`~nabla.CostMeter` kinds, so that every method is compared at a cost counted the same way.

Public API:

- :class:`Baselines` ``(policy, reward=None, sampling=SamplingConfig(), max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
  stop_strings=())``
  with ``greedy(prompt)``, ``sampling(prompt, n=1, seed)``, ``self_consistency(prompt, n, seed)``,
  ``best_of_n(prompt, n, seed)``, ``weighted_majority(prompt, n, seed)`` and ``run(name, prompt, n, seed)``; each
  returns a :class:`BaselineResult` (the chosen response, its extracted answer and reward, every sample, and the
  cost ``stats`` in the kinds of ``FitResult.stats``); ``run_pool(name, prompts, n, seeds, pool)`` runs one of them
  over several prompts with continuous batching (samples of ``pool`` prompts share each batched generation).
- ``majority_vote(answers, weights=None) -> int | None``: the index of the sample whose answer wins the vote.
- ``derive_seed(*parts) -> int`` and ``row_generators(seed, n) -> list[torch.Generator]``: seeds that depend only on
  what they are derived from (a problem's seed from the run seed and the problem id; sample ``i``'s generator from
  the problem seed and ``i``), so results never depend on sharding, batching or order, and the first ``k`` of ``n``
  samples are the ``k`` samples of a run with ``n = k``.

Conventions. The prompt is ``Policy.encode(prompt)``, as in ``TestTimeTrainer.fit(prompt)``. The ``n`` rollouts
are one batched ``Policy.generate`` call (row ``i`` with generator ``i``); its ``generated_tokens`` and ``prefill``
calls go to the meter, reward scores to ``rm_forward``; ``rollouts`` counts the samples. Votes count answers under
:func:`~nabla.eval.grading.answer_key`; samples without an answer do not vote. Ties go to the answer that appears
first (lowest sample index), and best-of-N ties to the lowest index. Reward-weighted majority weighs each vote by
``sigmoid(reward)`` (a reward model's score read as log-odds of being right; the self-judge reward is exactly
that). The reward of the returned response, where the method itself needs none (greedy, sampling,
self-consistency), is measured for the report outside the meter: it is not part of the method's cost.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from nabla.errors import ConfigurationError
from nabla.eval.grading import answer_key, extract_answer
from nabla.sampler import DEFAULT_MAX_NEW_TOKENS, SamplingConfig

if TYPE_CHECKING:  # torch is imported where it is used: the method names and seeds load without it
    import torch
    from torch import Tensor

    from nabla.cost import CostMeter
    from nabla.policy import Policy, Rollout
    from nabla.reward import RewardModel

BaselineName = Literal["greedy", "sampling", "self_consistency", "best_of_n", "weighted_majority"]
BASELINES: tuple[str, ...] = ("greedy", "sampling", "self_consistency", "best_of_n", "weighted_majority")
NEEDS_REWARD: frozenset[str] = frozenset({"best_of_n", "weighted_majority"})
Chooser = Callable[[list["Sample"]], int]


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed determined by ``parts`` alone (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def row_generators(seed: int, n: int) -> list[torch.Generator]:
    """One generator per sample; sample ``i``'s depends on ``(seed, i)`` only."""
    import torch

    return [torch.Generator().manual_seed(derive_seed(seed, "row", i)) for i in range(n)]


def majority_vote(answers: Sequence[str | None], weights: Sequence[float] | None = None) -> int | None:
    """Index of the first sample whose answer collects the largest (weighted) vote; ``None`` if none has an answer.

    Ties go to the answer whose first appearance comes earliest.
    """
    if weights is not None and len(weights) != len(answers):
        raise ValueError(f"{len(answers)} answers need {len(answers)} weights, got {len(weights)}")
    totals: dict[str, float] = {}
    first: dict[str, int] = {}
    for index, answer in enumerate(answers):
        key = answer_key(answer)
        if key is None:
            continue
        totals[key] = totals.get(key, 0.0) + (1.0 if weights is None else weights[index])
        first.setdefault(key, index)
    if not totals:
        return None
    winner = max(totals, key=lambda key: (totals[key], -first[key]))
    return first[winner]


def best_index(rewards: Sequence[float]) -> int:
    """Index of the highest reward; ties to the lowest index, non-finite rewards rank last."""
    ranked = [r if math.isfinite(r) else -math.inf for r in rewards]
    return max(range(len(ranked)), key=lambda i: (ranked[i], -i))


def vote_weight(reward: float) -> float:
    """``sigmoid(reward)``; a non-finite reward weighs nothing."""
    if not math.isfinite(reward):
        return 0.0
    return 1.0 / (1.0 + math.exp(-reward)) if reward >= 0 else math.exp(reward) / (1.0 + math.exp(reward))


@dataclass
class Sample:
    """One rollout: its text, tokens, extracted answer and (where scored) reward."""

    text: str
    token_ids: list[int]
    finish_reason: str
    answer: str | None
    reward: float | None = None


@dataclass
class BaselineResult:
    """What a baseline returns; ``stats`` has the keys of ``FitResult.stats`` (``CostMeter.snapshot()``)."""

    prompt: str
    method: str
    text: str
    token_ids: list[int]
    answer: str | None
    reward: float | None
    finish_reason: str
    stats: dict[str, float]
    samples: list[Sample] = field(default_factory=list)
    chosen: int = 0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SampleRequest:
    """What one prompt's baseline needs from the policy: ``context`` continued once per generator, sample ``i``
    drawn with ``generators[i]`` and charged to ``meter``."""

    context: Tensor
    sampling: SamplingConfig
    generators: list[torch.Generator]
    meter: CostMeter


class Baselines:
    """Greedy decoding, sampling, self-consistency, best-of-N and reward-weighted majority over one policy.

    Args:
        policy: the policy that samples.
        reward: the reward model (needed by best-of-N and weighted majority; otherwise only reported).
        sampling: how each sample is drawn (greedy ignores it).
        max_new_tokens: the length budget of every response.
        stop_strings: strings that end a response.
    """

    def __init__(
        self,
        policy: Policy,
        reward: RewardModel | None = None,
        sampling: SamplingConfig | None = None,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        stop_strings: Sequence[str] = (),
    ) -> None:
        if max_new_tokens < 1:
            raise ConfigurationError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        self.policy = policy
        self.reward = reward
        self.rollout = sampling or SamplingConfig()
        self.max_new_tokens = max_new_tokens
        self.stop_strings = tuple(stop_strings)
        if reward is not None:
            reward.bind(policy)

    # ------------------------------------------------------------------ the methods
    def run(self, name: str, prompt: str, n: int = 1, seed: int = 0) -> BaselineResult:
        """The baseline called ``name`` (one of :data:`BASELINES`)."""
        sampling, choose = self._method(name, n)
        return self._decode(name, prompt, n, seed, sampling, choose)

    def greedy(self, prompt: str, seed: int = 0) -> BaselineResult:
        """Temperature-0 decoding."""
        return self._decode("greedy", prompt, 1, seed, SamplingConfig(temperature=0.0, top_p=None), _first)

    def sampling(self, prompt: str, n: int = 1, seed: int = 0) -> BaselineResult:
        """``n`` samples; the first is the answer (the others serve pass@k)."""
        return self._decode("sampling", prompt, n, seed, self.rollout, _first)

    def self_consistency(self, prompt: str, n: int, seed: int = 0) -> BaselineResult:
        """``n`` samples; the majority answer wins (SC@n)."""
        return self._decode("self_consistency", prompt, n, seed, self.rollout, _majority)

    def best_of_n(self, prompt: str, n: int, seed: int = 0) -> BaselineResult:
        """``n`` samples scored by the reward model; the highest reward wins (BoN@n)."""
        return self._decode("best_of_n", prompt, n, seed, self.rollout, _best)

    def weighted_majority(self, prompt: str, n: int, seed: int = 0) -> BaselineResult:
        """``n`` samples; each votes for its answer with weight ``sigmoid(reward)``."""
        return self._decode("weighted_majority", prompt, n, seed, self.rollout, _weighted)

    def run_pool(
        self,
        name: str,
        prompts: Sequence[str],
        n: int = 1,
        seeds: Sequence[int] | None = None,
        pool: int | None = None,
        errors: tuple[type[Exception], ...] = (),
    ) -> Iterator[tuple[int, BaselineResult]]:
        """Continuous batching of :meth:`run` over several prompts: yield ``(index, result)`` as each finishes.

        ``pool`` prompts (``None``: all) are decoded at once, their samples sharing one batched generation per
        round, a finished prompt's slot refilled from the queue at once. Prompt ``i`` uses ``seeds[i]``
        (default ``i``); its result is the one ``run(name, prompts[i], n, seeds[i])`` gives, for any pool.
        ``errors``: error types that end one prompt instead of the run; such a prompt yields ``(index, error)``.
        """
        from nabla.scheduling import PromptPool

        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ConfigurationError(f"{len(prompts)} prompts need {len(prompts)} seeds, got {len(seeds)}")
        sampling, choose = self._method(name, n)

        def start(index: int) -> Generator[SampleRequest, list[Rollout], BaselineResult]:
            return self._steps(name, prompts[index], n, seeds[index], sampling, choose)

        scheduler = PromptPool(self._serve, pool, catch=errors)
        for done in scheduler.run(len(prompts), start):
            if done.error is not None:
                yield done.index, done.error  # type: ignore[misc]
                continue
            result: BaselineResult = done.result
            result.stats["wall_time_s"] = done.wall_time_s
            try:
                yield done.index, self._with_reported_reward(result)
            except errors as error:
                yield done.index, error  # type: ignore[misc]

    # ------------------------------------------------------------------ shared machinery
    def _method(self, name: str, n: int) -> tuple[SamplingConfig, Chooser]:
        """How baseline ``name`` samples and chooses; refuses settings it cannot run with."""
        if name not in BASELINES:
            raise ConfigurationError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
        if n < 1:
            raise ConfigurationError(f"n must be >= 1 (got {n})")
        if name == "greedy" and n != 1:
            raise ConfigurationError(f"greedy decoding is deterministic: n must be 1 (got {n})")
        if name in NEEDS_REWARD and self.reward is None:
            raise ConfigurationError(f"{name} ranks samples by reward: pass a reward model (reward.kind != none)")
        if name == "greedy":
            return SamplingConfig(temperature=0.0, top_p=None), _first
        choosers = {
            "sampling": _first,
            "self_consistency": _majority,
            "best_of_n": _best,
            "weighted_majority": _weighted,
        }
        return self.rollout, choosers[name]

    def _decode(
        self, method: str, prompt: str, n: int, seed: int, sampling: SamplingConfig, choose: Chooser
    ) -> BaselineResult:
        """One prompt: :meth:`_steps` served alone."""
        self._method(method, n)
        started = time.perf_counter()
        steps = self._steps(method, prompt, n, seed, sampling, choose)
        try:
            request = next(steps)
            while True:
                request = steps.send(self._serve({0: request})[0])
        except StopIteration as stop:
            result: BaselineResult = stop.value
        result.stats["wall_time_s"] = time.perf_counter() - started
        return self._with_reported_reward(result)

    def _steps(
        self, method: str, prompt: str, n: int, seed: int, sampling: SamplingConfig, choose: Chooser
    ) -> Generator[SampleRequest, list[Rollout], BaselineResult]:
        """One prompt's baseline as a coroutine: it yields its ``n`` samples as one :class:`SampleRequest` (so that
        samples of several prompts can share a batch), scores them where the method needs it, and chooses."""
        from nabla.cost import CostMeter

        meter = CostMeter()
        context = self.policy.encode(prompt)
        rollouts = yield SampleRequest(context, sampling, row_generators(seed, n), meter)
        meter.update("rollouts", n)
        samples = []
        for rollout in rollouts:
            text = self.policy.decode(rollout.token_ids)
            samples.append(Sample(text, list(rollout.token_ids), rollout.finish_reason, extract_answer(text)))
        if method in NEEDS_REWARD:
            for sample, score in zip(samples, self._scores(prompt, samples, meter)):
                sample.reward = score
        chosen = choose(samples)
        best = samples[chosen]
        return BaselineResult(
            prompt=prompt,
            method=method,
            text=best.text,
            token_ids=best.token_ids,
            answer=best.answer,
            reward=best.reward,
            finish_reason=best.finish_reason,
            stats=meter.snapshot(),
            samples=samples,
            chosen=chosen,
            seed=seed,
        )

    def _serve(self, requests: dict[int, SampleRequest]) -> dict[int, list[Rollout]]:
        """Every pending request's samples in one batched generation per sampling setting, row by row with each
        sample's own generator and meter (so a prompt's samples and costs do not depend on the batch)."""
        groups: list[tuple[SamplingConfig, list[int]]] = []
        for key in sorted(requests):
            for sampling, keys in groups:
                if sampling == requests[key].sampling:
                    keys.append(key)
                    break
            else:
                groups.append((requests[key].sampling, [key]))
        answers: dict[int, list[Rollout]] = {}
        for sampling, keys in groups:
            contexts, generators, meters = [], [], []
            for key in keys:
                request = requests[key]
                contexts += [request.context] * len(request.generators)
                generators += request.generators
                meters += [request.meter] * len(request.generators)
            rollouts = self.policy.generate(
                contexts, sampling, generators, self.max_new_tokens, stop_strings=self.stop_strings, meter=meters
            )
            offset = 0
            for key in keys:
                count = len(requests[key].generators)
                answers[key] = rollouts[offset : offset + count]
                offset += count
        return answers

    def _with_reported_reward(self, result: BaselineResult) -> BaselineResult:
        """The reward of the chosen response where the method itself needs none: for the report only, outside the
        meter and the wall time (it is not part of the method's cost)."""
        if result.reward is None and self.reward is not None:
            chosen = result.samples[result.chosen]
            result.reward = self._scores(result.prompt, [chosen], meter=None)[0]
        return result

    def _scores(self, prompt: str, samples: list[Sample], meter: CostMeter | None) -> list[float]:
        assert self.reward is not None
        from nabla.reward import require_finite_rewards

        prompts, texts = [prompt] * len(samples), [s.text for s in samples]
        scores = self.reward.score(prompts, texts, [s.token_ids for s in samples], meter=meter)
        return [float(score) for score in require_finite_rewards(self.reward, prompts, texts, scores).tolist()]


def _first(samples: list[Sample]) -> int:
    return 0


def _majority(samples: list[Sample]) -> int:
    winner = majority_vote([s.answer for s in samples])
    return 0 if winner is None else winner


def _best(samples: list[Sample]) -> int:
    return best_index([s.reward if s.reward is not None else -math.inf for s in samples])


def _weighted(samples: list[Sample]) -> int:
    weights = [vote_weight(s.reward if s.reward is not None else -math.inf) for s in samples]
    winner = majority_vote([s.answer for s in samples], weights)
    return _best(samples) if winner is None else winner
