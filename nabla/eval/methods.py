"""Methods as data, and the solving of one problem by one method into one JSON-ready record.

Public API:

- :class:`MethodSpec` (for YAML recipes): ``name`` in :data:`METHODS`, ``n`` (samples; ∇-Reasoner's rollout budget
  ``max_rollouts``), ``sampling`` (how rollouts are drawn), ``max_new_tokens``, and for ``nabla`` its
  ``optimizer`` / ``sampler`` / ``acceleration``; ``label`` names it in records, tables and plots
  (default ``name`` or ``name@n``).
- :class:`Solver` ``(method, policy, reward, prompt_template)``: ``solve(problem, base_seed) -> dict``, the record
  of one problem (:data:`RECORD_FIELDS`).
- ``problem_seed(base_seed, problem_id) -> int``: the seed of one problem, the same in any shard and any order.

For ``nabla``, ``n``, ``sampling`` and ``max_new_tokens`` take the place of the sampler's ``max_rollouts``,
``rollout`` and ``max_new_tokens``, so that every method of a comparison shares one budget and one way of
sampling; setting those sampler fields to something else as well is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from nabla.baselines import BASELINES, NEEDS_REWARD, Baselines, derive_seed
from nabla.errors import ConfigurationError
from nabla.eval.datasets import PROMPT_TEMPLATE, Problem, format_question
from nabla.eval.grading import answers_match, extract_answer, grade
from nabla.optimizer import LatentOptimizer
from nabla.policy import Policy
from nabla.reward import RewardModel
from nabla.sampler import Sampler, SamplingConfig
from nabla.trainer import Acceleration, TestTimeTrainer

MethodName = Literal["greedy", "sampling", "self_consistency", "best_of_n", "weighted_majority", "nabla"]
METHODS: tuple[str, ...] = (*BASELINES, "nabla")
#: Keys of every record, in order (``samples`` is empty for single-response methods).
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
)


@dataclass
class MethodSpec:
    """One decoding method and its settings.

    Args:
        name: ``greedy``, ``sampling`` (the first of ``n`` samples; all ``n`` feed pass@k), ``self_consistency``,
            ``best_of_n``, ``weighted_majority`` or ``nabla`` (∇-Reasoner).
        n: samples per problem; for ``nabla`` the rollout budget (``max_rollouts``, the first rollout counted).
        sampling: how rollouts are drawn (greedy ignores it).
        max_new_tokens: the response length budget.
        optimizer: DTO settings (``nabla`` only).
        sampler: ∇-Reasoner's resampling, token selection and acceptance settings (``nabla`` only).
        acceleration: ∇-Reasoner's exact savings (``nabla`` only).
        label: the name in records, tables and plots (default ``name``, or ``name@n`` when ``n > 1``).
    """

    name: MethodName = "greedy"
    n: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 256
    optimizer: LatentOptimizer = field(default_factory=LatentOptimizer)
    sampler: Sampler = field(default_factory=Sampler)
    acceleration: Acceleration = field(default_factory=Acceleration)
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
        if self.name == "nabla":
            self.nabla_sampler()  # refuse contradicting settings early

    @property
    def display_label(self) -> str:
        if self.label:
            return self.label
        return self.name if self.n == 1 and self.name != "nabla" else f"{self.name}@{self.n}"

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
        return replace(self.sampler, **shared)

    def to_dict(self) -> dict[str, Any]:
        """The settings that shape results (``nabla`` settings only for ``nabla``), for the run manifest."""
        out = asdict(self)
        out["label"] = self.display_label
        if self.name != "nabla":
            for key in ("optimizer", "sampler", "acceleration"):
                out.pop(key)
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
        if method.name in NEEDS_REWARD and reward is None:
            raise ConfigurationError(f"method {method.display_label} needs a reward model; set reward.kind")
        self.method, self.policy, self.reward = method, policy, reward
        self.prompt_template = prompt_template
        self.trainer: TestTimeTrainer | None = None
        self.baselines: Baselines | None = None
        if method.name == "nabla":
            self.trainer = TestTimeTrainer(
                policy, reward, method.optimizer, method.nabla_sampler(), acceleration=method.acceleration
            )
        else:
            self.baselines = Baselines(
                policy, reward, method.sampling, method.max_new_tokens, method.sampler.stop_strings
            )

    def solve(self, problem: Problem, base_seed: int = 0) -> dict[str, Any]:
        """Run the method on ``problem`` and grade it; the record's keys are :data:`RECORD_FIELDS`."""
        seed = problem_seed(base_seed, problem.id)
        prompt = format_question(problem.question, self.prompt_template)
        if self.trainer is not None:
            result = self.trainer.fit(prompt, seed=seed)
            response, token_ids, reward = result.text, result.token_ids, result.reward
            finish, stats, samples = result.finish_reason, result.stats, []
        else:
            assert self.baselines is not None
            outcome = self.baselines.run(self.method.name, prompt, self.method.n, seed)
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
                for s in outcome.samples
            ]
        graded = grade(problem.answer, response)
        return {
            "problem_id": problem.id,
            "source": problem.source,
            "method": self.method.display_label,
            "method_name": self.method.name,
            "n": self.method.n,
            "seed": seed,
            "question": problem.question,
            "gold": problem.answer,
            "response": response,
            "answer": extract_answer(response),
            "correct": graded.correct,
            "grade": graded.status,
            "reward": reward,
            "finish_reason": finish,
            "num_tokens": len(token_ids),
            "samples": samples,
            "cost": {key: float(value) for key, value in stats.items()},
        }
