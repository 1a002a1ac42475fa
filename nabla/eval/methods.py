"""Methods as data, and the solving of one problem by one method into one JSON-ready record.

Public API:

- :class:`MethodSpec` (for YAML recipes): ``name`` in :data:`METHODS`, ``n`` (samples; ∇-Reasoner's rollout budget
  ``max_rollouts``), ``sampling`` (how rollouts are drawn), ``max_new_tokens``, and for ``nabla`` its
  ``optimizer`` / ``sampler`` / ``acceleration``; ``label`` names it in records, tables and plots
  (default ``name`` or ``name@n``).
- :class:`Solver` ``(method, policy, reward, prompt_template)``: ``solve(problem, base_seed) -> dict``, the record
  of one problem (:data:`RECORD_FIELDS`); ``solve_many(problems, base_seed, pool)`` yields the records of several,
  ``pool`` of them decoded at once (continuous batching), each the record ``solve`` gives.
- ``problem_seed(base_seed, problem_id) -> int``: the seed of one problem, the same in any shard and any order.

For ``nabla``, ``n``, ``sampling`` and ``max_new_tokens`` take the place of the sampler's ``max_rollouts``,
``rollout`` and ``max_new_tokens``, so that every method of a comparison shares one budget and one way of
sampling; setting those sampler fields to something else as well is refused. ``nabla_metropolis`` is ``nabla``
with the Metropolis acceptance (``sampler.acceptance=metropolis``; λ from ``sampler.target_lam`` or the optimizer).
For ``mcmc`` (the DMALA sampler of ρ*, :mod:`nabla.mcmc`) ``n`` is its number of Metropolis–Hastings steps,
``sampling`` draws its start and ``max_new_tokens`` / ``sampler.stop_strings`` bound its responses; the rest of
its settings (``lam``, ``step_size``, ``top_k``, ``answer``) are under ``mcmc``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from nabla._typing import TYPE_CHECKING
from nabla.acceleration import Acceleration
from nabla.baselines import BASELINES, NEEDS_REWARD, derive_seed
from nabla.errors import ConfigurationError, InvalidRewardError, PromptError
from nabla.eval.datasets import PROMPT_TEMPLATE, Problem, format_question
from nabla.eval.grading import answers_match, extract_answer, grade
from nabla.mcmc import MCMCSettings
from nabla.optimizer import LatentOptimizer
from nabla.sampler import DEFAULT_MAX_NEW_TOKENS, Sampler, SamplingConfig

if TYPE_CHECKING:  # imported by Solver: the specs load without torch (a fast `--help`)
    from nabla.baselines import Baselines
    from nabla.mcmc import MCMCSampler
    from nabla.policy import Policy
    from nabla.reward import RewardModel
    from nabla.trainer import TestTimeTrainer

MethodName = Literal[
    "greedy", "sampling", "self_consistency", "best_of_n", "weighted_majority", "nabla", "nabla_metropolis", "mcmc"
]
METHODS: tuple[str, ...] = (*BASELINES, "nabla", "nabla_metropolis", "mcmc")
#: ∇-Reasoner's loop, with the paper's acceptance or the Metropolis test.
NABLA_NAMES: frozenset[str] = frozenset({"nabla", "nabla_metropolis"})
#: Methods that cannot run without a reward model (the runner refuses ``reward.kind: none`` for them up front).
NEEDS_REWARD = NEEDS_REWARD | {"nabla_metropolis", "mcmc"}
#: Keys of every record, in order (``samples`` is empty for single-response methods). ``status`` is ``ok``,
#: ``skipped`` (the policy cannot read the question: longer than its context window, or holding a control token
#: its tokenizer cannot spell as text) or ``failed`` (a reward was NaN, infinite or not a number); ``error`` says why.
RECORD_FIELDS: tuple[str, ...] = (
    "problem_id",
    "source",
    "method",
    "method_name",
    "n",
    "seed",
    "question",
    "gold",
    "response",
    "answer",
    "correct",
    "grade",
    "reward",
    "finish_reason",
    "num_tokens",
    "samples",
    "cost",
    "status",
    "error",
)


@dataclass
class MethodSpec:
    """One decoding method and its settings.

    Args:
        name: ``greedy``, ``sampling`` (the first of ``n`` samples; all ``n`` feed pass@k), ``self_consistency``,
            ``best_of_n``, ``weighted_majority``, ``nabla`` (∇-Reasoner), ``nabla_metropolis`` (∇-Reasoner with
            the Metropolis acceptance) or ``mcmc`` (the DMALA sampler of ρ* ∝ π_ref·exp(λ r)).
        n: samples per problem; for ``nabla`` the rollout budget (``max_rollouts``, the first rollout counted); for
            ``mcmc`` the number of Metropolis–Hastings steps (one objective evaluation each).
        sampling: how rollouts are drawn (greedy ignores it).
        max_new_tokens: the response length budget.
        optimizer: DTO settings (``nabla`` only).
        sampler: ∇-Reasoner's resampling, token selection and acceptance settings (``nabla`` only).
        acceleration: ∇-Reasoner's exact savings (``nabla`` only).
        mcmc: the sampler's ``lam``, ``step_size``, ``top_k``, ``answer`` and ``batch_size`` (``mcmc`` only; its
            ``steps``, ``init``, ``max_new_tokens`` and ``stop_strings`` come from ``n``, ``sampling``,
            ``max_new_tokens`` and ``sampler.stop_strings``).
        label: the name in records, tables and plots (default ``name``, or ``name@n`` when ``n > 1``).
    """

    name: MethodName = "greedy"
    n: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    optimizer: LatentOptimizer = field(default_factory=LatentOptimizer)
    sampler: Sampler = field(default_factory=Sampler)
    acceleration: Acceleration = field(default_factory=Acceleration)
    mcmc: MCMCSettings = field(default_factory=MCMCSettings)
    label: str | None = None

    def __post_init__(self) -> None:
        if self.name not in METHODS:
            raise ConfigurationError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        if self.n < 1:
            raise ConfigurationError(f"method {self.name}: n must be >= 1 (got {self.n})")
        if self.name == "greedy" and self.n != 1:
            raise ConfigurationError(f"greedy decoding is deterministic: n must be 1 (got {self.n})")
        if self.max_new_tokens < 1:
            raise ConfigurationError(f"method {self.name}: max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.name in NABLA_NAMES:
            self.nabla_sampler()  # refuse contradicting settings early
        if self.name == "mcmc":
            self.mcmc_settings()

    @property
    def display_label(self) -> str:
        if self.label:
            return self.label
        return self.name if self.n == 1 and self.name not in (*NABLA_NAMES, "mcmc") else f"{self.name}@{self.n}"

    def nabla_sampler(self) -> Sampler:
        """The sampler of ∇-Reasoner with this method's budget, rollout sampling and length."""
        default = Sampler()
        shared = {"max_rollouts": self.n, "rollout": self.sampling, "max_new_tokens": self.max_new_tokens}
        for key, value in shared.items():
            own = getattr(self.sampler, key)
            if own != getattr(default, key) and own != value:
                method_field = {"max_rollouts": "n", "rollout": "sampling"}.get(key, key)
                raise ConfigurationError(
                    f"method {self.display_label}: sampler.{key}={own!r} contradicts {method_field}={value!r}; set "
                    f"{method_field} only"
                )
        if self.name == "nabla_metropolis":
            shared["acceptance"] = "metropolis"
        return replace(self.sampler, **shared)

    def mcmc_settings(self) -> MCMCSettings:
        """The DMALA sampler's settings with this method's steps (``n``), start sampling, length and stop strings."""
        default = MCMCSettings()
        shared = {
            "steps": self.n,
            "init": self.sampling,
            "max_new_tokens": self.max_new_tokens,
            "stop_strings": self.sampler.stop_strings,
        }
        for key, value in shared.items():
            own = getattr(self.mcmc, key)
            if own != getattr(default, key) and own != value:
                method_field = {"steps": "n", "init": "sampling", "stop_strings": "sampler.stop_strings"}.get(key, key)
                raise ConfigurationError(
                    f"method {self.display_label}: mcmc.{key}={own!r} contradicts {method_field}={value!r}; set "
                    f"{method_field} only"
                )
        return replace(self.mcmc, **shared)

    def to_dict(self) -> dict[str, Any]:
        """The settings that shape results (``nabla`` settings only for ``nabla``, ``mcmc`` ones for ``mcmc``), for
        the run manifest. The sampler's acceptance options appear only when set (manifests of earlier runs hold
        none)."""
        out = asdict(self)
        out["label"] = self.display_label
        if self.name not in NABLA_NAMES:
            for key in ("optimizer", "sampler", "acceleration"):
                out.pop(key)
        else:
            for key, default in (("acceptance", "reward"), ("target_lam", None)):
                if out["sampler"].get(key) == default:
                    out["sampler"].pop(key)
        if self.name == "mcmc":
            out["mcmc"] = asdict(self.mcmc_settings())
        else:
            out.pop("mcmc")
        return out


