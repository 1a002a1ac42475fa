"""The policy: any transformers causal LM, with seeded batched rollouts and a differentiable log-likelihood of
soft (straight-through) tokens after a cached prefix."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache

from nabla.cost import CostMeter, forward_flops, matmul_parameters
from nabla.engines import EngineRequest, HFEngine, RolloutEngine, engine_seed
from nabla.errors import (
    ConfigurationError,
    CorruptModelError,
    ModelNotFoundError,
    PromptError,
    check_demonstrations,
)
from nabla.kv import (
    cache_length,
    clone_cache,
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
    """``loader.from_pretrained`` with a one-line error when the weights are not there (offline or misspelt) or
    cannot be read (a truncated or corrupt file)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.strip(os.sep).replace("/", "", 1)
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ModelNotFoundError(f"no model folder at {name_or_path!r}; pass a folder saved with save_pretrained")
    with loading_errors(name_or_path):
        return loader.from_pretrained(name_or_path, **kwargs)


def load_adapter(model: PreTrainedModel, adapter: str) -> PreTrainedModel:
    """``model`` with the peft adapter folder ``adapter`` merged in, with :func:`load_pretrained`'s errors."""
    import warnings

    from peft import PeftModel

    if not os.path.isdir(os.path.expanduser(adapter)):
        raise ModelNotFoundError(f"no adapter folder at {adapter!r}; pass a folder saved by peft's save_pretrained")
    with loading_errors(adapter), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft's merge reads an attribute transformers 5 deprecates
        return PeftModel.from_pretrained(model, adapter).merge_and_unload()


