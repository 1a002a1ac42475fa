"""Loadable specifications of the policy and the reward model, for YAML recipes and the CLI.

``name_or_path: default`` means the embedded default models (:mod:`nabla.defaults`); anything else is a local
folder saved with ``save_pretrained`` or, while online, a hub name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from nabla.errors import ConfigurationError
from nabla.policy import Policy
from nabla.reward import RewardModel, SequenceClassifierReward


@dataclass
class PolicySpec:
    """Which causal LM to load and how."""

    name_or_path: str = "default"
    dtype: str = "float32"
    device: str = "cpu"
    gguf_file: str | None = None
    adapter: str | None = None
    chat_template: bool | None = None
    system_prompt: str | None = None

    def resolved_path(self) -> str:
        if self.name_or_path == "default":
            from nabla.defaults import default_policy_dir

            return str(default_policy_dir())
        return self.name_or_path

    def load(self) -> Policy:
        return Policy.from_pretrained(
            self.resolved_path(),
            dtype=self.dtype,
            device=self.device,
            gguf_file=self.gguf_file,
            adapter=self.adapter,
            chat_template=self.chat_template,
            system_prompt=self.system_prompt,
        )


@dataclass
class RewardSpec:
    """Which reward to load.

    Args:
        kind: ``classifier`` (a one-label sequence classifier), ``self_judge`` (the policy judging its own
            answer, no training needed), or ``none``.
        name_or_path: the classifier's folder or hub name; ``default`` is the embedded trained reward model.
        adapter: a peft adapter (with its score head) merged on top of ``name_or_path``.
    """

    kind: Literal["classifier", "self_judge", "none"] = "classifier"
    name_or_path: str = "default"
    adapter: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    chat_template: bool | None = None
    min_vocab_coverage: float = 0.9

    def load(self, policy: Policy | None = None) -> RewardModel | None:
        if self.kind == "none":
            return None
        if self.kind == "self_judge":
            from nabla.judge import SelfJudgeReward

            if policy is None:
                raise ConfigurationError("reward.kind=self_judge needs the policy to be loaded first")
            return SelfJudgeReward.from_policy(policy)
        if self.kind != "classifier":
            raise ConfigurationError(f"unknown reward kind {self.kind!r}; use classifier, self_judge or none")
        path, adapter = self.name_or_path, self.adapter
        if path == "default":
            from nabla.defaults import default_policy_dir, default_reward_adapter

            path, adapter = str(default_policy_dir()), str(adapter or default_reward_adapter())
        return SequenceClassifierReward.from_pretrained(
            path,
            dtype=self.dtype,
            device=self.device,
            adapter=adapter,
            chat_template=self.chat_template,
            min_vocab_coverage=self.min_vocab_coverage,
        )