def problem_seed(base_seed: int, problem_id: str) -> int:
    """The seed of one problem: depends on the run seed and the problem id only."""
    return derive_seed(base_seed, problem_id)


class Solver:
    """Solves problems with one method on a loaded policy and reward model, one record per problem."""

    def __init__(
        self,
        method: MethodSpec,
        policy: Policy,
        reward: RewardModel | None,
        prompt_template: str = PROMPT_TEMPLATE,
    ) -> None:
        from nabla.baselines import Baselines
        from nabla.trainer import TestTimeTrainer

        if method.name in NEEDS_REWARD and reward is None:
            raise ConfigurationError(f"method {method.display_label} needs a reward model; set reward.kind")
        self.method, self.policy, self.reward = method, policy, reward
        self.prompt_template = prompt_template
        self.trainer: TestTimeTrainer | None = None
        self.baselines: Baselines | None = None
        self.mcmc: MCMCSampler | None = None
        if method.name == "mcmc":
            from nabla.mcmc import MCMCSampler

            self.mcmc = MCMCSampler(policy, reward, method.mcmc_settings())
        elif method.name in NABLA_NAMES:
            self.trainer = TestTimeTrainer(  # the runner shows progress over problems, not a bar per fit
                policy,
                reward,
                method.optimizer,
                method.nabla_sampler(),
                acceleration=method.acceleration,
                enable_progress_bar=False,
            )
        else:
            self.baselines = Baselines(
                policy, reward, method.sampling, method.max_new_tokens, method.sampler.stop_strings
            )

    def solve(self, problem: Problem, base_seed: int = 0) -> dict[str, Any]:
        """Run the method on ``problem`` and grade it; the record's keys are :data:`RECORD_FIELDS`."""
        return next(self.solve_many([problem], base_seed))

    def solve_many(self, problems: Sequence[Problem], base_seed: int = 0, pool: int = 1) -> Iterator[dict[str, Any]]:
        """The records of several problems, each yielded as soon as it is solved (in any order), with ``pool``
        problems decoded at once: continuous batching (``TestTimeTrainer.fit_pool``, ``Baselines.run_pool``).
        Each record is the one :meth:`solve` gives for its problem, whatever the pool."""
        problems = list(problems)
        seeds = [problem_seed(base_seed, problem.id) for problem in problems]
        prompts = [format_question(problem.question, self.prompt_template) for problem in problems]
        # a question the policy cannot read (too long) is skipped, a NaN reward fails its problem: the run goes on
        caught = (PromptError, InvalidRewardError)
        if self.trainer is not None:
            outcomes = self.trainer.fit_pool(prompts, seeds, pool, errors=caught)
        elif self.mcmc is not None:
            outcomes = _mcmc_outcomes(self.mcmc, prompts, seeds, pool, caught)
        else:
            assert self.baselines is not None
            outcomes = self.baselines.run_pool(self.method.name, prompts, self.method.n, seeds, pool, errors=caught)
        for index, outcome in outcomes:
            yield self._record(problems[index], seeds[index], outcome)

    def _record(self, problem: Problem, seed: int, outcome: Any) -> dict[str, Any]:
        """The graded record of one problem from a ``FitResult``, a ``BaselineResult`` or the error that ended it."""
        if isinstance(outcome, PromptError):
            return self._unsolved(problem, seed, "skipped", outcome)
        if isinstance(outcome, InvalidRewardError):
            return self._unsolved(problem, seed, "failed", outcome)
        response, token_ids, reward = outcome.text, outcome.token_ids, outcome.reward
        finish, stats = outcome.finish_reason, outcome.stats
        samples = [
            {
                "answer": s.answer,
                "correct": answers_match(problem.answer, s.answer),
                "reward": s.reward,
                "num_tokens": len(s.token_ids),
                "finish_reason": s.finish_reason,
                "text": s.text,
            }
            for s in (outcome.samples if self.baselines is not None else [])
        ]
        graded = grade(problem.answer, response)
        return {
            **self._record_head(problem, seed),
            "response": response,
            "answer": extract_answer(response),
            "correct": graded.correct,
            "grade": graded.status,
            "reward": reward,
            "finish_reason": finish,
            "num_tokens": len(token_ids),
            "samples": samples,
            "cost": dict(stats),
            "status": "ok",
            "error": None,
        }

    def _record_head(self, problem: Problem, seed: int) -> dict[str, Any]:
        """The fields every record starts with: the problem, the method and the seed."""
        return {
            "problem_id": problem.id,
            "source": problem.source,
            "method": self.method.display_label,
            "method_name": self.method.name,
            "n": self.method.n,
            "seed": seed,
            "question": problem.question,
            "gold": problem.answer,
        }

    def _unsolved(self, problem: Problem, seed: int, status: str, error: Exception) -> dict[str, Any]:
        """The record of a problem the method could not run on: ungraded, with the reason."""
        from nabla.cost import CostMeter

        return {
            **self._record_head(problem, seed),
            "response": "",
            "answer": None,
            "correct": None,
            "grade": status,
            "reward": None,
            "finish_reason": status,
            "num_tokens": 0,
            "samples": [],
            "cost": CostMeter().snapshot(),
            "status": status,
            "error": " ".join(str(error).split()),
        }


def _mcmc_outcomes(
    sampler: MCMCSampler, prompts: list[str], seeds: list[int], pool: int, errors: tuple[type[Exception], ...]
) -> Iterator[tuple[int, Any]]:
    """``(index, MCMCResult or the error that ended it)`` for each prompt, ``pool`` chains advanced at once (a
    chain's sample does not depend on its batch); a batch that raises one of ``errors`` is rerun chain by chain."""
    for start in range(0, len(prompts), max(1, pool)):
        chunk = list(range(start, min(start + max(1, pool), len(prompts))))
        try:
            results = sampler.sample_batch([prompts[i] for i in chunk], [seeds[i] for i in chunk])
        except errors:
            for i in chunk:
                try:
                    yield i, sampler.sample(prompts[i], seeds[i])
                except errors as error:
                    yield i, error
            continue
        yield from zip(chunk, results)