@contextmanager
def loading_errors(name_or_path: str) -> Iterator[None]:
    """Turn what a ``from_pretrained`` raises for missing or unreadable files into one-line typed errors."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as error:
        raise CorruptModelError(
            f"the weights in {name_or_path!r} cannot be read ({str(error).splitlines()[0]}): the file is truncated "
            "or corrupt; save or copy the model again"
        ) from error
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only local folders and cached names load)" if offline else ""
        raise ModelNotFoundError(
            f"cannot load {name_or_path!r}{hint}: {str(error).splitlines()[0]}; pass a local folder saved with "
            "save_pretrained, or a hub name while online"
        ) from error


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device, refused in one line when it is not a device or this machine lacks it."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:
        raise ConfigurationError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:<index> or mps") from error
    try:
        torch.empty(0, device=resolved)
    except (AssertionError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigurationError(
            f"device {str(device)!r} is not available on this machine ({reason}); set the device to cpu or to one "
            "this machine has"
        ) from error
    return resolved


# ---------------------------------------------------------------------------------------------- untrusted text
# Private-use code points (as transformers' own sanitiser uses) that wrap a control token found in a user's text.
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"
_MARKED = re.compile(f"{_MARK_START}(.*?){_MARK_END}", re.DOTALL)


def control_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The strings ``tokenizer`` turns into control tokens (its special and other added tokens), longest first."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    found = {token.content for token in added if token.content.strip()}
    found.update(token for token in tokenizer.all_special_tokens if token.strip())
    return tuple(sorted(found, key=len, reverse=True))


def mark_control_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """``text`` (a user's) with every control-token string in it wrapped in private markers, which
    :func:`encode_marked` spells as plain text. Render a chat template around the marked text, then encode it."""
    text = text.replace(_MARK_START, "").replace(_MARK_END, "")
    tokens = control_tokens(tokenizer)
    if not tokens:
        return text
    pattern = "|".join(map(re.escape, tokens))
    return re.sub(pattern, lambda match: f"{_MARK_START}{match.group(0)}{_MARK_END}", text)


def encode_marked(tokenizer: PreTrainedTokenizerBase, text: str, *, add_special_tokens: bool = False) -> list[int]:
    """Token ids of ``text``: control tokens marked by :func:`mark_control_tokens` spelt as plain text, the rest
    (the chat template's own control tokens included) encoded as usual; text without marks encodes exactly as
    ``tokenizer(text)`` does.

    Raises :class:`~nabla.errors.PromptError` when the tokenizer cannot spell a marked token as plain text (a
    word-level vocabulary that holds the marker itself).
    """
    pieces = _MARKED.split(text.replace(_MARK_START + _MARK_END, ""))
    if len(pieces) == 1:
        return _plain_ids(tokenizer, _unmark(text), add_special_tokens)
    ids: list[int] = []
    # an unknown word may spell as the unknown token: harmless, and not a control token of the template
    forbidden = {*tokenizer.all_special_ids, *tokenizer.convert_tokens_to_ids(list(control_tokens(tokenizer)))}
    forbidden.discard(tokenizer.unk_token_id)
    for index, piece in enumerate(pieces):
        if not piece:
            continue
        if index % 2 == 0:  # the template's text and the user's ordinary text
            ids += _plain_ids(tokenizer, _unmark(piece), False)
            continue
        spelt = tokenizer(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if forbidden.intersection(spelt):
            raise PromptError(
                f"the text contains {piece!r}, a control token that this tokenizer cannot spell as plain text; "
                "remove it, or set allow_special_tokens_in_prompt=true to pass pre-formatted text"
            )
        ids += spelt
    if add_special_tokens:
        before, after = _special_wrapping(tokenizer)
        ids = [*before, *ids, *after]
    return ids


def _unmark(text: str) -> str:
    return text.replace(_MARK_START, "").replace(_MARK_END, "")


def _plain_ids(tokenizer: PreTrainedTokenizerBase, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"] if text else []


def _special_wrapping(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids ``add_special_tokens=True`` puts before and after a text (e.g. a BOS token)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start : start + len(plain)] == plain:
            return wrapped[:start], wrapped[start + len(plain) :]
    return [], []


class Policy:
    """Wraps a causal LM and its tokenizer.

    Args:
        model: a transformers causal LM (a peft model on one works too); it is put in eval mode and frozen.
        tokenizer: its tokenizer.
        chat_template: wrap prompts in the tokenizer's chat template (``None``: when the tokenizer has one).
        system_prompt: optional system turn for the chat template.
        demonstrations: worked examples, ``(user, assistant)`` turns put before the prompt (with the chat template;
            without one, as plain text); they show a small model the answer's format.
        eos_token_ids: tokens that end a response (default: the tokenizer's and generation config's EOS).
        allow_special_tokens_in_prompt: encode control tokens written in the prompt (``<|im_start|>``, ...) as
            control tokens, for callers who pass pre-formatted text; by default a prompt's text is always encoded
            as text, so it cannot forge a turn of the chat template.
        engine: where rollouts come from (:mod:`nabla.engines`; default: this policy's own transformers loop).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        chat_template: bool | None = None,
        system_prompt: str | None = None,
        demonstrations: Sequence[tuple[str, str]] = (),
        eos_token_ids: Sequence[int] | None = None,
        allow_special_tokens_in_prompt: bool = False,
        engine: RolloutEngine | None = None,
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
        self.demonstrations = check_demonstrations(demonstrations)
        self.allow_special_tokens_in_prompt = allow_special_tokens_in_prompt
        self._eos_override = None if eos_token_ids is None else {int(i) for i in eos_token_ids}
        self.params = matmul_parameters(model)
        self._head_fp32: tuple[Tensor, Tensor | None] | None = None
        self.engine: RolloutEngine = engine if engine is not None else HFEngine()
        self.engine.bind(self)

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
        demonstrations: Sequence[tuple[str, str]] | None = None,
        allow_special_tokens_in_prompt: bool = False,
        engine: RolloutEngine | None = None,
        **model_kwargs: Any,
    ) -> Policy:
        """Load a causal LM from a local folder or a hub name (``default``: the embedded SmolLM2-135M-Instruct,
        offline); ``adapter`` is a peft adapter merged on top; ``engine`` produces the rollouts (default: ``hf``);
        ``demonstrations``: worked examples before each prompt (``None``: the model's own, i.e. the embedded
        policy's one-line example for ``default`` and none for any other model; ``()``: none)."""
        if engine is not None and not engine.in_process and (adapter is not None or gguf_file is not None):
            raise ConfigurationError(
                f"the {engine.name} engine loads the weights of the folder itself, without adapter or GGUF file; save "
                "the merged model with save_pretrained and load that folder"
            )
        from nabla.defaults import model_demonstrations, resolve_policy

        if demonstrations is None:
            demonstrations = model_demonstrations(name_or_path)
        name_or_path = resolve_policy(name_or_path)
        device = resolve_device(device)
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        tokenizer = load_pretrained(AutoTokenizer, name_or_path, **extra)
        model = load_pretrained(
            AutoModelForCausalLM, name_or_path, dtype=resolve_dtype(dtype), **extra, **model_kwargs
        ).to(device)
        if adapter is not None:
            model = load_adapter(model, adapter)
        return cls(
            model,
            tokenizer,
            chat_template=chat_template,
            system_prompt=system_prompt,
            demonstrations=demonstrations,
            allow_special_tokens_in_prompt=allow_special_tokens_in_prompt,
            engine=engine,
        )

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
        return self._format(prompt, self.demonstrations)

    def _format(self, prompt: str, demonstrations: Sequence[tuple[str, str]]) -> str:
        if not self.use_chat_template:
            return "".join(f"{user}\n{assistant}\n\n" for user, assistant in demonstrations) + prompt
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        for user, assistant in demonstrations:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, prompt: str) -> Tensor:
        """Token ids of the formatted prompt (1-D, on the policy's device). Control tokens written in the prompt
        are encoded as plain text unless ``allow_special_tokens_in_prompt``; the template's own stay control tokens."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise PromptError("the prompt is empty; pass the question text")
        if self.allow_special_tokens_in_prompt:
            text = self.format_prompt(prompt)
        else:
            marked = [tuple(mark_control_tokens(self.tokenizer, turn) for turn in pair) for pair in self.demonstrations]
            text = self._format(mark_control_tokens(self.tokenizer, prompt), marked)
        ids = encode_marked(self.tokenizer, text, add_special_tokens=not self.use_chat_template)
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
        on_step: Callable[[list[int]], None] | None = None,
    ) -> list[Rollout]:
        """Sample one continuation per context, row ``b`` with ``generators[b]``.

        Args:
            caches: per row, ``None`` or the key/value states of a leading part of that row's context, which is
                then not re-encoded (a proposal continues from the current rollout's states).
            keep_cache: return each row's states (context ⊕ tokens[:-1]) on its :class:`Rollout` for reuse.
            meter: one meter charged for every row, or one meter per row.
            on_step: called after every decoding step with each row's number of tokens so far (progress; it
                sees no logits and draws nothing, so the tokens do not depend on it).

        Rows are left-padded; each stops at an EOS token, a stop string or its own ``max_new_tokens`` (cut so that
        the context window is never exceeded). Each row's draws come from its own generator only, so a row samples
        the same tokens alone or inside any batch.

        With an engine other than ``hf`` the engine samples the tokens (one seed per row, drawn from the row's
        generator) and the logits, hidden states and states asked for are recovered by one forward over the new
        tokens on top of the row's cache (:meth:`_recover`).
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
        if not self.engine.in_process:
            recover = (record_logits, record_hidden, keep_cache)
            return self._generate_with_engine(
                contexts, sampling, generators, budgets, stop_strings, recover, caches, meters, on_step
            )

        contexts = [c.to(self.device) for c in contexts]
        cache, mask = self._context_cache(contexts, caches, meters)
        pads = [mask.shape[1] + 1 - len(c) for c in contexts]
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long, device=self.device)], dim=-1)

        outputs: list[list[int]] = [[] for _ in range(batch)]
        logits_seen: list[list[Tensor]] = [[] for _ in range(batch)]  # row b's (V,) logits, one per its step
        hidden_seen: list[list[Tensor]] = [[] for _ in range(batch)]
        row_caches: list[Cache | None] = [None] * batch
        finish = [""] * batch
        rows = list(range(batch))  # the batch's rows, by their index in ``contexts``; finished ones leave it
        next_input = torch.stack([c[-1:] for c in contexts])
        eos = self.eos_token_ids
        for _ in range(max(budgets)):
            out = self.model(
                input_ids=next_input,
                attention_mask=mask,
                position_ids=_positions(mask)[:, -1:],
                cache=cache,
                use_cache=True,
                output_hidden_states=record_hidden,
                logits_to_keep=1,
            )
            for b in rows:
                _charge(meters[b], "generated_tokens", 1, forward_flops(self.params, 1))
            step_logits = out.logits[:, -1, :].float()
            # every row in the batch is unfinished and draws: a row's generator advances exactly as it would alone
            tokens = sample_tokens(step_logits, sampling, [generators[b] for b in rows])
            for slot, (b, token) in enumerate(zip(rows, tokens.tolist())):
                outputs[b].append(token)
                finish[b] = self._finish_reason(outputs[b], token, eos, stop_strings, budgets[b])
                if record_logits:
                    logits_seen[b].append(step_logits[slot])
                if record_hidden:
                    hidden_seen[b].append(out.hidden_states[-1][slot, -1].float())
            if on_step is not None:
                on_step([len(output) for output in outputs])
            cache, mask, rows = self._drop_finished(
                cache, mask, rows, finish, keep_cache, row_caches, pads, contexts, outputs
            )
            if not rows:
                break
            next_input = torch.tensor([[outputs[b][-1]] for b in rows], device=self.device)
            mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=torch.long, device=self.device)], dim=-1)

        return [
            Rollout(
                token_ids=outputs[b],
                finish_reason=finish[b],
                context_length=len(contexts[b]),
                logits=torch.stack(logits_seen[b]) if record_logits else None,
                hidden=torch.stack(hidden_seen[b]) if record_hidden else None,
                cache=row_caches[b],
            )
            for b in range(batch)
        ]

    def _drop_finished(
        self,
        cache: Cache,
        mask: Tensor,
        rows: list[int],
        finish: list[str],
        keep_cache: bool,
        row_caches: list[Cache | None],
        pads: list[int],
        contexts: list[Tensor],
        outputs: list[list[int]],
    ) -> tuple[Cache, Tensor, list[int]]:
        """Take the finished rows out of the batch, so that no decoding step computes a row that no longer draws.
        A finished row's states are cut out first when they are kept: copied while other rows go on (so the batch's
        tensors can be freed), views once every row is done. The kept rows' states and mask are selected, not
        recomputed: each row attends exactly as before."""
        done = [slot for slot, b in enumerate(rows) if finish[b]]
        if not done:
            return cache, mask, rows
        last = len(done) == len(rows)
        if keep_cache:
            for slot in done:
                b = rows[slot]
                length = len(contexts[b]) + len(outputs[b]) - 1
                view = self._row_cache(cache, slot, pads[b], length, len(rows))
                row_caches[b] = view if last else clone_cache(view)
        if last:
            return cache, mask, []
        kept = [slot for slot, b in enumerate(rows) if not finish[b]]
        index = torch.tensor(kept, device=self.device)
        cache.batch_select_indices(index)
        return cache, mask[index], [rows[slot] for slot in kept]

    def _generate_with_engine(
        self,
        contexts: Sequence[Tensor],
        sampling: SamplingConfig,
        generators: Sequence[torch.Generator],
        budgets: list[int],
        stop_strings: Sequence[str],
        recover: tuple[bool, bool, bool],
        caches: Sequence[Cache | None] | None,
        meters: list[CostMeter | None],
        on_step: Callable[[list[int]], None] | None,
    ) -> list[Rollout]:
        """Tokens from :attr:`engine`, charged as the HF loop charges them (the prompt pass as one ``prefill``, one
        ``generated_tokens`` per token); ``recover`` = (logits, hidden states, states) to recover afterwards."""
        eos = tuple(sorted(self.eos_token_ids))
        requests = [
            EngineRequest(
                [int(t) for t in context.tolist()], budget, sampling, engine_seed(generator), tuple(stop_strings), eos
            )
            for context, budget, generator in zip(contexts, budgets, generators)
        ]
        outputs = self.engine.generate(requests)
        if len(outputs) != len(requests):
            raise RuntimeError(f"the {self.engine.name} engine answered {len(outputs)} of {len(requests)} requests")
        outputs = [self.engine.check(request, output) for request, output in zip(requests, outputs)]
        for context, output, row_meter in zip(contexts, outputs, meters):
            if len(context) > 1:
                _charge(row_meter, "prefill", 1, forward_flops(self.params, len(context) - 1))
            generated = len(output.token_ids)
            _charge(row_meter, "generated_tokens", generated, forward_flops(self.params, generated))
        if on_step is not None:
            on_step([len(output.token_ids) for output in outputs])
        tokens = [list(output.token_ids) for output in outputs]
        finishes = [output.finish_reason for output in outputs]
        if not any(recover):
            return [Rollout(t, f, len(c)) for t, f, c in zip(tokens, finishes, contexts)]
        return self._recover(contexts, tokens, finishes, caches, recover, meters)

    @torch.no_grad()
    def _recover(
        self,
        contexts: Sequence[Tensor],
        tokens: list[list[int]],
        finishes: list[str],
        caches: Sequence[Cache | None] | None,
        recover: tuple[bool, bool, bool],
        meters: list[CostMeter | None],
    ) -> list[Rollout]:
        """What the HF loop records while decoding, for tokens decoded elsewhere: one left-padded forward of each
        row's last context token and ``tokens[:-1]`` (right-padded) on top of the row's states of the context,
        charged as one ``prefill`` per row (and the context's states, where no cache holds them, as the HF loop
        charges them)."""
        record_logits, record_hidden, keep_cache = recover
        batch = len(contexts)
        contexts = [c.to(self.device) for c in contexts]
        cache, mask = self._context_cache(contexts, caches, meters)
        pads = [mask.shape[1] + 1 - len(c) for c in contexts]
        width = max(len(t) for t in tokens)
        block = torch.full((batch, max(width, 1)), self._pad_id(), dtype=torch.long, device=self.device)
        block_mask = torch.zeros_like(block)
        for row, (context, new) in enumerate(zip(contexts, tokens)):
            fed = [int(context[-1])] + new[:-1]
            block[row, : len(new)] = torch.tensor(fed[: len(new)], dtype=torch.long, device=self.device)
            block_mask[row, : len(new)] = 1
            if new:
                _charge(meters[row], "prefill", 1, forward_flops(self.params, len(new)))
        full_mask = torch.cat([mask, block_mask], dim=-1)
        out = self.model(
            input_ids=block,
            attention_mask=full_mask,
            position_ids=_positions(full_mask)[:, -block.shape[1] :],
            cache=cache,
            use_cache=True,
            output_hidden_states=record_hidden,
        )
        logits = out.logits.float() if record_logits else None
        hidden = out.hidden_states[-1].float() if record_hidden else None
        return [
            Rollout(
                token_ids=new,
                finish_reason=finish,
                context_length=len(context),
                logits=logits[row, : len(new)].clone() if logits is not None else None,
                hidden=hidden[row, : len(new)].clone() if hidden is not None else None,
                cache=self._row_cache(cache, row, pads[row], len(context) + len(new) - 1, batch)
                if keep_cache
                else None,
            )
            for row, (context, new, finish) in enumerate(zip(contexts, tokens, finishes))
        ]

    def _context_cache(
        self, contexts: list[Tensor], caches: list[Any] | None, meters: list[CostMeter | None]
    ) -> tuple[Cache, Tensor]:
        """The contexts' KV cache and attention mask: prefilled, or merged from the rows' own caches."""
        if caches is None or all(c is None for c in caches):
            return self._prefill_batch(contexts, meters)
        return self._merge_row_caches(contexts, caches, meters)

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
