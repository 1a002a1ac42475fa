"""nabla: ∇-Reasoner, test-time gradient descent for language-model reasoning, and its KL-regularised RL dual.

The names below are imported on first use (module ``__getattr__``), so that ``import nabla`` and the command line's
``--help`` do not pay for torch and transformers before they are needed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nabla.acceleration import Acceleration
    from nabla.callbacks import Callback, LoggerCallback, ProgressBar
    from nabla.cost import CostMeter
    from nabla.engines import EngineSpec, HFEngine, OpenAIEngine, RolloutEngine, VLLMEngine
    from nabla.errors import (
        ConfigurationError,
        CorruptModelError,
        DataError,
        DeviceMismatchError,
        EngineError,
        EngineUnavailableError,
        InvalidRewardError,
        ModelNotFoundError,
        NablaError,
        NonFiniteRewardError,
        PromptError,
        RewardNotDifferentiableError,
        VocabularyMismatchError,
    )
    from nabla.mcmc import MCMCResult, MCMCSampler, MCMCSettings
    from nabla.optimizer import DTOObjective, LatentOptimizer
    from nabla.policy import Policy, Rollout
    from nabla.prm import LikelihoodProcessReward, ProcessRewardModel
    from nabla.reward import CallableReward, RewardModel, SequenceClassifierReward, TransformerReward
    from nabla.sampler import Sampler, SamplingConfig, TokenSelection
    from nabla.scheduling import PromptPool
    from nabla.trainer import FitResult, TestTimeTrainer

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "Acceleration": "nabla.acceleration",
    "CallableReward": "nabla.reward",
    "Callback": "nabla.callbacks",
    "ConfigurationError": "nabla.errors",
    "CorruptModelError": "nabla.errors",
    "CostMeter": "nabla.cost",
    "DTOObjective": "nabla.optimizer",
    "DataError": "nabla.errors",
    "DeviceMismatchError": "nabla.errors",
    "EngineError": "nabla.errors",
    "EngineSpec": "nabla.engines",
    "EngineUnavailableError": "nabla.errors",
    "FitResult": "nabla.trainer",
    "HFEngine": "nabla.engines",
    "InvalidRewardError": "nabla.errors",
    "LatentOptimizer": "nabla.optimizer",
    "LikelihoodProcessReward": "nabla.prm",
    "LoggerCallback": "nabla.callbacks",
    "MCMCResult": "nabla.mcmc",
    "MCMCSampler": "nabla.mcmc",
    "MCMCSettings": "nabla.mcmc",
    "ModelNotFoundError": "nabla.errors",
    "NablaError": "nabla.errors",
    "NonFiniteRewardError": "nabla.errors",
    "OpenAIEngine": "nabla.engines",
    "Policy": "nabla.policy",
    "ProcessRewardModel": "nabla.prm",
    "ProgressBar": "nabla.callbacks",
    "PromptError": "nabla.errors",
    "PromptPool": "nabla.scheduling",
    "RewardModel": "nabla.reward",
    "RewardNotDifferentiableError": "nabla.errors",
    "RolloutEngine": "nabla.engines",
    "Rollout": "nabla.policy",
    "Sampler": "nabla.sampler",
    "SamplingConfig": "nabla.sampler",
    "SequenceClassifierReward": "nabla.reward",
    "TestTimeTrainer": "nabla.trainer",
    "TokenSelection": "nabla.sampler",
    "TransformerReward": "nabla.reward",
    "VLLMEngine": "nabla.engines",
    "VocabularyMismatchError": "nabla.errors",
}

__all__ = [  # the same names as _EXPORTS, spelled out for linters and type checkers
    "Acceleration",
    "CallableReward",
    "Callback",
    "ConfigurationError",
    "CorruptModelError",
    "CostMeter",
    "DTOObjective",
    "DataError",
    "DeviceMismatchError",
    "EngineError",
    "EngineSpec",
    "EngineUnavailableError",
    "FitResult",
    "HFEngine",
    "InvalidRewardError",
    "LatentOptimizer",
    "LikelihoodProcessReward",
    "LoggerCallback",
    "MCMCResult",
    "MCMCSampler",
    "MCMCSettings",
    "ModelNotFoundError",
    "NablaError",
    "NonFiniteRewardError",
    "OpenAIEngine",
    "Policy",
    "ProcessRewardModel",
    "ProgressBar",
    "PromptError",
    "PromptPool",
    "RewardModel",
    "RewardNotDifferentiableError",
    "Rollout",
    "RolloutEngine",
    "Sampler",
    "SamplingConfig",
    "SequenceClassifierReward",
    "TestTimeTrainer",
    "TokenSelection",
    "TransformerReward",
    "VLLMEngine",
    "VocabularyMismatchError",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nabla' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
