"""nabla: ∇-Reasoner, test-time gradient descent for language-model reasoning, and its KL-regularised RL dual."""

from nabla.callbacks import Callback, LoggerCallback, ProgressBar
from nabla.cost import CostMeter
from nabla.errors import (
    ConfigurationError,
    DataError,
    DeviceMismatchError,
    ModelNotFoundError,
    NablaError,
    PromptError,
    RewardNotDifferentiableError,
    VocabularyMismatchError,
)
from nabla.optimizer import DTOObjective, LatentOptimizer
from nabla.policy import Policy, Rollout
from nabla.reward import CallableReward, RewardModel, SequenceClassifierReward, TransformerReward
from nabla.sampler import Sampler, SamplingConfig, TokenSelection
from nabla.trainer import Acceleration, FitResult, TestTimeTrainer

__version__ = "0.1.0"

__all__ = [
    "Acceleration",
    "CallableReward",
    "Callback",
    "ConfigurationError",
    "CostMeter",
    "DTOObjective",
    "DataError",
    "DeviceMismatchError",
    "FitResult",
    "LatentOptimizer",
    "LoggerCallback",
    "ModelNotFoundError",
    "NablaError",
    "Policy",
    "ProgressBar",
    "PromptError",
    "RewardModel",
    "RewardNotDifferentiableError",
    "Rollout",
    "Sampler",
    "SamplingConfig",
    "SequenceClassifierReward",
    "TestTimeTrainer",
    "TokenSelection",
    "TransformerReward",
    "VocabularyMismatchError",
]
