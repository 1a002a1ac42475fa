"""Shared fixtures: tiny models built from configs once per session (no hub, no download)."""

from __future__ import annotations

import os

import pytest
import torch

from nabla.reward import RewardModel

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one intra-op thread is fastest, and safe on a busy 2-core machine


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run the slow real-model tests")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow") or os.environ.get("NABLA_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow real-model test: opt in with --run-slow or NABLA_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from nabla.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def policy(tokenizer):
    from nabla import Policy
    from nabla.tiny import tiny_causal_lm

    return Policy(tiny_causal_lm(tokenizer, seed=0), tokenizer)


@pytest.fixture(scope="session")
def reward(tokenizer, policy):
    from nabla import SequenceClassifierReward
    from nabla.tiny import tiny_classifier

    model = SequenceClassifierReward(tiny_classifier(tokenizer, seed=1), tokenizer)
    model.bind(policy)
    return model


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory):
    from nabla.tiny import save_tiny_models

    return save_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models run fastest so, and two threads crawl on a busy 2-core machine
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


PROMPT = "what is 2 plus 3 ?"


class TokenBonusReward(RewardModel):
    """A differentiable reward without a model: ``bonus`` per occurrence of ``token`` in the response.

    Its soft score is ``bonus * Σ_i y_i[token]``, so DTO's reward gradient points straight at ``token``.
    """

    differentiable = True

    def __init__(self, token: int, tokenizer, bonus: float = 5.0) -> None:
        self.token, self.tokenizer, self.bonus = token, tokenizer, bonus
        self.calls: list[tuple[str, str]] = []

    device = None

    def bind(self, policy) -> None:
        self.policy = policy

    def score(self, prompts, responses, response_ids=None, meter=None):
        self.calls.extend(zip(prompts, responses))
        if meter is not None:
            meter.update("rm_forward", len(prompts))
        ids = response_ids or [self.tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
        return torch.tensor([self.bonus * list(r).count(self.token) for r in ids], dtype=torch.float32)

    def context(self, prompt, committed, *, use_cache, meter=None):
        from nabla.reward import RewardContext

        empty = torch.zeros(0, dtype=torch.long)
        return RewardContext(prompt, empty, torch.tensor(list(committed), dtype=torch.long), empty)

    def extend(self, context, new_ids, meter=None):
        return self.context(context.prompt, context.committed.tolist() + list(new_ids), use_cache=True)

    def score_soft(self, y, context, meter=None):
        fixed = float((context.committed == self.token).sum())
        return self.bonus * (y[:, self.token].sum() + fixed)

    def forward_flops(self, tokens, soft_tokens=0):
        return 0.0
