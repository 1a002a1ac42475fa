"""A world small enough to enumerate every response, so that ``ρ*(y|x) ∝ π_ref(y|x) · exp(λ·r(x, y))`` is exact.

Vocabulary: three symbols ``a b c`` and the end token ``</s>``. A prompt is one symbol; a response is what
:meth:`nabla.Policy.generate` can return with ``max_new_tokens = K``: up to ``K - 1`` symbols followed by ``</s>``,
or ``K`` symbols cut by the length limit (40 responses for K = 3). The policy is a tiny ``LlamaForCausalLM`` trained
to a non-uniform π_ref; the reward is a tiny ``LlamaForSequenceClassification`` (read through
:class:`nabla.SequenceClassifierReward`, so it is differentiable for DTO) trained to score the share of the
prompt's *successor* symbol in the response (a→b, b→c, c→a). Both are ordinary models: what the methods see is
their actual output, and ρ* is computed from those outputs, never from the training targets.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from nabla.errors import ConfigurationError
from nabla.policy import Policy
from nabla.reward import SequenceClassifierReward
from nabla.rl.module import response_log_probs
from nabla.tiny import tiny_config

EOS = "</s>"
SYMBOLS = ("a", "b", "c")


def world_tokenizer() -> PreTrainedTokenizerFast:
    """``</s>`` (id 0, also padding) and the symbols: four tokens, no unknown token, no template."""
    vocab = {token: index for index, token in enumerate((EOS, *SYMBOLS))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)


def world_config(tokenizer: PreTrainedTokenizerFast, **extra: int) -> LlamaConfig:
    """The tiny Llama of :mod:`nabla.tiny`, with this world's single end token and no BOS."""
    return tiny_config(
        tokenizer, max_position_embeddings=16, bos_token_id=None, eos_token_id=tokenizer.eos_token_id, **extra
    )  # type: ignore[arg-type]


def enumerate_responses(symbols: Sequence[int], eos: Sequence[int], max_new_tokens: int) -> list[tuple[int, ...]]:
    """Every response the sampler can return: ``s ⊕ e`` for ``|s| < K`` and an end token ``e``, and ``s`` for
    ``|s| = K`` (cut by length)."""
    responses: list[tuple[int, ...]] = []
    for length in range(max_new_tokens):
        for body in itertools.product(symbols, repeat=length):
            responses.extend((*body, e) for e in eos)
    responses.extend(itertools.product(symbols, repeat=max_new_tokens))
    return responses


def successor_share(prompt: str, response: Sequence[str]) -> float:
    """The reward model's training target: the share of the prompt's successor symbol among the K slots."""
    target = SYMBOLS[(SYMBOLS.index(prompt) + 1) % len(SYMBOLS)]
    return sum(token == target for token in response) / 3.0


@dataclass
class EnumerableWorld:
    """The policy, the reward and the enumerated responses of each prompt."""

    policy: Policy
    reward: SequenceClassifierReward
    prompts: list[str]
    max_new_tokens: int = 3

    def __post_init__(self) -> None:
        self.reward.bind(self.policy)

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        return self.policy.tokenizer  # type: ignore[return-value]

    @property
    def symbol_ids(self) -> list[int]:
        return [i for i in range(self.policy.vocab_size) if i not in self.policy.eos_token_ids]

    def responses(self) -> list[tuple[int, ...]]:
        return enumerate_responses(self.symbol_ids, sorted(self.policy.eos_token_ids), self.max_new_tokens)

    def index(self) -> dict[tuple[int, ...], int]:
        return {response: i for i, response in enumerate(self.responses())}

    @torch.no_grad()
    def log_probs(self, prompt: str, model: torch.nn.Module | None = None) -> Tensor:
        """``log π(y | prompt)`` of every response (float64), from one batched forward of ``model`` (default: the
        world's policy)."""
        responses = self.responses()
        context = self.policy.encode(prompt)
        values = response_log_probs(model or self.policy.model, [context] * len(responses), responses, 0)
        return values.sequence().double()

    @torch.no_grad()
    def rewards(self, prompt: str) -> Tensor:
        responses = self.responses()
        texts = [self.policy.decode(r) for r in responses]
        return self.reward.score([prompt] * len(responses), texts, responses).double()

    def rho_star(self, prompt: str, lam: float, log_probs: Tensor | None = None) -> Tensor:
        """``ρ*(y) ∝ π_ref(y) · exp(λ r(y))`` over :meth:`responses` (float64, sums to 1)."""
        log_pi = self.log_probs(prompt) if log_probs is None else log_probs
        return torch.softmax(log_pi + lam * self.rewards(prompt), dim=0)

    def distribution(self, samples: Sequence[Sequence[int]]) -> Tensor:
        """The empirical distribution of sampled responses over :meth:`responses`."""
        index = self.index()
        counts = torch.zeros(len(index), dtype=torch.float64)
        for sample in samples:
            key = tuple(sample)
            if key not in index:
                raise ConfigurationError(
                    f"{key} is not a response of this world (max_new_tokens={self.max_new_tokens})"
                )
            counts[index[key]] += 1
        return counts / max(1, len(samples))

    @torch.no_grad()
    def brute_force_probabilities(self, prompt: str) -> dict[tuple[int, ...], float]:
        """π(y | prompt) by walking the tree of continuations one unbatched, uncached forward at a time (an
        independent check of :meth:`log_probs` and of :meth:`responses`)."""
        eos = self.policy.eos_token_ids
        context = self.policy.encode(prompt).tolist()
        found: dict[tuple[int, ...], float] = {}

        def walk(prefix: tuple[int, ...], probability: float) -> None:
            if len(prefix) == self.max_new_tokens or (prefix and prefix[-1] in eos):
                found[prefix] = probability
                return
            ids = torch.tensor([context + list(prefix)])
            next_probs = torch.softmax(self.policy.model(input_ids=ids).logits[0, -1].double(), -1)
            for token in range(self.policy.vocab_size):
                walk((*prefix, token), probability * float(next_probs[token]))

        walk((), 1.0)
        return found


