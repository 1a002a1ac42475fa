"""Process reward models: a score for every step of a response, aggregated into one reward.

A process reward model (PRM) is a transformers token-classification model with one label
(``AutoModelForTokenClassification``, ``num_labels=1``, e.g. ``LlamaForTokenClassification``): its head gives a
logit at every position. The PRM reads it at the end of each step of the response (a response token whose text
contains ``step_separator``: ``";"`` in the arithmetic world, ``"\\n"`` for natural-language solutions) and at the
last position of the input, the end of the response: ``s_k`` is the log-odds that "the solution is still correct up
to the end of step k", ``s_K`` (the last) that the whole response is right.

Step logits become one reward the way search-and-learn aggregates PRM scores: with ``p_k = sigmoid(s_k)``,
``last`` takes ``p_K``, ``min`` the smallest ``p_k``, ``prod`` their product and ``mean`` their mean; the reward is
the logit ``log(p / (1 - p))`` of that probability, so it sits on the scale of an outcome reward model's score (a
``last`` PRM scores exactly like a classifier read at its last token) and reward-weighted majority's
``sigmoid(reward)`` is the aggregate probability itself. Aggregation runs in float64 (``prod`` and ``mean`` of
confident steps would round to 1 in float32).

Why a token-classification head rather than a score head read only at separators: one head, trained at every
labelled position, is what transformers already ships and saves (``save_pretrained`` / ``from_pretrained`` keep
``step_separator`` and ``step_aggregation`` in the model config), and it serves any separator chosen later.

DTO (soft scoring). The straight-through one-hots' forward value is hard text, so the step positions of a
look-ahead come from its forward tokens, and the logits there are differentiable through the soft embeddings:
the aggregate is differentiable wherever the forward text does not change, and at one-hot inputs the soft score
equals the hard one. Steps inside the committed prefix do not depend on the look-ahead: their logits are computed
once, with the reward model's prefix cache, and enter the aggregate as constants. Acceptance tests, best-of-N and
evaluation read :meth:`ProcessRewardModel.score`, which aggregates the same way.
"""

from __future__ import annotations

import json
import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from nabla.cost import CostMeter, forward_flops
from nabla.errors import ConfigurationError
from nabla.reward import RewardContext, SequenceClassifierReward

Aggregation = Literal["last", "min", "prod", "mean"]
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)


def check_aggregation(aggregation: str) -> str:
    if aggregation not in AGGREGATIONS:
        raise ConfigurationError(f"unknown step aggregation {aggregation!r}; use one of {', '.join(AGGREGATIONS)}")
    return aggregation


