"""Tiny models built from configs (no hub, no download): a word-level tokenizer with a chat template, a causal
LM and a one-label classifier sharing its vocabulary. Used by the tests, the benchmarks and the quick start."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = (
    [str(n) for n in range(21)]
    + ["what", "is", "plus", "minus", "times", "the", "answer", "so", "we", "get", "add", "take", "away"]
    + ["apples", "pears", "has", "have", "and", "left", "total"]
    + ["=", "+", "-", "?", ".", ",", "\\boxed{", "}"]
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def tiny_tokenizer(words: list[str] | None = None, chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` (default: a small arithmetic vocabulary)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + (words if words is not None else WORDS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"],
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer: PreTrainedTokenizerFast, **overrides: int) -> LlamaConfig:
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_causal_lm(
    tokenizer: PreTrainedTokenizerFast, seed: int = 0, peak: float = 1.0, **overrides: int
) -> LlamaForCausalLM:
    """A random tiny causal LM. Its next-token distributions are nearly uniform (max probability about 0.02);
    ``peak > 1`` scales the output head so that they are peaked like a trained model's (``peak=20``: the sampled
    token is often the likeliest, so a resampled token is often the one already there)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer, **overrides)).eval()
    if peak != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(peak)
    return model


def tiny_classifier(
    tokenizer: PreTrainedTokenizerFast, seed: int = 1, **overrides: int
) -> LlamaForSequenceClassification:
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_config(tokenizer, **{"num_labels": 1, **overrides})).eval()


def save_tiny_models(folder: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Write a tiny policy and reward model with ``save_pretrained``; returns their folders."""
    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    policy_dir, reward_dir = folder / "policy", folder / "reward"
    tiny_causal_lm(tokenizer, seed).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    tiny_classifier(tokenizer, seed + 1).save_pretrained(reward_dir)
    tokenizer.save_pretrained(reward_dir)
    return policy_dir, reward_dir
