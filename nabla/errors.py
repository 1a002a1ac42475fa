"""Typed errors. Every error a user can cause is a :class:`NablaError` with a one-line message that names the
problem and the fix; the CLI turns these into a single line on stderr and exit code 2."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from typing import Any


class NablaError(Exception):
    """Base class of every error nabla raises on purpose."""


class ConfigurationError(NablaError, ValueError):
    """A setting is out of its valid range or two settings contradict each other."""


class PromptError(NablaError, ValueError):
    """The prompt cannot be decoded from: empty, or longer than the model's context window."""


class RewardNotDifferentiableError(NablaError, TypeError):
    """A reward without a gradient was used where DTO needs one."""


class DeviceMismatchError(NablaError, RuntimeError):
    """Policy and reward model sit on different devices."""


class VocabularyMismatchError(NablaError, ValueError):
    """Too little of the policy's vocabulary maps onto the reward model's."""


class ModelNotFoundError(NablaError, FileNotFoundError):
    """A model or package that holds weights is not installed or not found."""


class CorruptModelError(NablaError, OSError):
    """A model's files are there but cannot be read (a truncated or corrupt weights file)."""


class DataError(NablaError, ValueError):
    """A dataset or records file is missing, malformed or inconsistent."""


class EngineError(NablaError, RuntimeError):
    """A rollout engine answered with something unusable (no token ids, an unknown finish reason, a refusal)."""


class EngineUnavailableError(EngineError, ConnectionError):
    """A rollout engine cannot be used: its package is not installed, or its server does not answer."""


class InvalidRewardError(NablaError, ValueError):
    """A reward model returned something that is not a number."""


class NonFiniteRewardError(InvalidRewardError):
    """A reward model returned NaN or an infinite reward."""


def require_finite(settings: Any, *, allow_inf: tuple[str, ...] = ()) -> None:
    """Refuse a NaN or infinite float field of the dataclass ``settings`` (also inside list or tuple fields).

    Range checks such as ``value < 0`` let NaN through, and YAML spells it ``.nan``: every settings class calls this
    first in ``__post_init__``, so recipes, the command line and Python are checked alike. ``allow_inf`` names the
    fields where ``+inf`` means something (e.g. no KL penalty).
    """
    assert is_dataclass(settings)
    for item in fields(settings):
        value = getattr(settings, item.name)
        for number in value if isinstance(value, (list, tuple)) else (value,):
            if isinstance(number, float) and not math.isfinite(number):
                if number == math.inf and item.name in allow_inf:
                    continue
                raise ConfigurationError(
                    f"{item.name} must be a finite number (got {number}); set {item.name} to a real number"
                )


def check_seed(seed: object) -> int:
    """``seed`` if it can seed a ``torch.Generator`` (an integer in ``[0, 2**63)``), else a ConfigurationError."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ConfigurationError(f"seed must be an integer in [0, 2**63) (got {seed!r}); pass e.g. --seed 0")
    return seed


def check_demonstrations(demonstrations: Sequence[Sequence[str]]) -> tuple[tuple[str, str], ...]:
    """Worked examples as ``(user, assistant)`` pairs of non-empty strings, or a :class:`ConfigurationError`."""
    pairs = tuple(tuple(pair) for pair in demonstrations)
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(turn, str) and turn.strip() for turn in pair):
            raise ConfigurationError(
                f"a demonstration is a [user, assistant] pair of non-empty strings (got {list(pair)!r})"
            )
    return pairs  # type: ignore[return-value]