def aggregate_step_logits(logits: Tensor, aggregation: str) -> Tensor:
    """One reward (a logit, float64 scalar) from the step logits ``s_1..s_K`` (``(K,)``, ``K >= 1``): the logit of
    ``p_K``, ``min p_k``, ``prod p_k`` or ``mean p_k`` with ``p_k = sigmoid(s_k)``. Differentiable."""
    check_aggregation(aggregation)
    if logits.numel() == 0:
        raise ValueError("a response has at least one step score (the last position)")
    s = logits.double().flatten()
    if aggregation == "last":
        return s[-1]
    if aggregation == "min":
        return s.min()
    if aggregation == "prod":
        log_p = torch.nn.functional.logsigmoid(s).sum()
        return log_p - _log1mexp(log_p)
    count = math.log(s.numel())  # mean: log p̄ - log(1 - p̄), both as log-mean-exp
    log_mean = torch.logsumexp(torch.nn.functional.logsigmoid(s), 0) - count
    log_mean_complement = torch.logsumexp(torch.nn.functional.logsigmoid(-s), 0) - count
    return log_mean - log_mean_complement


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends; ``x`` is clamped just below 0 (p = 1 exactly
    would make the logit infinite)."""
    x = x.clamp(max=-1e-300)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class StepReward(SequenceClassifierReward):
    """What every process reward model shares: steps of a response (ended by ``step_separator``, the last at the
    input's end), step logits, their aggregation (hard and soft alike) and the settings saved in the model config.
    Subclasses say how a step's logit comes from the model (:meth:`_step_logits`)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        step_separator: str | None = None,
        aggregation: str | None = None,
        chat_template: bool | None = None,
        separator: str = "\n",
        min_vocab_coverage: float = 0.9,
        batch_size: int = 8,
    ) -> None:
        super().__init__(
            model,
            tokenizer,
            chat_template=chat_template,
            separator=separator,
            min_vocab_coverage=min_vocab_coverage,
            batch_size=batch_size,
        )
        config = model.config
        self.step_separator = step_separator if step_separator is not None else getattr(config, "step_separator", None)
        if self.step_separator == "":
            raise ConfigurationError("step_separator is empty; pass the text that ends a step (e.g. ';' or '\\n')")
        self.aggregation = check_aggregation(aggregation or getattr(config, "step_aggregation", None) or "last")
        self._step_end: Tensor | None = None

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        name_or_path: str,
        *,
        step_separator: str | None = None,
        aggregation: str | None = None,
        **kwargs: Any,
    ) -> StepReward:
        """Load a saved PRM; ``step_separator`` / ``aggregation`` override what its config says."""
        reward = super().from_pretrained(name_or_path, **kwargs)
        assert isinstance(reward, StepReward)
        if step_separator is not None:
            if not step_separator:
                raise ConfigurationError("step_separator is empty; pass the text that ends a step")
            reward.step_separator, reward._step_end = step_separator, None
        if aggregation is not None:
            reward.aggregation = check_aggregation(aggregation)
        return reward

    # ------------------------------------------------------------------ steps
    def step_end_mask(self) -> Tensor:
        """``(V,)`` booleans over the reward model's vocabulary: the tokens that end a step."""
        if self._step_end is None:
            rows = self.model.get_input_embeddings().weight.shape[0]
            mask = torch.zeros(rows, dtype=torch.bool)
            if self.step_separator is not None:
                texts = self.tokenizer.batch_decode([[i] for i in range(min(rows, len(self.tokenizer)))])
                for index, text in enumerate(texts):
                    mask[index] = self.step_separator in text
            self._step_end = mask.to(self.device)
        return self._step_end

    def _step_ends(self, ids: Tensor, begin: int, end: int, last: int) -> Tensor:
        """Indices of the step ends among ``ids[begin:end]`` (the response), then ``last`` (the input's end)."""
        ends = torch.nonzero(self.step_end_mask()[ids[begin:end].to(self.device)]).flatten() + begin
        ends = ends[ends != last]
        return torch.cat([ends, torch.tensor([last], device=ends.device)])

    @abstractmethod
    def _step_logits(self, hidden: Tensor, weights: Tensor, begin: int, ends: Tensor, state: Any = None) -> Tensor:
        """Step logits (``(K,)``) of one input from the last-layer ``hidden`` states of its positions, its tokens
        as rows ``weights`` (one-hot, or soft in a look-ahead; reward-model vocabulary), the response's first
        position ``begin`` and the step ``ends`` (indices into the positions). ``state``: the committed prefix's
        :attr:`RewardContext.head_state` when ``hidden`` starts after a cached prefix (``begin`` is then 0 and
        ``ends`` count the committed tokens first)."""

    # ------------------------------------------------------------------ hard scores
    @torch.no_grad()
    def step_scores(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        response_ids: Sequence[Sequence[int]] | None = None,
        meter: CostMeter | None = None,
    ) -> list[Tensor]:
        """The step logits of every response (``(K_b,)`` each, the last one at the response's end)."""
        rows, spans = [], []
        for b, (prompt, response) in enumerate(zip(prompts, responses)):
            opening, body, end = self.input_parts(prompt, response, None if response_ids is None else response_ids[b])
            rows.append(torch.tensor([*opening, *body, *end], dtype=torch.long))
            spans.append((len(opening), len(opening) + len(body)))
        vocabulary = self.model.get_input_embeddings().weight.shape[0]
        out: list[Tensor] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            hidden = self._hidden_batch(chunk)
            width = hidden.shape[1]
            for offset, (row, (begin, end)) in enumerate(zip(chunk, spans[start : start + len(chunk)])):
                ends = self._step_ends(row, begin, end, len(row) - 1)
                weights = torch.nn.functional.one_hot(row.to(self.device), vocabulary).float()
                out.append(self._step_logits(hidden[offset, width - len(row) :], weights, begin, ends).cpu())
            if meter is not None:
                meter.update("rm_forward", len(chunk), flops=forward_flops(self.params, sum(len(r) for r in chunk)))
        return out

    def score(self, prompts, responses, response_ids=None, meter=None) -> Tensor:
        steps = self.step_scores(prompts, responses, response_ids, meter)
        if not steps:
            return torch.zeros(0)
        return torch.stack([aggregate_step_logits(s, self.aggregation) for s in steps]).float()

    # ------------------------------------------------------------------ soft scores
    def score_soft_batch(self, ys: Sequence[Tensor], contexts: Sequence[RewardContext]) -> Tensor:
        hidden_rows = self._soft_hidden(ys, contexts)
        vocabulary = self.model.get_input_embeddings().weight.shape[0]
        rewards = []
        for y, context, hidden in zip(ys, contexts, hidden_rows):
            aligned = self._aligned()
            soft = aligned.map_weights(y, vocabulary).to(hidden.device)
            tokens = aligned.map_ids(y.detach().argmax(-1)).to(self.device)
            end = torch.tensor(self._end_ids(context.closing.tolist(), tokens[-1:].tolist()), device=self.device)
            tail = torch.nn.functional.one_hot(end.long(), vocabulary).float().to(hidden.device)
            last = len(hidden) - 1
            if context.cache is not None:
                state = context.head_state
                committed = self._committed_count(state)
                ends = self._step_ends(tokens, 0, len(tokens), last) + committed
                ends = torch.cat([self._committed_ends(state).to(ends.device), ends])
                logits = self._step_logits(hidden, torch.cat([soft, tail]), 0, ends, state)
            else:
                fixed = self._fixed_ids(context)
                ids = torch.cat([fixed, tokens, end.to(fixed.device)])
                ends = self._step_ends(ids, len(context.opening), len(fixed) + len(tokens), last)
                hard = torch.nn.functional.one_hot(fixed, vocabulary).float().to(hidden.device)
                logits = self._step_logits(hidden, torch.cat([hard, soft, tail]), len(context.opening), ends)
            rewards.append(aggregate_step_logits(logits, self.aggregation))
        return torch.stack(rewards).float()

    def _committed_count(self, state: Any) -> int:
        return 0 if state is None else int(state.count)

    def _committed_ends(self, state: Any) -> Tensor:
        return torch.zeros(0, dtype=torch.long) if state is None else state.ends


