"""The ``nabla fit`` command: one prompt through ∇-Reasoner, with a readable report."""

from __future__ import annotations

import json
from pathlib import Path

from nabla.config import PolicySpec, RewardSpec
from nabla.optimizer import LatentOptimizer
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
    loaded_policy = policy.load()
    loaded_reward = reward.load(loaded_policy)
    trainer = TestTimeTrainer(
        loaded_policy, loaded_reward, optimizer, sampler, acceleration=acceleration, enable_progress_bar=progress
    )
    result = trainer.fit(prompt, seed=seed)
    print_fit_result(result, loaded_policy)
    if output:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_dict(), indent=2))
    return result
