"""The ``nabla rl`` command: KL-regularised RL of a LoRA adapter with ``lightning.Trainer`` (CPU, GPU or DDP)."""

from __future__ import annotations

import importlib
import logging
import warnings
from collections.abc import Sequence
from typing import Any

from nabla import jsonio
from nabla._typing import TYPE_CHECKING
from nabla.config import PolicySpec, RewardSpec
from nabla.errors import ConfigurationError
from nabla.rl.settings import LoRASettings, RLConfig, RLTrainerSettings

if TYPE_CHECKING:  # torch, transformers and Lightning are imported where they are used (a fast `--help`)
    import lightning as L

    from nabla.policy import Policy
    from nabla.reward import CallableReward, RewardModel
    from nabla.rl.module import KLRegularizedRL


def load_verifier(target: str) -> CallableReward:
    """``module:function`` → a :class:`CallableReward` (``function(prompt, response) -> float``)."""
    from nabla.reward import CallableReward

    module, _, name = target.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigurationError(f"cannot import verifier {target!r}; pass it as package.module:function") from error
    return CallableReward(function, name=name)


def resolve_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    if bool(prompts) == bool(prompts_file):
        raise ConfigurationError("pass the training prompts either as --prompts or as --prompts_file (one of them)")
    from nabla.rl.data import read_prompts

    return list(prompts) if prompts else read_prompts(prompts_file)  # type: ignore[arg-type]


def quiet_lightning() -> None:
    """Silence Lightning's notices that do not apply here (frozen modules stay in eval mode on purpose)."""
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdvertisements) for f in rank_zero.filters):
        rank_zero.addFilter(_NoAdvertisements())


class _NoAdvertisements(logging.Filter):
    """Drops Lightning's "Tip: try installing ..." line (an advertisement for a hosted service, not a notice)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def train_rl(
    policy: Policy,
    reward: RewardModel,
    prompts: Sequence[str],
    *,
    config: RLConfig,
    lora: LoRASettings | None,
    settings: RLTrainerSettings,
    batch_size: int,
    resume: str | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> tuple[KLRegularizedRL, L.Trainer]:
    """Fit the RL module; ``resume`` is a checkpoint path (or ``last``) to continue from."""
    from nabla.rl.data import PromptDataModule
    from nabla.rl.module import KLRegularizedRL

    quiet_lightning()
    module = KLRegularizedRL(policy, reward, config, lora)
    data = PromptDataModule(prompts, batch_size=batch_size, seed=config.seed)
    trainer = settings.build(callbacks)
    trainer.fit(module, datamodule=data, ckpt_path=resume)
    return module, trainer


def finetune(
    policy: PolicySpec = PolicySpec(),  # noqa: B008 - jsonargparse reads dataclass defaults
    reward: RewardSpec = RewardSpec(),  # noqa: B008
    verifier: str | None = None,
    prompts: list[str] | None = None,
    prompts_file: str | None = None,
    rl: RLConfig = RLConfig(),  # noqa: B008
    lora: LoRASettings = LoRASettings(),  # noqa: B008
    trainer: RLTrainerSettings = RLTrainerSettings(),  # noqa: B008
    batch_size: int = 4,
    resume: str | None = None,
    output: str = "runs/rl/adapter",
) -> dict[str, Any]:
    """KL-regularised RL fine-tuning (LoRA) of a policy against a reward model or a verifier.

    Args:
        policy: the causal LM to fine-tune (its weights stay frozen; a LoRA adapter is trained).
        reward: the reward model (ignored when ``verifier`` is set).
        verifier: ``package.module:function`` scoring ``(prompt, response) -> float``, used instead of a model.
        prompts: training prompts given inline.
        prompts_file: training prompts from a .txt (one per line) or .jsonl (``prompt``/``question``/``problem``).
        rl: RL settings; ``rl.lam`` is the test-time λ (β = 1/λ).
        lora: the adapter.
        trainer: the Lightning trainer (steps, devices, strategy, checkpoints, logs).
        batch_size: prompts per process and step (each gets ``rl.group_size`` completions).
        resume: a checkpoint to continue from (``last`` for the latest in ``trainer.default_root_dir``).
        output: folder of the trained adapter (peft ``save_pretrained``) and ``training_cost.json``.
    """
    if policy.engine.kind != "hf":  # another engine would sample from the weights before training, not the policy's
        raise ConfigurationError(
            f"RL trains the policy's weights and samples from them; policy.engine.kind={policy.engine.kind} serves a "
            "copy that does not change: set policy.engine.kind=hf"
        )
    loaded_policy = policy.load()
    loaded_reward = load_verifier(verifier) if verifier else reward.load(loaded_policy)
    if loaded_reward is None:
        raise ConfigurationError("RL needs a reward: set reward.kind or --verifier")
    module, fitted = train_rl(
        loaded_policy,
        loaded_reward,
        resolve_prompts(prompts, prompts_file),
        config=rl,
        lora=lora,
        settings=trainer,
        batch_size=batch_size,
        resume=resume,
    )
    cost = module.training_cost()
    if fitted.is_global_zero:
        folder = module.save_adapter(output)
        (folder / "training_cost.json").write_text(jsonio.dumps(cost, indent=2))
        print(
            f"adapter written to {folder}; training cost: {cost['model_calls']:.0f} model calls, "
            f"{cost['flops']:.3g} FLOPs, {cost['wall_time_s']:.1f} s"
        )
    return cost
