"""Model configurations of the world: a small ``LlamaForCausalLM`` policy and a ``LlamaForSequenceClassification``
reward model over the same vocabulary, both plain Hugging Face models saved with ``save_pretrained``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nabla._typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported where it is used: ModelSize loads without it (a fast `--help`)
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        LlamaForTokenClassification,
        PreTrainedTokenizerBase,
    )


def reward_class(head: str) -> type[LlamaForSequenceClassification] | type[LlamaForTokenClassification]:
    """The classifier class of a reward head: one score at the last token (``sequence``, outcome) or at every
    token (``token``, process)."""
    from transformers import LlamaForSequenceClassification, LlamaForTokenClassification

    return {"sequence": LlamaForSequenceClassification, "token": LlamaForTokenClassification}[head]


@dataclass
class ModelSize:
    """Size of a Llama model (defaults: 0.16M parameters, trains on one CPU core in a few minutes).

    Args:
        hidden_size: width of the residual stream.
        num_layers: decoder layers.
        num_heads: attention heads.
        num_kv_heads: key/value heads (fewer than ``num_heads``: grouped-query attention).
        intermediate_size: width of the MLP.
        max_positions: the longest sequence (prompt and response).
    """

    hidden_size: int = 64
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 192
    max_positions: int = 128

    def config(self, tokenizer: PreTrainedTokenizerBase, **extra: object) -> LlamaConfig:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            **extra,
        )


def new_policy(tokenizer: PreTrainedTokenizerBase, size: ModelSize, seed: int) -> LlamaForCausalLM:
    """A freshly initialised causal LM (weights drawn from ``seed``)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(size.config(tokenizer))


def reward_from_policy(
    policy_dir: str | Path, seed: int, extra_layers: int = 0, head: str = "sequence", **config_extra: object
) -> LlamaForSequenceClassification | LlamaForTokenClassification:
    """The reward model starts from the trained policy's body (it already reads the task), as reward models usually
    start from the policy they judge, with a new score head and ``extra_layers`` new decoder layers on top.

    The policy's last layer predicts each next token; a layer above it can compare that prediction with the token
    that follows and flag a wrong step, and another can gather the flags at the last position, where the reward
    is read. New layers start near the identity (small random weights on the residual stream).

    ``head``: ``sequence`` (a ``LlamaForSequenceClassification``, read at the last token) or ``token`` (a
    ``LlamaForTokenClassification``, a process reward model's head); ``config_extra`` goes into its config
    (e.g. a PRM's ``step_separator``).
    """
    model, _ = _on_policy_body(policy_dir, seed, extra_layers, reward_class(head), num_labels=1, **config_extra)
    return model


def deepened_policy(policy_dir: str | Path, extra_layers: int, seed: int) -> LlamaForCausalLM:
    """The trained policy with ``extra_layers`` new decoder layers on top of its own, each starting as the exact
    identity (its attention output and MLP down projections zero, so it adds nothing to the residual stream):
    the deeper model predicts exactly what the policy does until training moves the new layers."""
    import torch
    from transformers import LlamaForCausalLM

    if extra_layers == 0:
        torch.manual_seed(seed)
        return LlamaForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32)
    model, source = _on_policy_body(policy_dir, seed, extra_layers, LlamaForCausalLM)
    model.lm_head.load_state_dict(source.lm_head.state_dict())
    with torch.no_grad():
        for layer in model.model.layers[source.config.num_hidden_layers :]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model


def _on_policy_body(
    policy_dir: str | Path, seed: int, extra_layers: int, model_class: type, **config_overrides: object
) -> tuple:
    """A new ``model_class`` with the trained policy's body (embeddings, decoder layers, final norm) and
    ``extra_layers`` freshly initialised decoder layers on top (drawn after seeding ``seed``), and the policy."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    source = LlamaForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32)
    config = LlamaConfig.from_dict(source.config.to_dict())
    config.num_hidden_layers += extra_layers
    for key, value in config_overrides.items():
        setattr(config, key, value)
    config.architectures = [model_class.__name__]
    model = model_class(config)
    missing, unexpected = model.model.load_state_dict(source.model.state_dict(), strict=False)
    new = tuple(f"layers.{i}." for i in range(source.config.num_hidden_layers, config.num_hidden_layers))
    if unexpected or not all(key.startswith(new) for key in missing):
        raise RuntimeError(
            f"the policy's body does not fit the {model_class.__name__}: missing {missing}, unexpected {unexpected}"
        )
    return model, source


def new_reward(
    tokenizer: PreTrainedTokenizerBase, size: ModelSize, seed: int, head: str = "sequence", **config_extra: object
) -> LlamaForSequenceClassification | LlamaForTokenClassification:
    """A freshly initialised one-label classifier (for a reward model trained from scratch); ``head`` and
    ``config_extra`` as in :func:`reward_from_policy`."""
    import torch

    torch.manual_seed(seed)
    return reward_class(head)(size.config(tokenizer, num_labels=1, **config_extra))
