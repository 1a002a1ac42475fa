"""Reward models: a plain score of responses, and (for transformer rewards) a differentiable score of soft
one-hot tokens over the *policy's* vocabulary, with the prompt's key/value states computed once per prefix."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache

from nabla.cost import CostMeter, forward_flops, matmul_parameters
from nabla.errors import ConfigurationError, RewardNotDifferentiableError, VocabularyMismatchError
from nabla.kv import cache_length, forward_after_prefixes, soft_embed
from nabla.policy import load_pretrained, resolve_dtype

if TYPE_CHECKING:
    from nabla.policy import Policy

_SENTINEL = "\u2063NABLA_RESPONSE\u2063"


@dataclass
class RewardContext:
    """What stays fixed while a look-ahead is optimised: the reward input's opening (template start, prompt and
    assistant header, in the reward model's ids), the committed response tokens (policy ids), the closing
    tokens, and the key/value states of opening ⊕ committed when prefix caching is on."""

    prompt: str
    opening: Tensor
    committed: Tensor
    closing: Tensor
    cache: Cache | None = None


class RewardModel(ABC):
    """A scalar reward of a (prompt, response) pair. Subclasses that set ``differentiable = True`` also score
    soft one-hot responses with a gradient, which DTO needs."""

    differentiable: bool = False

    @abstractmethod
    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        response_ids: Sequence[Sequence[int]] | None = None,
        meter: CostMeter | None = None,
    ) -> Tensor:
        """Rewards (``(B,)``, float32, CPU). ``response_ids`` are the policy's token ids of each response."""

    def bind(self, policy: Policy) -> None:
        """Called once by the trainer with the policy whose tokens this reward will score."""

    @property
    def device(self) -> torch.device | None:
        return None

    def context(
        self, prompt: str, committed: Sequence[int], *, use_cache: bool, meter: CostMeter | None = None
    ) -> RewardContext:
        raise RewardNotDifferentiableError(
            f"{type(self).__name__} has no gradient; DTO needs a differentiable reward (a transformer reward "
            "model), or set optimizer.reward_weight=0 for likelihood-only DTO"
        )

    def extend(self, context: RewardContext, new_ids: Sequence[int], meter: CostMeter | None = None) -> RewardContext:
        raise RewardNotDifferentiableError(f"{type(self).__name__} has no gradient")

    def score_soft(self, y: Tensor, context: RewardContext, meter: CostMeter | None = None) -> Tensor:
        raise RewardNotDifferentiableError(f"{type(self).__name__} has no gradient")

    def score_soft_batch(self, ys: Sequence[Tensor], contexts: Sequence[RewardContext]) -> Tensor:
        """:meth:`score_soft` of several look-aheads (``(B,)``); subclasses may batch the passes."""
        return torch.stack([self.score_soft(y, context) for y, context in zip(ys, contexts)])

    @staticmethod
    def from_pretrained(name_or_path: str, **kwargs: Any) -> SequenceClassifierReward:
        """Load a one-label ``AutoModelForSequenceClassification`` as a :class:`SequenceClassifierReward`."""
        return SequenceClassifierReward.from_pretrained(name_or_path, **kwargs)


