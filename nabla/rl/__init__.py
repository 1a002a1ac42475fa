"""KL-regularised RL fine-tuning, the amortised dual of ∇-Reasoner's test-time optimisation.

- :mod:`nabla.rl.kl`: k1 / k2 / k3 estimators of ``KL(π ‖ π_ref)`` and exact KL / total variation helpers.
- :mod:`nabla.rl.advantages`: GRPO (group-normalised) and RLOO (leave-one-out) advantages.
- :mod:`nabla.rl.module`: :class:`KLRegularizedRL`, the ``LightningModule`` (LoRA via peft, reference = adapter
  disabled, adapter-only checkpoints, cost accounting with :class:`~nabla.CostMeter` kinds).
- :mod:`nabla.rl.data`: :class:`PromptDataModule`, resumable and DDP-sharded prompts.
- :mod:`nabla.rl.train`: the ``nabla rl`` command; :mod:`nabla.rl.compare`: ``nabla rl-vs-testtime``.
"""

from nabla.rl.advantages import advantages, grpo_advantages, rloo_advantages
from nabla.rl.data import PromptDataModule
from nabla.rl.kl import exact_kl, kl_estimate, kl_k1, kl_k2, kl_k3, total_variation
from nabla.rl.module import (
    KLRegularizedRL,
    LoRASettings,
    NothingTrainableError,
    RLConfig,
    TrainingDivergedError,
    response_log_probs,
)

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
