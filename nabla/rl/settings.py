"""The settings of RL fine-tuning, apart from the code that runs it: they load without torch or Lightning, so that
``nabla rl --help`` is fast (the command line builds its parser from these dataclasses)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from nabla._typing import TYPE_CHECKING
from nabla.errors import ConfigurationError, require_finite
from nabla.sampler import SamplingConfig

if TYPE_CHECKING:
    import lightning as L

AdvantageKind = Literal["grpo", "rloo"]


@dataclass
class LoRASettings:
    """The LoRA adapter that RL trains (the base weights stay frozen and serve as the reference).

    Args:
        r: adapter rank.
        alpha: LoRA scaling numerator (scale = alpha / r).
        target_modules: module names to adapt, or ``"all-linear"`` (every linear layer but the output head).
        adapter: an adapter folder (``save_pretrained``) to continue training instead of a fresh one.
    """

    r: int = 8
    alpha: int = 16
    target_modules: list[str] | str = "all-linear"
    adapter: str | None = None


@dataclass
class RLConfig:
    """Settings of KL-regularised RL.

    Args:
        lam: λ of ``ρ* ∝ π_ref · exp(λ r)``, the same number as the test-time ``LatentOptimizer.lam``
            (``reward_weight / likelihood_weight``); the KL coefficient is ``β = 1 / λ`` (``inf``: no KL).
        kl_placement: ``"reward"``: k1 subtracted from the reward (exact policy gradient of the reverse-KL
            objective); ``"loss"``: k3 added to the loss (GRPO's choice; its expected gradient is that of the
            forward KL, see :mod:`nabla.rl.kl`).
        advantage: ``"rloo"`` (leave-one-out baseline, unbiased) or ``"grpo"`` (group mean and std).
        scale_advantages: divide GRPO advantages by the group's standard deviation.
        group_size: completions sampled per prompt (≥ 2).
        lr, weight_decay: AdamW on the adapter.
        lr_decay: cosine decay of the learning rate to ``0.1 · lr`` over the trainer's ``max_steps``.
        max_new_tokens, stop_strings: completion length limits.
        sampling: how completions are drawn; anything but temperature 1 without top-k/top-p samples from a
            distribution other than the one being trained (off-policy).
        seed: the seed of every completion draw (with the step, the prompt index and the member index).
    """

    lam: float = 10.0
    kl_placement: Literal["reward", "loss"] = "reward"
    advantage: AdvantageKind = "rloo"
    scale_advantages: bool = True
    group_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_decay: bool = False
    max_new_tokens: int = 32
    stop_strings: list[str] = field(default_factory=list)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=None))
    seed: int = 0

    def __post_init__(self) -> None:
        require_finite(self, allow_inf=("lam",))  # lam = inf: no KL penalty
        if not self.lam > 0:
            raise ConfigurationError(f"lam must be > 0 (got {self.lam}); β = 1/λ, use inf for no KL")
        if self.kl_placement not in ("reward", "loss"):
            raise ConfigurationError(f"kl_placement must be 'reward' or 'loss' (got {self.kl_placement!r})")
        if self.advantage not in ("grpo", "rloo"):
            raise ConfigurationError(f"advantage must be 'grpo' or 'rloo' (got {self.advantage!r})")
        if self.group_size < 2:
            raise ConfigurationError(f"group_size must be >= 2 (got {self.group_size}); advantages need a group")
        if not self.lr > 0:
            raise ConfigurationError(f"lr must be > 0 (got {self.lr})")
        if self.max_new_tokens < 1:
            raise ConfigurationError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens})")

    @property
    def beta(self) -> float:
        return 0.0 if math.isinf(self.lam) else 1.0 / self.lam


@dataclass
class RLTrainerSettings:
    """The ``lightning.Trainer`` of an RL run.

    Args:
        max_steps: optimiser steps (one per batch of prompts).
        accelerator, devices, strategy: as in ``lightning.Trainer`` (``devices: 2, strategy: ddp`` runs two
            processes; on CPU they use the gloo backend).
        default_root_dir: where logs and checkpoints go.
        checkpoint_every_n_steps: save an adapter-only checkpoint (and ``last.ckpt``) this often; 0: never.
        log_every_n_steps: logging interval.
        progress: show a rich progress bar.
    """

    max_steps: int = 200
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    default_root_dir: str = "runs/rl"
    checkpoint_every_n_steps: int = 50
    log_every_n_steps: int = 10
    progress: bool = True

    def build(self, callbacks: Sequence[L.Callback] = ()) -> L.Trainer:
        import lightning as L
        from lightning.pytorch.callbacks import ModelCheckpoint
        from lightning.pytorch.loggers import CSVLogger

        from nabla.progress import lightning_progress

        if self.max_steps < 1:
            raise ConfigurationError(f"max_steps must be >= 1 (got {self.max_steps})")
        callbacks = list(callbacks)
        if self.checkpoint_every_n_steps:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=Path(self.default_root_dir) / "checkpoints",
                    filename="step{step}",
                    auto_insert_metric_name=False,
                    every_n_train_steps=self.checkpoint_every_n_steps,
                    save_top_k=-1,
                    save_last=True,
                )
            )
        show_bar, shown = lightning_progress(self.progress, "RL")
        callbacks += shown
        return L.Trainer(
            max_steps=self.max_steps,
            accelerator=self.accelerator,
            devices=self.devices,
            strategy=self.strategy,
            default_root_dir=self.default_root_dir,
            logger=CSVLogger(self.default_root_dir, name="logs"),
            log_every_n_steps=self.log_every_n_steps,
            enable_checkpointing=bool(self.checkpoint_every_n_steps),
            enable_progress_bar=show_bar,
            enable_model_summary=False,
            callbacks=callbacks,
            num_sanity_val_steps=0,
        )
