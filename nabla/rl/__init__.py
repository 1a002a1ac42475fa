"""KL-regularised RL fine-tuning, the amortised dual of ∇-Reasoner's test-time optimisation.

- :mod:`nabla.rl.kl`: k1 / k2 / k3 estimators of ``KL(π ‖ π_ref)`` and exact KL / total variation helpers.
- :mod:`nabla.rl.advantages`: GRPO (group-normalised) and RLOO (leave-one-out) advantages.
- :mod:`nabla.rl.module`: :class:`KLRegularizedRL`, the ``LightningModule`` (LoRA via peft, reference = adapter
  disabled, adapter-only checkpoints, cost accounting with :class:`~nabla.CostMeter` kinds).
- :mod:`nabla.rl.data`: :class:`PromptDataModule`, resumable and DDP-sharded prompts.
- :mod:`nabla.rl.settings`: ``RLConfig``, ``LoRASettings``, ``RLTrainerSettings`` (no torch needed).
- :mod:`nabla.rl.train`: the ``nabla rl`` command; :mod:`nabla.rl.compare`: ``nabla rl-vs-testtime``.
"""

from typing import Any

# eager, and light: the function `advantages` must shadow its submodule's name
from nabla.rl.advantages import advantages, grpo_advantages, rloo_advantages

#: public name -> the module that defines it; imported on first use (``nabla rl --help`` needs no torch)
_EXPORTS: dict[str, str] = {
    "KLRegularizedRL": "nabla.rl.module",
    "LoRASettings": "nabla.rl.settings",
    "NothingTrainableError": "nabla.rl.module",
    "PromptDataModule": "nabla.rl.data",
    "RLConfig": "nabla.rl.settings",
    "TrainingDivergedError": "nabla.rl.module",
    "exact_kl": "nabla.rl.kl",
    "kl_estimate": "nabla.rl.kl",
    "kl_k1": "nabla.rl.kl",
    "kl_k2": "nabla.rl.kl",
    "kl_k3": "nabla.rl.kl",
    "response_log_probs": "nabla.rl.module",
    "total_variation": "nabla.rl.kl",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(_EXPORTS[name]), name)


__all__ = [
    "KLRegularizedRL",
    "LoRASettings",
    "NothingTrainableError",
    "PromptDataModule",
    "RLConfig",
    "TrainingDivergedError",
    "advantages",
    "exact_kl",
    "grpo_advantages",
    "kl_estimate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "response_log_probs",
    "rloo_advantages",
    "total_variation",
]
