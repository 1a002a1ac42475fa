"""The policy: any transformers causal LM, with seeded batched rollouts and a differentiable log-likelihood of
soft (straight-through) tokens after a cached prefix."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache

from nabla.cost import CostMeter, forward_flops, matmul_parameters
from nabla.errors import ConfigurationError, ModelNotFoundError, PromptError
from nabla.kv import (
    cache_length,
    forward_after_prefixes,
    prefix_view,
    select_batch_row,
    soft_embed,
    stack_left_padded,
)
from nabla.sampler import SamplingConfig, sample_tokens


@dataclass
class Rollout:
    """Tokens generated after a context, with what the loop needs to reuse them.

    ``logits[i]`` (float32, temperature 1) and ``hidden[i]`` (last layer, after the final norm) are the model's
    outputs that produced ``token_ids[i]``. ``cache`` (single-sequence rollouts only) holds the key/value states
    of the context followed by ``token_ids[:-1]``: every position that was fed to the model.
    """

    token_ids: list[int]
    finish_reason: str
    context_length: int
    logits: Tensor | None = None
    hidden: Tensor | None = None
    cache: Cache | None = None

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class LMPrefix:
    """The fixed context of a soft forward: ``ids`` (prompt ⊕ committed) and, when prefix caching is on, the
    key/value states of ``ids[:-1]``. The last context token is fed with the soft tokens so that the forward
    returns the logits of every look-ahead position, the first included."""

    ids: Tensor
    cache: Cache | None = None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in names:
        raise ConfigurationError(f"unknown dtype {dtype!r}; use one of {', '.join(names)}")
    return names[dtype]


def load_pretrained(loader: Any, name_or_path: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained`` with a one-line error when the weights are not there (offline or misspelt)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip(os.sep).replace("/", "", 1)
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ModelNotFoundError(f"no model folder at {name_or_path!r}; pass a folder saved with save_pretrained")
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only local folders and cached names load)" if offline else ""
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r}{hint}: {str(error).splitlines()[0]}; pass a local folder saved with "
            "save_pretrained, or a hub name while online"
        ) from error


class Policy:
    """Wraps a causal LM and its tokenizer.

    Args:
        model: a transformers causal LM (a peft model on one works too); it is put in eval mode and frozen.
        tokenizer: its tokenizer.
        chat_template: wrap prompts in the tokenizer's chat template (``None``: when the tokenizer has one).
        system_prompt: optional system turn for the chat template.
        eos_token_ids: tokens that end a response (default: the tokenizer's and generation config's EOS).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.model = model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.tokenizer = tokenizer
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if chat_template and not has_template:
            raise ConfigurationError("chat_template=True but the tokenizer has none; set chat_template=false")
        self.use_chat_template = has_template if chat_template is None else chat_template
        self.system_prompt = system_prompt
        self._eos_override = None if eos_token_ids is None else {int(i) for i in eos_token_ids}
        self.params = matmul_parameters(model)
        self._head_fp32: tuple[Tensor, Tensor | None] | None = None

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        dtype: str | torch.dtype | None = "float32",
        device: str | torch.device = "cpu",
        gguf_file: str | None = None,
        adapter: str | None = None,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        **model_kwargs: Any,
    ) -> Policy:
        """Load a causal LM from a local folder or a hub name; ``adapter`` is a peft adapter merged on top."""
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = load_pretrained(AutoTokenizer, name_or_path, **extra)
        model = load_pretrained(
            AutoModelForCausalLM, name_or_path, dtype=resolve_dtype(dtype), **extra, **model_kwargs
        ).to(device)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        return cls(model, tokenizer, chat_template=chat_template, system_prompt=system_prompt)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def context_window(self) -> int | None:
        config = self.model.config.get_text_config()
        return getattr(config, "max_position_embeddings", None)

    @property
    def eos_token_ids(self) -> set[int]:
        if self._eos_override is not None:
            return self._eos_override
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if source is None:
                continue
            ids.update(source if isinstance(source, (list, tuple)) else [source])
        return ids

    # ------------------------------------------------------------------ text
    def format_prompt(self, prompt: str) -> str:
        """The exact text the model sees before its response."""
        if not self.use_chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, prompt: str) -> Tensor:
        """Token ids of the formatted prompt (1-D, on the policy's device)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty; pass the question text")
        text = self.format_prompt(prompt)
        ids = self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"]
        if not ids:
            raise PromptError("the prompt tokenises to nothing; pass a longer prompt")
        window = self.context_window
        if window is not None and len(ids) >= window:
            raise PromptError(
                f"the prompt has {len(ids)} tokens but the model's context window is {window}; shorten the prompt"
            )
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        contexts: Sequence[Tensor],
        sampling: SamplingConfig,
        generators: Sequence[torch.Generator],
        max_new_tokens: int | Sequence[int],
        *,
        stop_strings: Sequence[str] = (),
        record_logits: bool = False,
        record_hidden: bool = False,
        caches: Sequence[Cache | None] | None = None,
        keep_cache: bool = False,
        meter: CostMeter | Sequence[CostMeter | None] | None = None,
    ) -> list[Rollout]:
        """Sample one continuation per context, row ``b`` with ``generators[b]``.

        Args:
            caches: per row, ``None`` or the key/value states of a leading part of that row's context, which is
                then not re-encoded (a proposal continues from the current rollout's states).
            keep_cache: return each row's states (context ⊕ tokens[:-1]) on its :class:`Rollout` for reuse.
            meter: one meter charged for every row, or one meter per row.

        Rows are left-padded; each stops at an EOS token, a stop string or its own ``max_new_tokens`` (cut so that
        the context window is never exceeded). Each row's draws come from its own generator only, so a row samples
        the same tokens alone or inside any batch.
        """
        batch = len(contexts)
        if batch == 0:
            return []
        if len(generators) != batch:
            raise ValueError(f"{batch} contexts need {batch} generators, got {len(generators)}")
        meters = list(meter) if isinstance(meter, Sequence) else [meter] * batch
        budgets = [max_new_tokens] * batch if isinstance(max_new_tokens, int) else list(max_new_tokens)
        window = self.context_window
        if window is not None:
            budgets = [min(b, window - len(c)) for b, c in zip(budgets, contexts)]
        if min(budgets) < 1:
            raise PromptError("no room left in the context window to generate; shorten the prompt")

        contexts = [c.to(self.device) for c in contexts]
        if caches is None or all(c is None for c in caches):
            cache, mask = self._prefill_batch(contexts, meters)
        else:
            cache, mask = self._merge_row_caches(contexts, caches, meters)
        pads = [mask.shape[1] + 1 - len(c) for c in contexts]
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long, device=self.device)], dim=-1)

        outputs: list[list[int]] = [[] for _ in range(batch)]
        step_logits_seen: list[Tensor] = []  # (B, V) per step; row b's logits are its first len(outputs[b]) steps
        step_hidden_seen: list[Tensor] = []
        finish = [""] * batch
        next_input = torch.stack([c[-1:] for c in contexts])
        eos = self.eos_token_ids
        for _ in range(max(budgets)):
            active = [b for b in range(batch) if not finish[b]]
            out = self.model(
                input_ids=next_input,
                attention_mask=mask,
                position_ids=_positions(mask)[:, -1:],
                cache=cache,
                use_cache=True,
                output_hidden_states=record_hidden,
                logits_to_keep=1,
            )
            for b in active:
                _charge(meters[b], "generated_tokens", 1, forward_flops(self.params, 1))
            step_logits = out.logits[:, -1, :].float()
            # only unfinished rows draw: a row's generator advances exactly as it would alone
            tokens = sample_tokens(step_logits[active], sampling, [generators[b] for b in active])
            if record_logits:
                step_logits_seen.append(step_logits)
            if record_hidden:
                step_hidden_seen.append(out.hidden_states[-1][:, -1].float())
            for b, token in zip(active, tokens.tolist()):
                outputs[b].append(token)
                finish[b] = self._finish_reason(outputs[b], token, eos, stop_strings, budgets[b])
            if all(finish):
                break
            finished_rows = torch.tensor([bool(f) for f in finish], device=self.device)
            next_input = torch.tensor([[o[-1]] for o in outputs], device=self.device)
            next_input[finished_rows] = self._pad_id()
            mask = torch.cat([mask, (~finished_rows).long().unsqueeze(-1)], dim=-1)

        all_logits = torch.stack(step_logits_seen, dim=1) if record_logits else None
        all_hidden = torch.stack(step_hidden_seen, dim=1) if record_hidden else None
        return [
            Rollout(
                token_ids=outputs[b],
                finish_reason=finish[b],
                context_length=len(contexts[b]),
                logits=all_logits[b, : len(outputs[b])].clone() if all_logits is not None else None,
                hidden=all_hidden[b, : len(outputs[b])].clone() if all_hidden is not None else None,
                cache=self._row_cache(cache, b, pads[b], len(contexts[b]) + len(outputs[b]) - 1, batch)
                if keep_cache
                else None,
            )
            for b in range(batch)
        ]

    def _prefill_batch(self, contexts: list[Tensor], meters: list[CostMeter | None]) -> tuple[Cache, Tensor]:
        """One left-padded parallel pass over every context but its last token."""
        width = max(len(c) for c in contexts) - 1
        ids = torch.full((len(contexts), width), self._pad_id(), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        for row, context in enumerate(contexts):
            known = len(context) - 1
            if known:
                ids[row, width - known :] = context[:-1]
                mask[row, width - known :] = 1
        cache = DynamicCache()
        if width:
            self._forward_ids(ids, mask, cache)
            for context, row_meter in zip(contexts, meters):
                if len(context) > 1:
                    _charge(row_meter, "prefill", 1, forward_flops(self.params, len(context) - 1))
        return cache, mask

    def _merge_row_caches(
        self, contexts: list[Tensor], caches: Sequence[Cache | None], meters: list[CostMeter | None]
    ) -> tuple[Cache, Tensor]:
        """Extend each row's own states to cover its context but the last token, then stack them left-padded."""
        rows: list[Cache] = []
        for context, cache, row_meter in zip(contexts, caches, meters):
            cache = cache if cache is not None else DynamicCache()
            known, needed = cache_length(cache), len(context) - 1
            if known > needed:
                cache = prefix_view(cache, needed)
            elif known < needed:
                ones = torch.ones((1, needed), dtype=torch.long, device=self.device)
                self._forward_ids(context[None, known:needed], ones, cache)
                _charge(row_meter, "prefill", 1, forward_flops(self.params, needed - known))
            rows.append(cache)
        if len(rows) == 1:
            mask = torch.ones((1, len(contexts[0]) - 1), dtype=torch.long, device=self.device)
            return rows[0], mask
        return stack_left_padded(rows, [len(c) - 1 for c in contexts], self.device)

    @staticmethod
    def _row_cache(cache: Cache, row: int, pad: int, length: int, batch: int) -> Cache:
        if batch == 1 and pad == 0:
            return cache
        return select_batch_row(cache, row, pad, pad + length)

    def _finish_reason(
        self, generated: list[int], token: int, eos: set[int], stop_strings: Sequence[str], budget: int
    ) -> str:
        if token in eos:
            return "eos"
        if stop_strings:
            text = self.tokenizer.decode(generated[-64:], skip_special_tokens=False)
            if any(stop in text for stop in stop_strings):
                return "stop"
        if len(generated) >= budget:
            return "length"
        return ""

    def _pad_id(self) -> int:
        for candidate in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id):
            if candidate is not None:
                return int(candidate)
        return 0

    def _forward_ids(self, ids: Tensor, mask: Tensor, cache: Cache) -> None:
        """Extend ``cache`` by ``ids`` (``mask`` covers the cache and ``ids``)."""
        self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=_positions(mask)[:, -ids.shape[1] :],
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )

    @torch.no_grad()
    def prefix_cache(self, ids: Tensor, meter: CostMeter | None = None) -> Cache | None:
        """States of ``ids[:-1]`` for :class:`LMPrefix` (one prefill call); ``None`` for a 1-token context."""
        if len(ids) < 2:
            return None
        cache = DynamicCache()
        mask = torch.ones((1, len(ids) - 1), dtype=torch.long, device=self.device)
        self._forward_ids(ids[None, :-1], mask, cache)
        _charge(meter, "prefill", 1, forward_flops(self.params, len(ids) - 1))
        return cache

    # ------------------------------------------------------------------ differentiable pieces
    def soft_log_likelihood(self, y: Tensor, prefix: LMPrefix) -> Tensor:
        """Per-position ``log π(y_i | prefix, y_<i) = Σ_v y_i[v] · log softmax(logits_i)[v]`` (``(T,)``, float32).

        ``y`` (``(T, V)``) holds straight-through one-hots (or any soft rows); gradients flow to ``y`` both through
        the embeddings fed to the model and through the weights of the log-probabilities.
        """
        return self.soft_log_likelihoods([y], [prefix])[0]

    def soft_log_likelihoods(self, ys: Sequence[Tensor], prefixes: Sequence[LMPrefix]) -> list[Tensor]:
        """:meth:`soft_log_likelihood` of several look-aheads (each after its own prefix) in one batched pass."""
        embedding = self.model.get_input_embeddings()
        rows = []
        for y, prefix in zip(ys, prefixes):
            soft = soft_embed(embedding, y[:-1])
            if prefix.cache is not None:
                rows.append((prefix.cache, len(prefix.ids) - 1, torch.cat([embedding(prefix.ids[-1:]), soft])))
            else:
                rows.append((None, 0, torch.cat([embedding(prefix.ids), soft])))

        def logits(**inputs: Any) -> Tensor:
            cache = inputs.pop("cache")
            return self.model(**inputs, cache=cache, use_cache=cache is not None).logits

        outputs = forward_after_prefixes(logits, rows, self.device)
        return [(y * torch.log_softmax(out[-y.shape[0] :].float(), dim=-1)).sum(-1) for y, out in zip(ys, outputs)]

    def forward_flops(self, tokens: int, soft_tokens: int = 0) -> float:
        """Forward FLOPs over ``tokens`` positions, ``soft_tokens`` of them embedded as a ``V x d`` product."""
        table = self.model.get_input_embeddings().weight.numel()
        return forward_flops(self.params, tokens) + 2.0 * soft_tokens * table

    def backward_flops(self, tokens: int, soft_tokens: int = 0) -> float:
        return 2.0 * self.forward_flops(tokens, soft_tokens)

    def head_logits(self, hidden: Tensor) -> Tensor:
        """The LM head applied in float32 to last-layer hidden states (the latents space's map to logits)."""
        if self._head_fp32 is None:
            head = self.model.get_output_embeddings()
            bias = head.bias.detach().float() if getattr(head, "bias", None) is not None else None
            self._head_fp32 = (head.weight.detach().float(), bias)
        weight, bias = self._head_fp32
        logits = hidden.float() @ weight.T
        if bias is not None:
            logits = logits + bias
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


def _charge(meter: CostMeter | None, kind: str, count: int, flops: float) -> None:
    if meter is not None:
        meter.update(kind, count, flops=flops)


def _positions(mask: Tensor) -> Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
