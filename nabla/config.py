"""Loadable specifications of the policy and the reward model, for YAML recipes and the CLI.

``name_or_path: default`` means the embedded default models (:mod:`nabla.defaults`); anything else is a local
folder saved with ``save_pretrained`` or, while online, a hub name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from nabla._typing import TYPE_CHECKING
from nabla.engines import EngineSpec
from nabla.errors import ConfigurationError, check_demonstrations, require_finite

if TYPE_CHECKING:  # the specs load without torch (a fast `--help`); the models are imported by `load`
    from nabla.policy import Policy
    from nabla.reward import RewardModel


@dataclass
class PolicySpec:
    """Which causal LM to load and how.

    Args:
        name_or_path: a folder saved with ``save_pretrained``, a hub name (online only), or ``default``: the
            embedded SmolLM2-135M-Instruct.
        dtype: the weights' dtype: ``float32``, ``bfloat16`` or ``float16`` (DTO's variables stay float32).
        device: where to run it (``cpu``, ``cuda``, ``cuda:1``, ...); the reward model must be on the same one.
        gguf_file: a GGUF file inside ``name_or_path`` to load (dequantised) instead of safetensors weights.
        adapter: a peft adapter folder merged on top of the weights.
        chat_template: wrap prompts in the tokenizer's chat template (``null``: when the tokenizer has one).
        system_prompt: a system turn for the chat template.
        demonstrations: worked examples put before every prompt, as ``[user, assistant]`` turns (``null``: the
            model's own: for ``default`` one worked one-line answer that makes the 135M model answer briefly and end
            with a boxed answer, for any other model none; ``[]``: none).
        allow_special_tokens_in_prompt: encode control tokens written in a prompt (``<|im_start|>``, ...) as
            control tokens, for pre-formatted prompts; by default a prompt is encoded as text and cannot forge a turn.
        engine: where rollouts come from (:class:`~nabla.engines.EngineSpec`): ``kind: hf`` (this model's own
            loop, the default), ``vllm`` or ``openai`` (with ``url``); DTO and the reward stay on this model.
    """

    name_or_path: str = "default"
    dtype: str = "float32"
    device: str = "cpu"
    gguf_file: str | None = None
    adapter: str | None = None
    chat_template: bool | None = None
    system_prompt: str | None = None
    demonstrations: list[tuple[str, str]] | None = None
    allow_special_tokens_in_prompt: bool = False
    engine: EngineSpec = field(default_factory=EngineSpec)

    def __post_init__(self) -> None:
        check_device_name(self.device)
        if self.demonstrations is not None:
            check_demonstrations(self.demonstrations)
        if self.engine.kind != "hf" and (self.adapter is not None or self.gguf_file is not None):
            raise ConfigurationError(
                f"engine kind {self.engine.kind} loads the folder's own weights, without adapter or GGUF file; save "
                "the merged model with save_pretrained and set name_or_path to that folder"
            )

    def resolved_path(self) -> str:
        """The folder or hub name to load (``default`` is converted on first use)."""
        from nabla.defaults import resolve_policy

        return resolve_policy(self.name_or_path)

    def load(self) -> Policy:
        from nabla.policy import Policy

        return Policy.from_pretrained(
            self.resolved_path(),
            dtype=self.dtype,
            device=self.device,
            gguf_file=self.gguf_file,
            adapter=self.adapter,
            chat_template=self.chat_template,
            system_prompt=self.system_prompt,
            demonstrations=self.demonstrations,  # None: the model's own, resolved by from_pretrained
            allow_special_tokens_in_prompt=self.allow_special_tokens_in_prompt,
            engine=self.engine.build(),
        )


@dataclass
class RewardSpec:
    """Which reward to load.

    Args:
        kind: ``classifier`` (a trained reward model: a one-label sequence classifier, or a process reward model
            when its saved config says so, see :mod:`nabla.prm`), ``self_judge`` (the policy judging its own
            answer, no training needed), or ``none``.
        name_or_path: the classifier's folder or hub name; ``default`` is the embedded trained reward model.
        adapter: a peft adapter (with its score head) merged on top of ``name_or_path``.
        dtype: the weights' dtype: ``float32``, ``bfloat16`` or ``float16``.
        device: where to run it; the same device as the policy.
        chat_template: score the response as the assistant turn of the reward model's chat template (``null``:
            when its tokenizer has one); otherwise ``prompt + newline + response``.
        min_vocab_coverage: the least share of the policy's vocabulary that must map onto the reward model's
            tokens when the two tokenizers differ (DTO feeds it soft tokens over the policy's vocabulary).
        allow_untrained_head: load a folder without trained head weights (a causal LM's) with a randomly
            initialised head; refused by default, since its scores mean nothing.
        allow_special_tokens_in_prompt: as for the policy: encode control tokens written in a prompt as such.
        aggregation: a process reward model's rule for turning step scores into one reward (``last``, ``min``,
            ``prod``, ``mean``; ``null``: the one it was saved with).
        process_reward: ``likelihood``: read the causal LM ``name_or_path`` (``default``: the default policy) as a
            likelihood process reward model (:class:`nabla.prm.LikelihoodProcessReward`), whatever its config says.
        step_separator: the text that ends a step of a process reward model (``null``: the one it was saved with).
    """

    kind: Literal["classifier", "self_judge", "none"] = "classifier"
    name_or_path: str = "default"
    adapter: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    chat_template: bool | None = None
    min_vocab_coverage: float = 0.9
    allow_untrained_head: bool = False
    allow_special_tokens_in_prompt: bool = False
    aggregation: Literal["last", "min", "prod", "mean"] | None = None
    process_reward: Literal["likelihood"] | None = None
    step_separator: str | None = None

    def __post_init__(self) -> None:
        require_finite(self)
        if self.process_reward not in (None, "likelihood"):
            raise ConfigurationError(f"reward.process_reward must be likelihood or null (got {self.process_reward!r})")
        if self.step_separator == "":
            raise ConfigurationError("reward.step_separator is empty; give the text that ends a step, or null")
        if self.aggregation is not None and self.aggregation not in ("last", "min", "prod", "mean"):
            raise ConfigurationError(f"reward.aggregation must be last, min, prod or mean (got {self.aggregation!r})")
        if not 0.0 <= self.min_vocab_coverage <= 1.0:
            raise ConfigurationError(f"min_vocab_coverage must be in [0, 1] (got {self.min_vocab_coverage})")
        check_device_name(self.device)

    def load(self, policy: Policy | None = None) -> RewardModel | None:
        if self.kind == "none":
            return None
        if self.kind == "self_judge":
            from nabla.judge import SelfJudgeReward

            if policy is None:
                raise ConfigurationError("reward.kind=self_judge needs the policy to be loaded first")
            judge = SelfJudgeReward.from_policy(policy)
            judge.allow_special_tokens_in_prompt = self.allow_special_tokens_in_prompt
            return judge
        if self.kind != "classifier":
            raise ConfigurationError(f"unknown reward kind {self.kind!r}; use classifier, self_judge or none")
        from nabla.defaults import resolve_reward
        from nabla.reward import RewardModel

        if self.process_reward is None:
            path, adapter = resolve_reward(self.name_or_path, self.adapter)
        else:
            path, adapter = self.name_or_path, self.adapter
        steps = {"step_separator": self.step_separator} if self.step_separator is not None else {}
        if self.process_reward is not None:
            steps["process_reward"] = self.process_reward
        return RewardModel.from_pretrained(
            path,
            **steps,
            aggregation=self.aggregation,
            dtype=self.dtype,
            device=self.device,
            adapter=adapter,
            chat_template=self.chat_template,
            min_vocab_coverage=self.min_vocab_coverage,
            allow_untrained_head=self.allow_untrained_head,
            allow_special_tokens_in_prompt=self.allow_special_tokens_in_prompt,
        )


#: device types a spec may name (with an optional ``:index``); whether this machine has one is checked on load
DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "mps", "xpu", "npu", "hpu")


def check_device_name(device: str) -> None:
    """Refuse a device string that names no device type (``cuda:0`` passes; ``banana`` and ``cuda:x`` do not)."""
    kind, _, index = str(device).partition(":")
    if kind not in DEVICE_TYPES or (index and not index.isdigit()) or (_ and not index):
        raise ConfigurationError(f"unknown device {device!r}; use {', '.join(DEVICE_TYPES[:3])} or e.g. cuda:1")