def build_world(
    seed: int = 0,
    prompts: Sequence[str] = ("a", "b"),
    max_new_tokens: int = 3,
    policy_steps: int = 300,
    reward_steps: int = 300,
    temperature: float = 1.0,
) -> EnumerableWorld:
    """Build the world: a π_ref fitted by exact cross-entropy to a seeded random target over the responses
    (target log-weights ~ N(0, temperature²)), and a reward model fitted by least squares to
    :func:`successor_share`. ``*_steps = 0`` leaves a model at its random initialisation (for fast tests)."""
    for prompt in prompts:
        if prompt not in SYMBOLS:
            raise ConfigurationError(f"a prompt of this world is one symbol of {SYMBOLS} (got {prompt!r})")
    tokenizer = world_tokenizer()
    torch.manual_seed(seed)
    policy_model = LlamaForCausalLM(world_config(tokenizer))
    torch.manual_seed(seed + 1)
    reward_model = LlamaForSequenceClassification(world_config(tokenizer, num_labels=1))
    world = EnumerableWorld(
        Policy(policy_model, tokenizer, chat_template=False),
        SequenceClassifierReward(reward_model, tokenizer, chat_template=False),
        list(prompts),
        max_new_tokens,
    )
    generator = torch.Generator().manual_seed(seed + 2)
    if policy_steps:
        targets = {
            p: torch.softmax(temperature * torch.randn(len(world.responses()), generator=generator), 0) for p in prompts
        }
        _fit_policy(world, targets, policy_steps)
    if reward_steps:
        _fit_reward(world, reward_steps)
    return world


def _fit_policy(world: EnumerableWorld, targets: dict[str, Tensor], steps: int) -> None:
    model, responses = world.policy.model, world.responses()
    parameters = list(model.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    contexts = {p: [world.policy.encode(p)] * len(responses) for p in world.prompts}
    for _ in range(steps):
        optimizer.zero_grad()
        loss = sum(
            -(targets[p] * response_log_probs(model, contexts[p], responses, 0).sequence()).sum() for p in world.prompts
        )
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
    for parameter in parameters:
        parameter.requires_grad_(False)


def _fit_reward(world: EnumerableWorld, steps: int) -> None:
    reward, responses = world.reward, world.responses()
    rows, targets = [], []
    for prompt in world.prompts:
        for response in responses:
            text = world.policy.decode(response)
            rows.append(reward.input_ids(prompt, text, response))
            targets.append(successor_share(prompt, text.split()))
    target = torch.tensor(targets)
    parameters = list(reward.model.parameters())
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=3e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(reward._score_batch(rows), target)
        loss.backward()
        optimizer.step()
    for parameter in parameters:
        parameter.requires_grad_(False)


def save_world(world: EnumerableWorld, folder: str | Path) -> None:
    folder = Path(folder)
    world.policy.model.save_pretrained(folder / "policy")
    world.tokenizer.save_pretrained(folder / "policy")
    world.reward.model.save_pretrained(folder / "reward")
    world.tokenizer.save_pretrained(folder / "reward")


def load_world(folder: str | Path, prompts: Sequence[str] = ("a", "b"), max_new_tokens: int = 3) -> EnumerableWorld:
    """A world saved by :func:`save_world`."""
    folder = Path(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder / "policy"))
    policy = LlamaForCausalLM.from_pretrained(str(folder / "policy"), dtype=torch.float32)
    reward = LlamaForSequenceClassification.from_pretrained(str(folder / "reward"), dtype=torch.float32)
    return EnumerableWorld(
        Policy(policy, tokenizer, chat_template=False),
        SequenceClassifierReward(reward, tokenizer, chat_template=False),
        list(prompts),
        max_new_tokens,
    )
