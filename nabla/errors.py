"""Typed errors. Every error a user can cause is a :class:`NablaError` with a one-line message that names the
problem and the fix; the CLI turns these into a single line on stderr and exit code 2."""

from __future__ import annotations


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


class DataError(NablaError, ValueError):
    """A dataset or records file is missing, malformed or inconsistent."""