class CallableReward(RewardModel):
    """Any Python callable ``fn(prompt, response) -> float`` (a verifier, a heuristic). It has no gradient:
    usable for acceptance tests, best-of-N and RL, refused where DTO needs a gradient."""

    def __init__(self, fn: Callable[[str, str], float], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")

    def score(self, prompts, responses, response_ids=None, meter=None) -> Tensor:
        values = [float(self.fn(p, r)) for p, r in zip(prompts, responses)]
        if meter is not None:
            meter.update("rm_forward", len(values))
        return torch.tensor(values, dtype=torch.float32)


@dataclass
class VocabularyAlignment:
    """Maps the policy's token ids onto the reward model's rows, by token string.

    ``index[i]`` is the reward-model id of policy token ``i``, or -1 when it has none; such tokens get a zero
    embedding in soft inputs and the reward model's unknown token in hard ones.
    """

    index: Tensor
    coverage: float
    identical: bool
    fallback_id: int

    @classmethod
    def build(
        cls, source: PreTrainedTokenizerBase, target: PreTrainedTokenizerBase, source_rows: int
    ) -> VocabularyAlignment:
        source_vocab, target_vocab = source.get_vocab(), target.get_vocab()
        fallback = target.unk_token_id if target.unk_token_id is not None else (target.eos_token_id or 0)
        if source_vocab == target_vocab:
            return cls(torch.arange(source_rows), 1.0, True, int(fallback))
        index = torch.full((source_rows,), -1, dtype=torch.long)
        target_by_text: dict[str, int] | None = None
        for token, token_id in source_vocab.items():
            if token_id >= source_rows:
                continue
            match = target_vocab.get(token)
            if match is None:
                if target_by_text is None:
                    target_by_text = _tokens_by_text(target)
                match = target_by_text.get(_token_text(source, token))
            if match is not None:
                index[token_id] = match
        coverage = float((index[[i for i in source_vocab.values() if i < source_rows]] >= 0).float().mean())
        return cls(index, coverage, False, int(fallback))

    def map_ids(self, ids: Tensor) -> Tensor:
        if self.identical:
            return ids
        mapped = self.index.to(ids.device)[ids]
        return torch.where(mapped >= 0, mapped, torch.full_like(mapped, self.fallback_id))

    def map_weights(self, y: Tensor, target_rows: int) -> Tensor:
        """Soft rows over the policy vocabulary (``(T, V_policy)``) as rows over the reward model's."""
        if self.identical:
            return y
        index = self.index.to(y.device)
        known = index >= 0
        out = y.new_zeros((y.shape[0], target_rows))
        return out.index_add(1, index[known], y[:, known])


def _token_text(tokenizer: PreTrainedTokenizerBase, token: str) -> str:
    try:
        return tokenizer.convert_tokens_to_string([token])
    except Exception:
        return token


def _tokens_by_text(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    table: dict[str, int] = {}
    for token, token_id in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
        table.setdefault(_token_text(tokenizer, token), token_id)
    return table


class TransformerReward(RewardModel):
    """A transformer that reads ``opening ⊕ response ⊕ closing`` and returns a scalar from its last position.

    Hard and soft scores use the same formatting (:meth:`input_ids`), so a straight-through one-hot of a response
    scores exactly as its ids do. Subclasses define the scalar head (:meth:`head`) and the template pieces.
    """

    differentiable = True

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        min_vocab_coverage: float = 0.9,
        batch_size: int = 8,
    ) -> None:
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.tokenizer = tokenizer
        self.min_vocab_coverage = min_vocab_coverage
        self.batch_size = batch_size
        self.alignment: VocabularyAlignment | None = None
        self.params = matmul_parameters(model)
        self._pieces = lru_cache(maxsize=256)(self._template_pieces)

    # ------------------------------------------------------------------ to be defined by subclasses
    @abstractmethod
    def body(self) -> torch.nn.Module:
        """The transformer that returns ``last_hidden_state``."""

    @abstractmethod
    def head(self, hidden: Tensor) -> Tensor:
        """Scalar reward per row of last-position hidden states (``(B, d) -> (B,)``)."""

    @abstractmethod
    def _template_pieces(self, prompt: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Reward-model ids before and after the response."""

    # ------------------------------------------------------------------ binding to a policy
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def bind(self, policy: Policy) -> None:
        alignment = VocabularyAlignment.build(policy.tokenizer, self.tokenizer, policy.vocab_size)
        if alignment.coverage < self.min_vocab_coverage:
            raise VocabularyMismatchError(
                f"only {alignment.coverage:.1%} of the policy's vocabulary maps onto the reward model's tokens "
                f"(need {self.min_vocab_coverage:.0%}); use a reward model with a compatible tokenizer or lower "
                "min_vocab_coverage"
            )
        self.alignment = alignment

    def _aligned(self) -> VocabularyAlignment:
        if self.alignment is None:
            raise ConfigurationError("the reward model is not bound to a policy; call reward.bind(policy) first")
        return self.alignment

    # ------------------------------------------------------------------ formatting
    def input_ids(self, prompt: str, response: str, response_ids: Sequence[int] | None = None) -> Tensor:
        """The reward model's input for one pair. With a shared vocabulary the policy's ids are used as they are,
        otherwise the response text is tokenised by the reward model's own tokenizer."""
        opening, closing = self._pieces(prompt)
        if response_ids is not None and self.alignment is not None and self.alignment.identical:
            body = list(response_ids)
        else:
            body = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        return torch.tensor([*opening, *body, *closing], dtype=torch.long)

    # ------------------------------------------------------------------ hard scores
    @torch.no_grad()
    def score(self, prompts, responses, response_ids=None, meter=None) -> Tensor:
        rows = [
            self.input_ids(p, r, None if response_ids is None else response_ids[i])
            for i, (p, r) in enumerate(zip(prompts, responses))
        ]
        scores: list[Tensor] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            scores.append(self._score_batch(chunk))
            if meter is not None:
                meter.update("rm_forward", len(chunk), flops=forward_flops(self.params, sum(len(r) for r in chunk)))
        return torch.cat(scores).float().cpu() if scores else torch.zeros(0)

    def _score_batch(self, rows: list[Tensor]) -> Tensor:
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = row.to(self.device)
            mask[i, width - len(row) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.body()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
        return self.head(hidden[:, -1])

    # ------------------------------------------------------------------ soft scores
    def context(
        self, prompt: str, committed: Sequence[int], *, use_cache: bool, meter: CostMeter | None = None
    ) -> RewardContext:
        opening, closing = self._pieces(prompt)
        context = RewardContext(
            prompt=prompt,
            opening=torch.tensor(opening, dtype=torch.long, device=self.device),
            committed=torch.tensor(list(committed), dtype=torch.long, device=self.device),
            closing=torch.tensor(closing, dtype=torch.long, device=self.device),
        )
        if use_cache:
            context.cache = DynamicCache()
            self._extend_cache(context.cache, self._fixed_ids(context), meter)
        return context

    def extend(self, context: RewardContext, new_ids: Sequence[int], meter: CostMeter | None = None) -> RewardContext:
        """The context with ``new_ids`` committed; a cached context grows by one forward over the new tokens."""
        added = torch.tensor(list(new_ids), dtype=torch.long, device=self.device)
        grown = RewardContext(
            context.prompt, context.opening, torch.cat([context.committed, added]), context.closing, context.cache
        )
        if context.cache is not None and len(added):
            self._extend_cache(context.cache, self._fixed_ids(grown), meter)
        return grown

    def _fixed_ids(self, context: RewardContext) -> Tensor:
        return torch.cat([context.opening, self._aligned().map_ids(context.committed)])

    @torch.no_grad()
    def _extend_cache(self, cache: Cache, ids: Tensor, meter: CostMeter | None) -> None:
        known = cache_length(cache)
        if known >= len(ids):
            return
        new = ids[known:]
        positions = torch.arange(known, len(ids), device=self.device)[None]
        self.body()(input_ids=new[None], position_ids=positions, cache=cache, use_cache=True)
        if meter is not None:
            meter.update("prefill", 1, flops=forward_flops(self.params, len(new)))

    def score_soft(self, y: Tensor, context: RewardContext, meter: CostMeter | None = None) -> Tensor:
        """Reward of ``opening ⊕ committed ⊕ y ⊕ closing`` for soft rows ``y`` over the policy's vocabulary."""
        return self.score_soft_batch([y], [context])[0]

    def score_soft_batch(self, ys: Sequence[Tensor], contexts: Sequence[RewardContext]) -> Tensor:
        embedding = self.model.get_input_embeddings()
        rows = []
        for y, context in zip(ys, contexts):
            soft = soft_embed(embedding, self._aligned().map_weights(y, embedding.weight.shape[0]))
            tail = torch.cat([soft, embedding(context.closing)])
            if context.cache is not None:
                rows.append((context.cache, len(context.opening) + len(context.committed), tail))
            else:
                rows.append((None, 0, torch.cat([embedding(self._fixed_ids(context)), tail])))

        def hidden(**inputs: Any) -> Tensor:
            cache = inputs.pop("cache")
            return self.body()(**inputs, cache=cache, use_cache=cache is not None).last_hidden_state

        last = torch.stack([out[-1] for out in forward_after_prefixes(hidden, rows, self.device)])
        return self.head(last).float()

    def forward_flops(self, tokens: int, soft_tokens: int = 0) -> float:
        table = self.model.get_input_embeddings().weight.numel()
        return forward_flops(self.params, tokens) + 2.0 * soft_tokens * table


class SequenceClassifierReward(TransformerReward):
    """A one-label ``AutoModelForSequenceClassification`` (e.g. Skywork-Reward) used as a reward.

    The response is wrapped as the assistant turn of the reward model's chat template (user turn = prompt);
    without a template the input is ``prompt + separator + response``.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        chat_template: bool | None = None,
        separator: str = "\n",
        min_vocab_coverage: float = 0.9,
        batch_size: int = 8,
    ) -> None:
        labels = getattr(model.config, "num_labels", 1)
        if labels != 1:
            raise ConfigurationError(f"a reward model needs one output label, this one has {labels}")
        head = getattr(model, "score", None)
        if head is None or not hasattr(model, model.base_model_prefix):
            raise ConfigurationError(
                f"{type(model).__name__} has no `score` head over a base model; wrap it in a TransformerReward subclass"
            )
        super().__init__(model, tokenizer, min_vocab_coverage=min_vocab_coverage, batch_size=batch_size)
        has_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat_template = has_template if chat_template is None else chat_template
        self.separator = separator

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: str | torch.dtype | None = "float32",
        device: str | torch.device = "cpu",
        adapter: str | None = None,
        chat_template: bool | None = None,
        min_vocab_coverage: float = 0.9,
        **model_kwargs: Any,
    ) -> SequenceClassifierReward:
        """Load from a local folder or hub name; ``adapter`` is a peft adapter (with its score head) merged on top."""
        tokenizer = load_pretrained(AutoTokenizer, name_or_path)
        # with an adapter, the base's missing score head is expected (the adapter brings it): no load report
        with _quiet_transformers(adapter is not None):
            model = load_pretrained(
                AutoModelForSequenceClassification,
                name_or_path,
                dtype=resolve_dtype(dtype),
                num_labels=1,
                **model_kwargs,
            ).to(device)
        if adapter is not None:
            from peft import PeftModel

            with warnings.catch_warnings():  # peft's merge reads an attribute transformers 5 deprecates
                warnings.simplefilter("ignore", FutureWarning)
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return cls(model, tokenizer, chat_template=chat_template, min_vocab_coverage=min_vocab_coverage)

    def body(self) -> torch.nn.Module:
        return getattr(self.model, self.model.base_model_prefix)

    def head(self, hidden: Tensor) -> Tensor:
        return self.model.score(hidden)[:, 0]

    def _template_pieces(self, prompt: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if not self.use_chat_template:
            opening = self.tokenizer(prompt + self.separator, add_special_tokens=True)["input_ids"]
            return tuple(opening), ()
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _SENTINEL}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if text.count(_SENTINEL) != 1:
            raise ConfigurationError("the reward model's chat template does not render the assistant turn verbatim")
        before, after = text.split(_SENTINEL)
        opening = self.tokenizer(before, add_special_tokens=False)["input_ids"]
        closing = self.tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
        return tuple(opening), tuple(closing)


@contextmanager
def _quiet_transformers(quiet: bool) -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
