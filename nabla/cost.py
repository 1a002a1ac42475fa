"""Cost accounting: one meter, received by every component, read once at the end.

A *model call* follows the paper: one autoregressive step, or one parallel forward or backward pass over a
sequence. FLOPs follow the usual estimate: ``2 * P * tokens`` for a forward pass and twice that for a backward
pass, where ``P`` counts the parameters that do matrix work (the input embedding table is a lookup and is left
out, except for soft inputs, where it is a real ``V x d`` matrix product).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

#: Kinds that are model calls; ``model_calls`` is their sum.
CALL_KINDS: tuple[str, ...] = (
    "lm_forward",
    "lm_backward",
    "rm_forward",
    "rm_backward",
    "generated_tokens",
    "prefill",
    "selector",
)
#: Counters of the decoding loop that are not model calls. Full gradient passes (one forward and backward of each
#: model at one text) by purpose: ``selector_passes`` for gradient-norm token selection, ``dto_passes`` for DTO steps.
#: ``grad_steps`` are DTO steps with the gradient at their own text (a pass run for them, or the rollout's pass
#: shared by reuse); ``cached_steps`` reused the previous step's gradient (the text had not changed).
EVENT_KINDS: tuple[str, ...] = (
    "rollouts",
    "proposals",
    "rejections",
    "acceptances",
    "dto_runs",
    "grad_steps",
    "cached_steps",
    "selector_passes",
    "dto_passes",
    "wall_time_s",
    "flops",
)
#: Kinds that are measured amounts, not counts (counts are reported as integers).
AMOUNT_KINDS: frozenset[str] = frozenset({"wall_time_s", "flops"})


class CostMeter(Metric):
    """Sums of model calls, FLOPs and loop events, as a torchmetrics ``Metric`` so that it syncs across ranks."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for kind in CALL_KINDS + EVENT_KINDS:
            self.add_state(kind, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, kind: str, count: float = 1.0, flops: float = 0.0) -> None:  # type: ignore[override]
        if kind not in CALL_KINDS + EVENT_KINDS:
            raise KeyError(f"unknown cost kind {kind!r}; known: {', '.join(CALL_KINDS + EVENT_KINDS)}")
        state: Tensor = getattr(self, kind)
        state += count
        if flops:
            self.flops += flops

    def compute(self) -> dict[str, float]:
        return self.snapshot()

    def snapshot(self) -> dict[str, float | int]:
        """The current sums (counts as integers), with ``model_calls``, ``gradient_passes`` and ``rejection_rate``
        derived (safe to call mid-run)."""
        values: dict[str, float | int] = {}
        for kind in CALL_KINDS + EVENT_KINDS:
            total = float(getattr(self, kind))
            values[kind] = total if kind in AMOUNT_KINDS else round(total)
        values["model_calls"] = sum(values[kind] for kind in CALL_KINDS)
        values["gradient_passes"] = values["selector_passes"] + values["dto_passes"]
        proposals = values["proposals"]
        values["rejection_rate"] = values["rejections"] / proposals if proposals else 0.0
        return values


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters that take part in matrix products for one hard token: all but the input embedding table,
    plus the output head once even when it is tied to the input embedding."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    embedding_ids = {id(p) for p in embedding.parameters()} if embedding is not None else set()
    total = sum(p.numel() for p in model.parameters() if id(p) not in embedding_ids)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head.weight) in embedding_ids:
        total += head.weight.numel()
    return total


def forward_flops(params: int, tokens: int) -> float:
    return 2.0 * params * tokens


def backward_flops(params: int, tokens: int) -> float:
    return 4.0 * params * tokens
