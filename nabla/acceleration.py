"""The exact savings of the decoding loop, as settings (a module of its own so that the command line can read
them without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Acceleration:
    """Exact savings of the loop; none of them changes the decoded tokens.

    Args:
        prefix_cache: reuse the key/value states of prompt ⊕ committed tokens across DTO steps (policy and
            reward model) instead of re-encoding them at every step.
        reuse_rollout_gradient: one gradient pass per rollout serves token selection at every position and the
            first DTO step at each selected position (causality: committing leading tokens unchanged leaves the
            gradient of the later one-hots as it was).
        reuse_rollout_cache: proposals continue from the current rollout's key/value states.
        reuse_rollout_reward: the current rollout's reward is computed once, not at every acceptance test.
    """

    prefix_cache: bool = True
    reuse_rollout_gradient: bool = True
    reuse_rollout_cache: bool = True
    reuse_rollout_reward: bool = True

    @classmethod
    def reference(cls) -> Acceleration:
        """Everything recomputed every time (the authors' release, for debugging and benchmarks)."""
        return cls(False, False, False, False)