@dataclass
class _CommittedSteps:
    """A classifier PRM's view of the committed response tokens: their count, the step ends among them (indices
    into the committed tokens) and the step logits there (constants for DTO)."""

    count: int
    ends: Tensor
    logits: Tensor


class ProcessRewardModel(StepReward):
    """A one-label token classifier read at the end of every step (see the module docstring).

    Args:
        model: a transformers ``*ForTokenClassification`` with ``num_labels=1`` (a ``score`` head over a base model).
        tokenizer: its tokenizer.
        step_separator: a response token whose text contains it ends a step (default: the model config's
            ``step_separator``; ``None`` there: only the last position is read).
        aggregation: ``last``, ``min``, ``prod`` or ``mean`` (default: the config's ``step_aggregation``, else
            ``last``).
        chat_template, separator, min_vocab_coverage, batch_size: as for :class:`~nabla.SequenceClassifierReward`.
    """

    auto_class: Any = AutoModelForTokenClassification

    def _step_logits(self, hidden: Tensor, weights: Tensor, begin: int, ends: Tensor, state: Any = None) -> Tensor:
        if state is None:
            return self.head(hidden[ends.to(hidden.device)]).float()
        fresh = ends[ends >= state.count] - state.count
        own = self.head(hidden[fresh.to(hidden.device)]).float()
        return torch.cat([state.logits.to(own.device), own])

    def _prefix_hidden(self, context: RewardContext, hidden: Tensor | None, start: int) -> None:
        """Step logits of the committed tokens the prefix cache just covered (constants for DTO)."""
        state: _CommittedSteps | None = context.head_state
        count = len(context.committed)
        ends = state.ends if state is not None else torch.zeros(0, dtype=torch.long, device=self.device)
        logits = state.logits if state is not None else torch.zeros(0, device=self.device)
        if hidden is not None and len(hidden):
            opening = len(context.opening)
            fixed = self._fixed_ids(context)
            positions = torch.arange(max(start, opening), start + len(hidden), device=self.device)
            new = positions[self.step_end_mask()[fixed[positions]]]
            if len(new):
                ends = torch.cat([ends, new - opening])
                logits = torch.cat([logits, self.head(hidden[new - start]).float().detach()])
        context.head_state = _CommittedSteps(count, ends, logits)


@dataclass
class _CommittedTokens:
    """A likelihood PRM's view of the committed response tokens: their count, the step ends among them, each
    token's log-probability, and the log-probabilities of the token after them (constants for DTO)."""

    count: int
    ends: Tensor
    log_probs: Tensor
    next_log_probs: Tensor | None


