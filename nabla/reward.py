"""Reward models: a plain score of responses, and (for transformer rewards) a differentiable score of soft
one-hot tokens over the *policy's* vocabulary, with the prompt's key/value states computed once per prefix."""

from __future__ import annotations

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
from nabla.errors import (
    ConfigurationError,
    InvalidRewardError,
    NonFiniteRewardError,
    RewardNotDifferentiableError,
    VocabularyMismatchError,
)
from nabla.kv import cache_length, forward_after_prefixes, soft_embed
from nabla.policy import (
    encode_marked,
    load_adapter,
    load_pretrained,
    mark_control_tokens,
    resolve_device,
    resolve_dtype,
)

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
    head_state: Any = None  # what a reward head keeps about the committed tokens (a PRM's step scores)


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

    def describe(self) -> str:
        """The reward's name in messages (its model folder, or its class)."""
        return str(getattr(self, "name", None) or type(self).__name__)

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
        """Load a saved reward model: a process reward model (:func:`nabla.prm.process_reward_class` says which)
        or a one-label sequence classifier as a :class:`SequenceClassifierReward`. ``default`` is the embedded
        trained reward model (offline); with ``process_reward="likelihood"`` any causal LM (``default``: the
        default policy) is read as a :class:`~nabla.prm.LikelihoodProcessReward`."""
        from nabla.defaults import resolve_policy, resolve_reward
        from nabla.prm import LikelihoodProcessReward, process_reward_class

        if kwargs.pop("process_reward", None) == "likelihood":  # any causal LM read as a likelihood PRM
            return LikelihoodProcessReward.from_pretrained(resolve_policy(name_or_path), **kwargs)
        name_or_path, kwargs["adapter"] = resolve_reward(name_or_path, kwargs.get("adapter"))
        process = process_reward_class(name_or_path, kwargs.get("adapter"))
        if process is not None:
            return process.from_pretrained(name_or_path, **kwargs)
        for key in ("aggregation", "step_separator"):
            if kwargs.get(key) is not None:
                raise ConfigurationError(f"{key} applies to process reward models; {name_or_path!r} is not one")
            kwargs.pop(key, None)
        return SequenceClassifierReward.from_pretrained(name_or_path, **kwargs)


