"""The ``nabla fit`` command: one prompt through ∇-Reasoner, with a readable report."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from nabla import jsonio
from nabla._typing import TYPE_CHECKING
from nabla.acceleration import Acceleration
from nabla.config import PolicySpec, RewardSpec
from nabla.optimizer import LatentOptimizer
from nabla.sampler import Sampler

if TYPE_CHECKING:  # the models' modules are imported by `fit` itself: `nabla fit --help` does not need torch
    from nabla.baselines import BaselineResult
    from nabla.policy import Policy
    from nabla.reward import RewardModel
    from nabla.trainer import FitResult


def fit(
    prompt: str,
    policy: PolicySpec = PolicySpec(),  # noqa: B008 - jsonargparse reads dataclass defaults
    reward: RewardSpec = RewardSpec(),  # noqa: B008
    optimizer: LatentOptimizer = LatentOptimizer(),  # noqa: B008
    sampler: Sampler = Sampler(),  # noqa: B008
    acceleration: Acceleration = Acceleration(),  # noqa: B008
    seed: int = 0,
    output: str | None = None,
    greedy: bool = True,
    progress: bool = True,
) -> FitResult:
    """Decode one prompt with ∇-Reasoner and show its answer beside the policy's own greedy one.

    Prints the answer and its reward, the greedy answer and its reward, the token revisions and the costs.

    Args:
        prompt: the question to answer.
        policy: the causal LM (``default``: the embedded SmolLM2-135M-Instruct).
        reward: the reward model (``default``: the embedded trained reward model).
        optimizer: DTO settings.
        sampler: rollout, resampling, token selection, acceptance and stopping settings.
        acceleration: exact savings (all on by default).
        seed: the seed of every random draw; the same seed gives the same answer on CPU.
        output: write the full result (answer, revisions, DTO history, costs, the greedy answer) to this JSON
            file.
        greedy: also decode the prompt greedily (one rollout, its cost reported apart) and show that answer and
            its reward beside ∇-Reasoner's, so you see what the method changed.
        progress: show progress (a bar on a terminal, a line every 20 s otherwise); ``false`` silences all
            progress output, third-party bars included.
    """
    from nabla import progress as shown
    from nabla.errors import PromptError, check_seed

    if not prompt.strip():
        raise PromptError("the prompt is empty; pass the question text with --prompt")
    check_seed(seed)
    with shown.silenced(not progress):
        return _fit(prompt, policy, reward, optimizer, sampler, acceleration, seed, output, greedy, progress)


def _fit(
    prompt: str,
    policy: PolicySpec,
    reward: RewardSpec,
    optimizer: LatentOptimizer,
    sampler: Sampler,
    acceleration: Acceleration,
    seed: int,
    output: str | None,
    greedy: bool,
    progress: bool,
) -> FitResult:
    from nabla import progress as shown
    from nabla.report import print_fit_result
    from nabla.trainer import TestTimeTrainer

    started = time.perf_counter()
    with shown.activity("loading the policy and the reward model", progress):
        loaded_policy, loaded_reward = load_models(policy, reward)
    load_time = time.perf_counter() - started
    trainer = TestTimeTrainer(
        loaded_policy, loaded_reward, optimizer, sampler, acceleration=acceleration, enable_progress_bar=progress
    )
    result = trainer.fit(prompt, seed=seed)
    baseline = None
    if greedy:
        with shown.activity("greedy decoding of the same prompt, for comparison", progress):
            baseline = greedy_baseline(loaded_policy, loaded_reward, sampler, prompt)
    print_fit_result(result, loaded_policy, load_time_s=load_time, reward_name=describe_reward(reward), greedy=baseline)
    if output:
        settings = {"policy": policy, "reward": reward, "optimizer": optimizer, "sampler": sampler}
        record = {
            **result.to_dict(),
            "final_answer": final_answer(result.text),
            "greedy": None if baseline is None else greedy_record(baseline),
            "load_time_s": load_time,
            "settings": {**{k: asdict(v) for k, v in settings.items()}, "acceleration": asdict(acceleration)},
        }
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(jsonio.dumps(record, indent=2))
    return result


def greedy_baseline(policy: Policy, reward: RewardModel | None, sampler: Sampler, prompt: str) -> BaselineResult:
    """The policy's own temperature-0 answer under the same length budget and stop strings; its reward is
    measured for the report, outside its cost (as in the evaluation's greedy baseline)."""
    from nabla.baselines import Baselines

    return Baselines(policy, reward, max_new_tokens=sampler.max_new_tokens, stop_strings=sampler.stop_strings).greedy(
        prompt
    )


def greedy_record(baseline: BaselineResult) -> dict[str, object]:
    return {
        "text": baseline.text,
        "token_ids": baseline.token_ids,
        "final_answer": baseline.answer,
        "reward": baseline.reward,
        "finish_reason": baseline.finish_reason,
        "stats": baseline.stats,
    }


def load_models(policy: PolicySpec, reward: RewardSpec) -> tuple[Policy, RewardModel | None]:
    """Load the policy and the reward; the default policy's one-off conversion reports itself, loading from
    safetensors does not show a bar (the fit has its own)."""
    from nabla.progress import loading_quietly

    policy.resolved_path()  # converts the embedded default on first use
    with loading_quietly():
        loaded_policy = policy.load()
        return loaded_policy, reward.load(loaded_policy)


def describe_reward(reward: RewardSpec) -> str:
    if reward.kind != "classifier":
        return reward.kind
    name = "the embedded trained reward model" if reward.name_or_path == "default" else reward.name_or_path
    return f"classifier: {name}" + (f" + adapter {reward.adapter}" if reward.adapter else "")


def final_answer(text: str) -> str | None:
    """The answer a grader would read from the response (last ``\\boxed{}``, then common fallbacks)."""
    from nabla.eval.grading import extract_answer

    return extract_answer(text)
