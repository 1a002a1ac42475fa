"""Shared set-up of the benchmarks: prompts, models (the default SmolLM2 or the tiny ones) and timing."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager

import torch

from nabla import Policy, SequenceClassifierReward

#: the tiny tokenizer's words, for prompts the tiny models can read
TINY_WORDS = ["what is 2 plus 3 ?", "what is 7 minus 2 ?", "apples and pears so we get the total ?"]


def load_prompts(dataset: str, count: int, template: str | None = None) -> list[str]:
    """``tiny``: short prompts in the tiny tokenizer's words; ``name:split`` or ``jsonl:PATH``: problems formatted
    with the evaluation's prompt template (or ``template``)."""
    if dataset.startswith("tiny"):
        return [f"{TINY_WORDS[i % len(TINY_WORDS)]} {i % 20}" for i in range(count)]
    from nabla.eval.datasets import format_question, load_dataset, load_jsonl

    if dataset.startswith("jsonl:"):
        problems = load_jsonl(dataset.split(":", 1)[1])[:count]
    else:
        name, split = dataset.split(":")
        problems = load_dataset(name, split, limit=count)
    return [format_question(p.question, template) if template else format_question(p.question) for p in problems]


def load_models(model: str) -> tuple[Policy, SequenceClassifierReward]:
    """``default``: SmolLM2-135M-Instruct with a score head on the same backbone; ``tiny``: models from configs
    (``tiny-peaked``: with peaked next-token distributions, so that DTO runs also end with the token kept).

    The benchmarks time compute, which does not depend on whether the score head was trained, so the default
    case falls back to an untrained head when the trained adapter is absent.
    """
    if model in ("tiny", "tiny-peaked"):
        from nabla.tiny import tiny_causal_lm, tiny_classifier, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        peak = 20.0 if model == "tiny-peaked" else 1.0
        policy = Policy(tiny_causal_lm(tokenizer, peak=peak, max_position_embeddings=4096), tokenizer)
        reward = SequenceClassifierReward(tiny_classifier(tokenizer, max_position_embeddings=4096), tokenizer)
    else:
        from nabla.config import PolicySpec, RewardSpec
        from nabla.errors import ModelNotFoundError

        policy = PolicySpec(name_or_path=model).load()
        try:
            reward = RewardSpec(name_or_path=model).load(policy)
        except ModelNotFoundError:
            path = PolicySpec(name_or_path=model).resolved_path()
            reward = SequenceClassifierReward.from_pretrained(path, allow_untrained_head=True)
    reward.bind(policy)
    return policy, reward


@contextmanager
def timer() -> Callable[[], float]:
    start = time.perf_counter()
    elapsed = [0.0]
    yield lambda: elapsed[0]
    elapsed[0] = time.perf_counter() - start


def threads(count: int | None) -> None:
    if count:
        torch.set_num_threads(count)