class CallableReward(RewardModel):
    """Any Python callable ``fn(prompt, response) -> float`` (a verifier, a heuristic). It has no gradient:
    usable for acceptance tests, best-of-N and RL, refused where DTO needs a gradient."""

    def __init__(self, fn: Callable[[str, str], float], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")

    def score(self, prompts, responses, response_ids=None, meter=None) -> Tensor:
        values = [self._number(self.fn(p, r), p, r) for p, r in zip(prompts, responses)]
        if meter is not None:
            meter.update("rm_forward", len(values))
        return require_finite_rewards(self, prompts, responses, torch.tensor(values, dtype=torch.float32))

    def _number(self, value: Any, prompt: str, response: str) -> float:
        """``value`` as a float (a bool, an int, a 0-d tensor or array all count); text is not a number."""
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError("text")
            return float(value)
        except (TypeError, ValueError, RuntimeError) as error:  # None, a list, a tensor of several values
            raise InvalidRewardError(
                f"the reward function {self.name} returned {_short(repr(value))} ({type(value).__name__}), not a "
                f"number, for {_pair(prompt, response)}; make it return a float"
            ) from error


def require_finite_rewards(
    reward: RewardModel, prompts: Sequence[str], responses: Sequence[str], scores: Tensor
) -> Tensor:
    """``scores`` as they are, or :class:`~nabla.errors.NonFiniteRewardError` naming the reward model and the
    first input it scored NaN or infinite (every consumer of a reward checks: a NaN silently loses every
    comparison)."""
    finite = torch.isfinite(scores.detach().float().cpu())
    if bool(finite.all()):
        return scores
    index = int((~finite).nonzero()[0, 0])
    raise NonFiniteRewardError(
        f"the reward model {reward.describe()} returned {float(scores[index])} for "
        f"{_pair(prompts[index], responses[index])}; check its weights and dtype (float16 overflows), or use "
        "another reward model"
    )


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _pair(prompt: str, response: str) -> str:
    return f"the response {_short(response)!r} to the prompt {_short(prompt)!r}"


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

    def maps_all(self, ids: Sequence[int]) -> bool:
        """Whether every one of the policy's ``ids`` has a reward-model row."""
        return self.identical or bool((self.index[torch.as_tensor(list(ids), dtype=torch.long)] >= 0).all())

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

    Hard and soft scores use the same formatting (:meth:`input_ids`). With a shared vocabulary, or with a foreign
    one when every token of the response maps onto the reward model's (see :class:`VocabularyAlignment`), the hard
    score reads the same ids as the straight-through forward, so the soft score of a one-hot response equals its
    hard score. A response with an unmapped token is scored from the reward model's own tokenisation of its text
    (the only faithful input there), while the soft path gives that token a zero embedding: the two then differ.
    Subclasses define the scalar head (:meth:`head`) and the template pieces.

    Prompt and response text is encoded as text: a control token written in it (``<|im_start|>``, ...) cannot forge
    a turn of the template, unless ``allow_special_tokens_in_prompt`` is set for pre-formatted prompts.
    """

    differentiable = True
    allow_special_tokens_in_prompt: bool = False

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

    def describe(self) -> str:
        return str(getattr(self.model.config, "_name_or_path", "") or type(self).__name__)

    # ------------------------------------------------------------------ formatting
    def input_ids(self, prompt: str, response: str, response_ids: Sequence[int] | None = None) -> Tensor:
        """The reward model's input for one pair: ``opening ⊕ response ⊕ end`` (see :meth:`input_parts`)."""
        opening, body, end = self.input_parts(prompt, response, response_ids)
        return torch.tensor([*opening, *body, *end], dtype=torch.long)

    def input_parts(
        self, prompt: str, response: str, response_ids: Sequence[int] | None = None
    ) -> tuple[list[int], list[int], list[int]]:
        """The reward-model ids before, of and after the response. The policy's ids are used as they are with a
        shared vocabulary, and mapped row by row (as the soft path maps them) when every one has a counterpart;
        otherwise the response text is tokenised by the reward model's own tokenizer."""
        opening, closing = self._pieces(prompt)
        alignment = self.alignment
        if response_ids is not None and alignment is not None and alignment.identical:
            body = list(response_ids)
        elif response_ids is not None and alignment is not None and alignment.maps_all(response_ids):
            body = alignment.map_ids(torch.tensor(list(response_ids), dtype=torch.long)).tolist()
        else:  # a response's text is the policy's, never pre-formatted: its control-token strings stay text
            body = self.encode_text(mark_control_tokens(self.tokenizer, response))
        return list(opening), body, self._end_ids(closing, body)

    def _end_ids(self, closing: Sequence[int], body: Sequence[int]) -> list[int]:
        """The ids after a response ``body`` (reward-model ids): the template's closing tokens."""
        return list(closing)

    def user_text(self, text: str) -> str:
        """A prompt to render into a template: its control tokens marked so that :meth:`encode_text` spells them
        as text (unless ``allow_special_tokens_in_prompt``)."""
        return text if self.allow_special_tokens_in_prompt else mark_control_tokens(self.tokenizer, text)

    def encode_text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Reward-model ids of ``text`` (a rendered template, a response): control tokens marked by
        :meth:`user_text` spelt as text, the template's own encoded as control tokens."""
        return encode_marked(self.tokenizer, text, add_special_tokens=add_special_tokens)

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
        values = torch.cat(scores).float().cpu() if scores else torch.zeros(0)
        return require_finite_rewards(self, prompts, responses, values)

    def _score_batch(self, rows: list[Tensor]) -> Tensor:
        return self.head(self._hidden_batch(rows)[:, -1])

    def _hidden_batch(self, rows: list[Tensor]) -> Tensor:
        """Last-layer hidden states of left-padded ``rows`` (``(B, W, d)``): row ``b`` fills the last
        ``len(rows[b])`` columns."""
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = row.to(self.device)
            mask[i, width - len(row) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self.body()(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state

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
            self._prefix_hidden(context, self._extend_cache(context.cache, self._fixed_ids(context), meter), 0)
        return context

    def extend(self, context: RewardContext, new_ids: Sequence[int], meter: CostMeter | None = None) -> RewardContext:
        """The context with ``new_ids`` committed; a cached context grows by one forward over the new tokens."""
        added = torch.tensor(list(new_ids), dtype=torch.long, device=self.device)
        grown = RewardContext(
            context.prompt,
            context.opening,
            torch.cat([context.committed, added]),
            context.closing,
            context.cache,
            context.head_state,
        )
        if context.cache is not None and len(added):
            known = cache_length(context.cache)
            self._prefix_hidden(grown, self._extend_cache(context.cache, self._fixed_ids(grown), meter), known)
        return grown

    def _prefix_hidden(self, context: RewardContext, hidden: Tensor | None, start: int) -> None:
        """Called with the hidden states of the fixed positions ``start:`` each time the prefix cache grows
        (a process reward model reads its committed step scores there); nothing to do for a last-token reward."""

    def _fixed_ids(self, context: RewardContext) -> Tensor:
        return torch.cat([context.opening, self._aligned().map_ids(context.committed)])

    @torch.no_grad()
    def _extend_cache(self, cache: Cache, ids: Tensor, meter: CostMeter | None) -> Tensor | None:
        """Grow ``cache`` to cover ``ids``; returns the hidden states of the positions added (``None``: none)."""
        known = cache_length(cache)
        if known >= len(ids):
            return None
        new = ids[known:]
        positions = torch.arange(known, len(ids), device=self.device)[None]
        out = self.body()(input_ids=new[None], position_ids=positions, cache=cache, use_cache=True)
        if meter is not None:
            meter.update("prefill", 1, flops=forward_flops(self.params, len(new)))
        return out.last_hidden_state[0]

    def score_soft(self, y: Tensor, context: RewardContext, meter: CostMeter | None = None) -> Tensor:
        """Reward of ``opening ⊕ committed ⊕ y ⊕ closing`` for soft rows ``y`` over the policy's vocabulary."""
        return self.score_soft_batch([y], [context])[0]

    def score_soft_batch(self, ys: Sequence[Tensor], contexts: Sequence[RewardContext]) -> Tensor:
        last = torch.stack([out[-1] for out in self._soft_hidden(ys, contexts)])
        return self.head(last).float()

    def _soft_hidden(self, ys: Sequence[Tensor], contexts: Sequence[RewardContext]) -> list[Tensor]:
        """Hidden states of every position each row runs anew (``(n_b, d)``): ``y ⊕ closing`` after a cached
        context, the whole ``opening ⊕ committed ⊕ y ⊕ closing`` without one."""
        embedding = self.model.get_input_embeddings()
        rows = []
        for y, context in zip(ys, contexts):
            soft = soft_embed(embedding, self._aligned().map_weights(y, embedding.weight.shape[0]))
            last = self._aligned().map_ids(y[-1:].detach().argmax(-1)).tolist()  # the forward text's last token
            end = torch.tensor(self._end_ids(context.closing.tolist(), last), dtype=torch.long, device=self.device)
            tail = torch.cat([soft, embedding(end)])
            if context.cache is not None:
                rows.append((context.cache, len(context.opening) + len(context.committed), tail))
            else:
                rows.append((None, 0, torch.cat([embedding(self._fixed_ids(context)), tail])))

        def hidden(**inputs: Any) -> Tensor:
            cache = inputs.pop("cache")
            return self.body()(**inputs, cache=cache, use_cache=cache is not None).last_hidden_state

        return forward_after_prefixes(hidden, rows, self.device)

    def forward_flops(self, tokens: int, soft_tokens: int = 0) -> float:
        table = self.model.get_input_embeddings().weight.numel()
        return forward_flops(self.params, tokens) + 2.0 * soft_tokens * table


class SequenceClassifierReward(TransformerReward):
    """A one-label ``AutoModelForSequenceClassification`` (e.g. Skywork-Reward) used as a reward.

    The response is wrapped as the assistant turn of the reward model's chat template (user turn = prompt);
    without a template the input is ``prompt + separator + response``.
    """

    #: the transformers auto class ``from_pretrained`` loads the model with
    auto_class: Any = AutoModelForSequenceClassification

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
        self._check_model(model)
        super().__init__(model, tokenizer, min_vocab_coverage=min_vocab_coverage, batch_size=batch_size)
        has_template = getattr(tokenizer, "chat_template", None) is not None
        self.use_chat_template = has_template if chat_template is None else chat_template
        self.separator = separator

    @staticmethod
    def _check_model(model: PreTrainedModel) -> None:
        """Refuse a model this class cannot read a reward from."""
        labels = getattr(model.config, "num_labels", 1)
        if labels != 1:
            raise ConfigurationError(f"a reward model needs one output label, this one has {labels}")
        head = getattr(model, "score", None)
        if head is None or not hasattr(model, model.base_model_prefix):
            raise ConfigurationError(
                f"{type(model).__name__} has no `score` head over a base model; wrap it in a TransformerReward subclass"
            )

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
        allow_untrained_head: bool = False,
        allow_special_tokens_in_prompt: bool = False,
        **model_kwargs: Any,
    ) -> SequenceClassifierReward:
        """Load from a local folder or hub name (``default``: the embedded trained reward model); ``adapter`` is a
        peft adapter (with its score head) merged on top.

        A folder without the head's weights (a causal LM's, say) would score with a randomly initialised head: it
        is refused unless ``adapter`` brings the head or ``allow_untrained_head`` is set (benchmarks that time
        compute only)."""
        from nabla.defaults import resolve_reward

        name_or_path, adapter = resolve_reward(name_or_path, adapter)
        device = resolve_device(device)
        tokenizer = load_pretrained(AutoTokenizer, name_or_path)
        # with an adapter, the base's missing score head is expected (the adapter brings it): no load report
        with _quiet_transformers(adapter is not None or not allow_untrained_head):
            model, loading = load_pretrained(
                cls.auto_class,
                name_or_path,
                dtype=resolve_dtype(dtype),
                num_labels=1,
                output_loading_info=True,
                **model_kwargs,
            )
        missing = sorted(loading.get("missing_keys", ()))
        if missing and adapter is None and not allow_untrained_head:
            raise ConfigurationError(
                f"{name_or_path!r} holds no trained reward head ({', '.join(missing[:3])} would be randomly "
                "initialised: a causal LM's folder?); pass a trained reward model, an adapter that brings the head "
                "(reward.adapter), or set allow_untrained_head=true"
            )
        model = model.to(device)
        if adapter is not None:
            model = load_adapter(model, adapter)
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
        reward = cls(model, tokenizer, chat_template=chat_template, min_vocab_coverage=min_vocab_coverage)
        reward.allow_special_tokens_in_prompt = allow_special_tokens_in_prompt
        return reward

    def body(self) -> torch.nn.Module:
        return getattr(self.model, self.model.base_model_prefix)

    def head(self, hidden: Tensor) -> Tensor:
        return self.model.score(hidden)[:, 0]

    def _template_pieces(self, prompt: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if not self.use_chat_template:
            opening = self.encode_text(self.user_text(prompt) + self.separator, add_special_tokens=True)
            return tuple(opening), ()
        messages = [{"role": "user", "content": self.user_text(prompt)}, {"role": "assistant", "content": _SENTINEL}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        if text.count(_SENTINEL) != 1:
            raise ConfigurationError("the reward model's chat template does not render the assistant turn verbatim")
        before, after = text.split(_SENTINEL)
        opening = self.encode_text(before)
        closing = self.encode_text(after) if after else []
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