class LikelihoodProcessReward(StepReward):
    """A process reward model read from a causal language model's own probabilities.

    The probability that step ``k`` is right is the probability the model gives its tokens, each after what came
    before (``p_k = Π_{t in step k} p(y_t | y_<t)``); the step's logit is ``log p_k - log(1 - p_k)``, aggregated as
    any PRM's. The last step runs from the last separator to the end of the input, closing tokens included; a
    response that did not finish (no end token and no template closing it) is read with the model's end token
    appended, so that "it stops here" is part of its last step.

    A causal LM trained by process supervision (:mod:`nabla.worlds.arithmetic.process`: every token of a
    corrupted solution before its first error is a target, none after it, and the final answer's target is the
    true answer whatever the steps said) gives ``p_k`` = "step k continues the solution correctly" and, for the
    last step, "this is the right answer". The comparison of a written token with the model's expectation that a
    classifier head has to learn across positions is here the likelihood itself.

    Args: as :class:`ProcessRewardModel`, with ``model`` a causal LM (``AutoModelForCausalLM``).
    """

    auto_class: Any = AutoModelForCausalLM

    @staticmethod
    def _check_model(model: PreTrainedModel) -> None:
        if model.get_output_embeddings() is None or not hasattr(model, model.base_model_prefix):
            raise ConfigurationError(f"{type(model).__name__} has no language-model head over a base model")

    def _end_ids(self, closing: Sequence[int], body: Sequence[int]) -> list[int]:
        eos = self.tokenizer.eos_token_id
        if closing or eos is None or (body and body[-1] == eos):
            return list(closing)
        return [eos]

    def _log_probs(self, hidden: Tensor) -> Tensor:
        """Next-token log-probabilities (float32) after each of ``hidden``'s positions."""
        logits = self.model.get_output_embeddings()(hidden).float()
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)

    def _step_logits(self, hidden: Tensor, weights: Tensor, begin: int, ends: Tensor, state: Any = None) -> Tensor:
        before = self._log_probs(hidden[:-1])
        if state is None:  # token t (t >= begin) is scored by the distribution after position t - 1
            own = (weights[begin:] * before[begin - 1 :]).sum(-1)
            token_log_probs = own
            offset = begin
        else:
            first = state.next_log_probs[None].to(before.device)
            own = (weights * torch.cat([first, before])).sum(-1)
            token_log_probs = torch.cat([state.log_probs.to(own.device), own])
            offset = 0
        totals = torch.cat([token_log_probs.new_zeros(1), token_log_probs.double().cumsum(0)])
        bounds = torch.cat([ends.new_tensor([offset - 1]), ends]).to(totals.device) - offset + 1
        step_log_probs = (totals[bounds[1:]] - totals[bounds[:-1]]).clamp(max=0.0)
        return (step_log_probs - _log1mexp(step_log_probs)).float()

    def _prefix_hidden(self, context: RewardContext, hidden: Tensor | None, start: int) -> None:
        state: _CommittedTokens | None = context.head_state
        count = len(context.committed)
        ends = state.ends if state is not None else torch.zeros(0, dtype=torch.long, device=self.device)
        log_probs = state.log_probs if state is not None else torch.zeros(0, device=self.device)
        following = state.next_log_probs if state is not None else None
        if hidden is not None and len(hidden):
            opening = len(context.opening)
            fixed = self._fixed_ids(context)
            after = self._log_probs(hidden).detach()  # row i: the distribution of position start + i + 1
            positions = torch.arange(max(start, opening), start + len(hidden), device=self.device)
            if len(positions):
                dists = [following if p == start else after[p - start - 1] for p in positions.tolist()]
                chosen = torch.stack([d[fixed[p]] for d, p in zip(dists, positions.tolist())])
                log_probs = torch.cat([log_probs, chosen])
                new = positions[self.step_end_mask()[fixed[positions]]]
                ends = torch.cat([ends, new - opening])
            following = after[-1]
        context.head_state = _CommittedTokens(count, ends, log_probs, following)


def process_reward_class(name_or_path: str, adapter: str | None = None) -> type[StepReward] | None:
    """The PRM class a saved model (or the peft adapter on it) loads as, or ``None`` for an outcome reward model:
    a token classifier (or a ``TOKEN_CLS`` adapter) is a :class:`ProcessRewardModel`, a causal LM whose config
    says ``process_reward: likelihood`` a :class:`LikelihoodProcessReward`. Reads local files only."""
    if adapter is not None:
        adapter_config = Path(adapter).expanduser() / "adapter_config.json"
        if adapter_config.is_file() and json.loads(adapter_config.read_text()).get("task_type") == "TOKEN_CLS":
            return ProcessRewardModel
    config_file = Path(name_or_path).expanduser() / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text())
    if config.get("process_reward") == "likelihood":
        return LikelihoodProcessReward
    if any(name.endswith("ForTokenClassification") for name in config.get("architectures") or []):
        return ProcessRewardModel
    return None
