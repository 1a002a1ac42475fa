"""The ``nabla fit`` command: one prompt through ∇-Reasoner, with a readable report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from nabla.config import PolicySpec, RewardSpec
from nabla.optimizer import LatentOptimizer
from nabla.policy import Policy
from nabla.reward import RewardModel
from nabla.sampler import Sampler
from nabla.trainer import Acceleration, FitResult, TestTimeTrainer


def fit(
    prompt: str,
    policy: PolicySpec = PolicySpec(),  # noqa: B008 - jsonargparse reads dataclass defaults
    reward: RewardSpec = RewardSpec(),  # noqa: B008
    optimizer: LatentOptimizer = LatentOptimizer(),  # noqa: B008
    sampler: Sampler = Sampler(),  # noqa: B008
    acceleration: Acceleration = Acceleration(),  # noqa: B008
    seed: int = 0,
    output: str | None = None,
    progress: bool = True,
) -> FitResult:
    """Decode one prompt with ∇-Reasoner and print the answer, the reward, the token revisions and the costs.

    Args:
        prompt: the question to answer.
        policy: the causal LM (``default``: the embedded SmolLM2-135M-Instruct).
        reward: the reward model (``default``: the embedded trained reward model).
        optimizer: DTO settings.
        sampler: rollout, resampling, token selection, acceptance and stopping settings.
        acceleration: exact savings (all on by default).
        seed: the seed of every random draw; the same seed gives the same answer on CPU.
        output: write the full result (answer, revisions, DTO history, costs) to this JSON file.
        progress: show a progress bar.
    """
    from nabla.errors import PromptError
    from nabla.report import print_fit_result

    if not prompt.strip():
        raise PromptError("the prompt is empty; pass the question text with --prompt")
    started = time.perf_counter()
    loaded_policy, loaded_reward = load_models(policy, reward)
    load_time = time.perf_counter() - started
    trainer = TestTimeTrainer(
        loaded_policy, loaded_reward, optimizer, sampler, acceleration=acceleration, enable_progress_bar=progress
    )
    result = trainer.fit(prompt, seed=seed)
    print_fit_result(result, loaded_policy, load_time_s=load_time, reward_name=describe_reward(reward))
    if output:
        settings = {"policy": policy, "reward": reward, "optimizer": optimizer, "sampler": sampler}
        record = {
            **result.to_dict(),
            "final_answer": final_answer(result.text),
            "load_time_s": load_time,
            "settings": {**{k: asdict(v) for k, v in settings.items()}, "acceleration": asdict(acceleration)},
        }
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2))
    return result


def load_models(policy: PolicySpec, reward: RewardSpec) -> tuple[Policy, RewardModel | None]:
    """Load the policy and the reward; the default policy's one-off conversion keeps its progress bar, loading
    from safetensors does not show one (the fit has its own)."""
    from transformers.utils import logging as hf_logging

    policy.resolved_path()  # converts the embedded default on first use
    hf_logging.disable_progress_bar()
    try:
        loaded_policy = policy.load()
        return loaded_policy, reward.load(loaded_policy)
    finally:
        hf_logging.enable_progress_bar()


def describe_reward(reward: RewardSpec) -> str:
    if reward.kind != "classifier":
        return reward.kind
    name = "the embedded trained reward model" if reward.name_or_path == "default" else reward.name_or_path
    return f"classifier: {name}" + (f" + adapter {reward.adapter}" if reward.adapter else "")


def final_answer(text: str) -> str | None:
    """The answer a grader would read from the response (last ``\\boxed{}``, then common fallbacks)."""
    from nabla.eval.grading import extract_answer

    return extract_answer(text)
