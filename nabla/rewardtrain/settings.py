"""Settings of the reward model's adapter and of its training (YAML sections ``lora`` and ``training``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nabla.errors import ConfigurationError, require_finite
from nabla.rewardtrain.corruption import KINDS

#: The folder of ``work_dir`` that holds the trained adapter and score head.
ADAPTER_FOLDER = "adapter"


@dataclass
class LoraSettings:
    """The LoRA adapter on the backbone; the score head is trained in full and saved with it.

    Args:
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / rank``).
        dropout: dropout on the LoRA input.
        target_modules: the linear layers that get an adapter (Llama names).
        layers: only these transformer layers get adapters (``null``: all); the upper layers alone are cheaper to
            train, since the backward pass stops at the lowest adapted layer.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    layers: list[int] | None = None

    def __post_init__(self) -> None:
        require_finite(self)
        if self.rank < 1 or self.alpha <= 0:
            raise ConfigurationError(f"lora.rank must be >= 1 and lora.alpha > 0 (got {self.rank}, {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigurationError(f"lora.dropout must be in [0, 1) (got {self.dropout})")
        if not self.target_modules:
            raise ConfigurationError("lora.target_modules is empty; name the linear layers to adapt, e.g. q_proj")


@dataclass
class TrainSettings:
    """How the reward model is trained.

    Args:
        loss: ``pointwise`` (binary cross-entropy of the score against correct / wrong), ``pairwise``
            (Bradley-Terry: each correct response of a problem should outscore each wrong one of the same
            problem), or ``both`` (their sum).
        balance: weight the rare class so that correct and wrong responses count equally (pointwise loss).
        lr: AdamW learning rate (linear warm-up over the first 10% of steps, then cosine decay to 10%).
        weight_decay: AdamW weight decay.
        epochs: passes over the training problems.
        problems_per_batch: problems per batch (all their responses go in the same batch, so that the pairwise
            loss sees each problem's pairs).
        accumulate_grad_batches: batches per optimiser step.
        gradient_clip: clip the gradient norm to this (``null``: no clipping).
        dedupe: train on each distinct response of a problem once.
        max_length: longest reward input in tokens; longer ones are skipped (and counted).
        cache_frozen_layers: when ``lora.layers`` leaves the lower layers without an adapter, run them once per
            input before training and train on their cached output (exact; saves their forward at every epoch).
        corruptions_per_response: synthetic process supervision (:mod:`nabla.rewardtrain.corruption`): up to this
            many wrong versions of every right training response, each corrupted at one step and graded wrong,
            trained beside it in the same batch (0: the graded samples alone). Held-out problems get none.
        corruption_kinds: which corruptions to draw from (``wrong_result``, ``wrong_operand``, ``wrong_operator``,
            ``wrong_box``, ``truncated``).
    """

    loss: Literal["pointwise", "pairwise", "both"] = "pointwise"
    balance: bool = True
    lr: float = 2e-4
    weight_decay: float = 0.0
    epochs: int = 2
    problems_per_batch: int = 2
    accumulate_grad_batches: int = 1
    gradient_clip: float | None = 1.0
    dedupe: bool = True
    max_length: int = 512
    cache_frozen_layers: bool = True
    corruptions_per_response: int = 0
    corruption_kinds: list[str] = field(default_factory=lambda: list(KINDS))

    def __post_init__(self) -> None:
        require_finite(self)
        if self.corruptions_per_response < 0:
            raise ConfigurationError(
                f"training.corruptions_per_response must be >= 0 (got {self.corruptions_per_response})"
            )
        unknown = [kind for kind in self.corruption_kinds if kind not in KINDS]
        if unknown or (self.corruptions_per_response and not self.corruption_kinds):
            raise ConfigurationError(
                f"training.corruption_kinds {unknown or 'is empty'}; choose from {', '.join(KINDS)}"
            )
        if self.loss not in ("pointwise", "pairwise", "both"):
            raise ConfigurationError(f"unknown training.loss {self.loss!r}; use pointwise, pairwise or both")
        if self.lr <= 0 or self.epochs < 1 or self.problems_per_batch < 1 or self.accumulate_grad_batches < 1:
            raise ConfigurationError("training.lr must be > 0 and epochs, problems_per_batch, accumulate >= 1")
        if self.max_length < 8:
            raise ConfigurationError(f"training.max_length must be >= 8 (got {self.max_length})")
