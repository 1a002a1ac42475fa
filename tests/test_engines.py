"""Rollout engines: ``hf`` is today's decoding loop bit for bit; with any other engine the policy gets the engine's
tokens back with the logits, hidden states and key/value states the HF loop would have recorded (one forward,
charged as ``prefill``); the ``openai`` engine against a stub completions server on 127.0.0.1 (bounded and
self-stopping): same tokens as in process, retries, timeouts and typed errors; vLLM where it is installed."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import PROMPT

from nabla import (
    ConfigurationError,
    EngineError,
    EngineSpec,
    EngineUnavailableError,
    HFEngine,
    LatentOptimizer,
    OpenAIEngine,
    Policy,
    RolloutEngine,
    Sampler,
    SamplingConfig,
    TestTimeTrainer,
    TokenSelection,
)
from nabla.acceleration import Acceleration
from nabla.baselines import Baselines
from nabla.config import PolicySpec
from nabla.cost import CostMeter
from nabla.engines import EngineOutput, EngineRequest, engine_seed, finish_reason
from nabla.kv import cache_length

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [PROMPT, "what is 7 minus 2 ?", "pears and apples so we get the total ?"]
SAMPLING = SamplingConfig(temperature=0.9, top_p=0.95)
# Policy.generate on the session's tiny policy (tiny_causal_lm(seed=0)) before engines existed: seeds 11, 12, 13,
# budgets 20, 12, 20 -> token ids, finish reason, sum of the logits, sum of the hidden states
GOLDEN = [
    ([10, 49, 38, 35, 31, 9, 10, 7, 45, 23, 54, 39, 40, 23, 5, 1, 53, 4, 50, 22], "length", 0.80474034, -33.7254777),
    ([40, 33, 15, 5, 48, 33, 35, 26, 45, 1, 15, 15], "length", 2.31824657, 25.0602954),
    ([40, 25, 6], "eos", 0.28773026, -16.0644064),
]


class TwinEngine(RolloutEngine):
    """A fake external engine: the same weights decoded by an HF policy of their own, requests counted."""

    name = "twin"

    def __init__(self, model, tokenizer) -> None:
        self.inner = HFEngine()
        self.inner.bind(Policy(model, tokenizer))
        self.requests: list[EngineRequest] = []

    def generate(self, requests):
        self.requests.extend(requests)
        return self.inner.generate(requests)


def _generate(policy, seeds, meter=None, **options):
    contexts = [policy.encode(p) for p in PROMPTS]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return policy.generate(contexts, SAMPLING, generators, [20, 12, 20], meter=meter, **options)


# ---------------------------------------------------------------------------------------------- hf, bit for bit
def test_hf_engine_is_the_policys_own_loop_bit_for_bit(policy, tokenizer):
    assert isinstance(policy.engine, HFEngine)
    recorded = dict(record_logits=True, record_hidden=True, keep_cache=True)
    rollouts = _generate(policy, [11, 12, 13], **recorded)
    for rollout, (tokens, finish, logits_sum, hidden_sum) in zip(rollouts, GOLDEN):
        assert (rollout.token_ids, rollout.finish_reason) == (tokens, finish)
        assert float(rollout.logits.double().sum()) == pytest.approx(logits_sum, abs=1e-6)
        assert float(rollout.hidden.double().sum()) == pytest.approx(hidden_sum, abs=1e-5)
    explicit = Policy(policy.model, tokenizer, engine=EngineSpec(kind="hf").build())
    for a, b in zip(rollouts, _generate(explicit, [11, 12, 13], **recorded)):
        assert a.token_ids == b.token_ids and torch.equal(a.logits, b.logits) and torch.equal(a.hidden, b.hidden)


# ---------------------------------------------------------------------------------------------- other engines
def test_engine_tokens_come_back_with_what_the_hf_loop_records(policy, tokenizer):
    engine = TwinEngine(policy.model, tokenizer)
    external = Policy(policy.model, tokenizer, engine=engine)
    generators = [torch.Generator().manual_seed(s) for s in (11, 12, 13)]
    seeds = [engine_seed(g) for g in generators]  # what the external policy draws for each row
    hf_meter, engine_meter = CostMeter(), CostMeter()
    recorded = dict(record_logits=True, record_hidden=True, keep_cache=True)
    expected = _generate(policy, seeds, hf_meter, **recorded)
    got = _generate(external, [11, 12, 13], engine_meter, **recorded)
    assert [r.seed for r in engine.requests] == seeds
    assert engine.requests[0].stop_token_ids == tuple(sorted(policy.eos_token_ids))
    for context, a, b in zip(PROMPTS, expected, got):
        assert (a.token_ids, a.finish_reason, a.context_length) == (b.token_ids, b.finish_reason, b.context_length)
        torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.hidden, a.hidden, atol=1e-5, rtol=1e-5)
        assert cache_length(b.cache) == cache_length(a.cache) == len(policy.encode(context)) + len(a) - 1
        for mine, theirs in zip(b.cache.layers, a.cache.layers):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
    hf, ext = hf_meter.snapshot(), engine_meter.snapshot()
    new_tokens = sum(len(r) for r in expected)
    assert ext["generated_tokens"] == hf["generated_tokens"] == new_tokens
    # the engine's prompt pass and the recovery forward: one prefill each per row, on top of the HF loop's
    assert ext["prefill"] == hf["prefill"] + 2 * len(PROMPTS)
    # the engine does the HF loop's work (prompt pass, one step per token), the policy does it again to recover
    assert ext["flops"] == pytest.approx(2 * hf["flops"])
    plain = _generate(Policy(policy.model, tokenizer, engine=TwinEngine(policy.model, tokenizer)), [11, 12, 13])
    assert [r.token_ids for r in plain] == [r.token_ids for r in got] and all(r.logits is None for r in plain)


def test_an_engine_output_that_cannot_be_the_policys_is_refused(policy, tokenizer):
    class Broken(RolloutEngine):
        name = "broken"

        def __init__(self, tokens):
            self.tokens = tokens

        def generate(self, requests):
            return [EngineOutput(list(self.tokens), "length") for _ in requests]

    context = [policy.encode(PROMPT)]
    for tokens, problem in (([5] * 9, "9 tokens for a budget of 4"), ([5, policy.vocab_size], "vocabulary")):
        broken = Policy(policy.model, tokenizer, engine=Broken(tokens))
        with pytest.raises(EngineError, match=problem):
            broken.generate(context, SAMPLING, [torch.Generator().manual_seed(0)], 4)


def _trainer(policy, reward, acceleration=None, gradient_caching=True):
    optimizer = LatentOptimizer(steps=4, lr=0.3, gradient_caching=gradient_caching)
    sampler = Sampler(max_new_tokens=10, selection=TokenSelection(0.97, 0.25, 0.0))
    return TestTimeTrainer(policy, reward, optimizer, sampler, acceleration=acceleration or Acceleration())


def _decisions(result):
    return result.token_ids, [(r.position, r.proposed_token, r.accepted) for r in result.revisions]


def test_the_loop_on_an_engine_keeps_every_exact_saving_and_baselines_share_it(policy, tokenizer, reward):
    engine = TwinEngine(policy.model, tokenizer)
    external = Policy(policy.model, tokenizer, engine=engine)
    fast = _trainer(external, reward)
    slow = _trainer(external, reward, Acceleration.reference(), gradient_caching=False)
    for seed in range(2):
        before = len(engine.requests)
        accelerated = fast.fit(PROMPT, seed=seed)
        requests = len(engine.requests) - before
        reference = slow.fit(PROMPT, seed=seed)
        assert _decisions(accelerated) == _decisions(reference)  # recovered logits and caches are the HF loop's
        assert requests >= 1 and accelerated.stats["prefill"] >= 2 * requests  # prompt pass + recovery, each
    before = len(engine.requests)
    result = Baselines(external, reward, SAMPLING, max_new_tokens=8).best_of_n(PROMPT, 3, seed=0)
    assert len(engine.requests) - before == 3 and result.stats["rollouts"] == 3


# ---------------------------------------------------------------------------------------------- openai, stub server
class _Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, policy) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.engine = HFEngine()
        self.engine.bind(policy)
        self.lock = threading.Lock()
        self.served = 0
        self.fail_next = 0  # answer 503 this many times
        self.refuse = False  # answer 400
        self.without_ids = False  # answer text only
        self.delay_s = 0.0
        self.limit = 500  # bounded: past this many requests every answer is a 429

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _Handler(BaseHTTPRequestHandler):
    server: _Stub

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._send(200, {"object": "list", "data": [{"id": "tiny", "object": "model"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        stub = self.server
        with stub.lock:
            stub.served += 1
            if stub.served > stub.limit:
                return self._send(429, {"error": "request limit of the test server"})
            if stub.fail_next:
                stub.fail_next -= 1
                return self._send(503, {"error": "busy"})
            if stub.refuse:
                return self._send(400, {"error": {"message": "bad request: prompt"}})
            time.sleep(stub.delay_s)
            top_k = None if body["top_k"] in (-1, 0) else body["top_k"]
            sampling = SamplingConfig(body["temperature"], top_k, None if body["top_p"] == 1.0 else body["top_p"])
            request = EngineRequest(body["prompt"], body["max_tokens"], sampling, body["seed"], tuple(body["stop"]))
            output = stub.engine.generate([request])[0]
        reason = {"eos": "stop", "stop": "stop", "length": "length"}[output.finish_reason]
        stop_reason = output.token_ids[-1] if output.finish_reason == "eos" else None
        choice = {"index": 0, "text": "", "finish_reason": reason, "stop_reason": stop_reason}
        if not stub.without_ids:
            choice["token_ids"] = output.token_ids
        self._send(200, {"id": "cmpl-test", "object": "text_completion", "model": body["model"], "choices": [choice]})


@pytest.fixture(scope="module")
def stub(policy, tokenizer):
    server = _Stub(Policy(policy.model, tokenizer))  # the same weights, served over HTTP
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    watchdog = threading.Timer(300, server.shutdown)  # stops by itself even if a test hangs
    watchdog.daemon = True
    watchdog.start()
    yield server
    watchdog.cancel()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def fresh(stub):
    stub.fail_next, stub.refuse, stub.without_ids, stub.delay_s = 0, False, False, 0.0
    stub.served = 0
    return stub


def test_openai_engine_decodes_what_the_same_model_decodes_in_process(policy, tokenizer, reward, fresh):
    served = Policy(policy.model, tokenizer, engine=OpenAIEngine(fresh.url, timeout_s=30))
    twin = Policy(policy.model, tokenizer, engine=TwinEngine(policy.model, tokenizer))
    recorded = dict(record_logits=True, keep_cache=True)
    for a, b in zip(_generate(twin, [11, 12, 13], **recorded), _generate(served, [11, 12, 13], **recorded)):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        assert torch.equal(a.logits, b.logits)
    assert fresh.served == len(PROMPTS)
    over_http, in_process = _trainer(served, reward).fit(PROMPT, seed=3), _trainer(twin, reward).fit(PROMPT, seed=3)
    assert _decisions(over_http) == _decisions(in_process)
    assert {k: v for k, v in over_http.stats.items() if k != "wall_time_s"} == pytest.approx(
        {k: v for k, v in in_process.stats.items() if k != "wall_time_s"}
    )


def test_openai_engine_retries_a_busy_server(policy, tokenizer, fresh):
    fresh.fail_next = 2
    engine = OpenAIEngine(fresh.url, "tiny", retries=2, backoff_s=0.01)
    engine.bind(policy)
    request = EngineRequest(policy.encode(PROMPT).tolist(), 5, SAMPLING, 7)
    output = engine.generate([request])[0]
    assert fresh.served == 3 and 1 <= len(output.token_ids) <= 5
    fresh.fail_next = 5
    with pytest.raises(EngineUnavailableError, match="after 3 tries"):
        engine.generate([request])


def test_openai_engine_errors_are_typed_and_name_the_fix(policy, fresh):
    request = EngineRequest(policy.encode(PROMPT).tolist(), 5, SAMPLING, 7)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    engine = OpenAIEngine(f"http://127.0.0.1:{closed}", "tiny", retries=1, backoff_s=0.01, timeout_s=2)
    started = time.perf_counter()
    with pytest.raises(EngineUnavailableError, match=r"no answer from the completions server .* start it"):
        engine.generate([request])
    assert time.perf_counter() - started < 5
    fresh.refuse = True
    with pytest.raises(EngineError, match="refused the request \\(400\\)") as refused:
        OpenAIEngine(fresh.url, "tiny", retries=3, backoff_s=0.01).generate([request])
    assert not isinstance(refused.value, EngineUnavailableError) and fresh.served == 1  # not retried
    fresh.refuse, fresh.without_ids = False, True
    with pytest.raises(EngineError, match="no token ids"):
        OpenAIEngine(fresh.url, "tiny").generate([request])
    fresh.without_ids, fresh.delay_s = False, 1.0
    with pytest.raises(EngineUnavailableError, match="after 1 tries"):
        OpenAIEngine(fresh.url, "tiny", retries=0, timeout_s=0.2).generate([request])


def test_engine_settings_are_checked_where_they_are_read():
    assert EngineSpec().build().name == "hf"
    assert isinstance(EngineSpec(kind="openai", url="http://127.0.0.1:8000").build(), OpenAIEngine)
    for bad in (
        dict(kind="sglang"),
        dict(kind="openai"),
        dict(kind="hf", url="http://127.0.0.1:8000"),
        dict(kind="openai", url="127.0.0.1:8000"),
        dict(kind="openai", url="http://x", retries=-1),
        dict(kind="openai", url="http://x", timeout_s=0.0),
        dict(kind="vllm", gpu_memory_utilization=1.5),
    ):
        with pytest.raises(ConfigurationError):
            EngineSpec(**bad)
    with pytest.raises(ConfigurationError, match="without adapter"):
        PolicySpec(adapter="some/adapter", engine=EngineSpec(kind="vllm"))
    assert finish_reason("stop", None, [3, 5], {5}) == "eos"
    assert finish_reason("stop", "}", [3, 4], {5}) == "stop"
    assert finish_reason("length", None, [5], {5}) == "length"
    with pytest.raises(EngineError, match="finish reason 'abort'"):
        finish_reason("abort", None, [3], {5})


def test_the_engine_is_chosen_in_yaml(tmp_path):
    from nabla.cli import build_parser

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "policy:\n  engine:\n    kind: openai\n    url: http://127.0.0.1:8000/v1\n    retries: 1\npool: 8\n"
    )
    parser, _ = build_parser("evaluate")
    init = parser.instantiate(parser.parse_args(["--config", str(recipe)]))
    assert init.policy.engine == EngineSpec(kind="openai", url="http://127.0.0.1:8000/v1", retries=1)
    assert init.pool == 8


# ---------------------------------------------------------------------------------------------- vLLM
def test_vllm_sampling_maps_one_to_one():
    pytest.importorskip("vllm")
    from nabla.engines import VLLMEngine

    request = EngineRequest([1, 2, 3], 7, SamplingConfig(0.6, 20, 0.95), 42, ("\n\n",), (2,))
    params = VLLMEngine("unused").sampling_params(request)
    assert (params.temperature, params.top_k, params.top_p, params.seed, params.max_tokens) == (0.6, 20, 0.95, 42, 7)
    assert (params.min_p, params.repetition_penalty, params.presence_penalty) == (0.0, 1.0, 0.0)
    assert params.stop == ["\n\n"] and params.stop_token_ids == [2] and params.include_stop_str_in_output
    off = VLLMEngine("unused").sampling_params(EngineRequest([1], 3, SamplingConfig(0.0, None, None), 1))
    assert (off.temperature, off.top_k, off.top_p) == (0.0, 0, 1.0)


@pytest.mark.slow
def test_vllm_engine_decodes_the_default_model():
    """SmolLM2 through in-process vLLM (opt in; needs `pip install -e ".[vllm]"`): the answer, greedy tokens the
    recovered logits agree with, and the cost accounting."""
    pytest.importorskip("vllm")
    policy = PolicySpec(engine=EngineSpec(kind="vllm", kv_cache_gib=1)).load()
    question = "Tom has 3 apples and buys 5 more. How many apples does he have now? Put the answer in \\boxed{}."
    context = policy.encode(question)
    greedy = SamplingConfig(temperature=0.0, top_p=None)
    meter = CostMeter()
    (rollout,) = policy.generate(
        [context], greedy, [torch.Generator().manual_seed(0)], 48, record_logits=True, keep_cache=True, meter=meter
    )
    assert "8" in policy.decode(rollout.token_ids)
    assert rollout.logits.argmax(-1).tolist() == rollout.token_ids  # the HF forward agrees with vLLM's greedy
    assert cache_length(rollout.cache) == len(context) + len(rollout) - 1
    stats = meter.snapshot()
    assert stats["generated_tokens"] == len(rollout)
    assert stats["prefill"] == 3  # vLLM's prompt pass, the HF prefill of the context, the recovery forward
    hf = PolicySpec().load()
    (reference,) = hf.generate([context], greedy, [torch.Generator().manual_seed(0)], 48)
    assert reference.token_ids == rollout.token_ids
    policy.engine.close()


# ---------------------------------------------------------------------------------------------- the GPU check
def test_the_prepared_gpu_check_rehearses_on_cpu(capsys):
    """``benchmarks/gpu_check.py --dry-run``: the GPU check's every step on the tiny models in bf16 on CPU."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gpu_check

    small = ["--problems", "2", "--pool", "2", "--max-new-tokens", "6", "--steps", "2"]
    try:
        outcome = gpu_check.main(["--dry-run", *small])
    finally:
        torch.use_deterministic_algorithms(False)  # the check turns them on for the whole process
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "checks: ok" and outcome["checks"] == {"fp32_variables": True, "hf_rerun_identical": True}
    printed = dict(line.split(": ", 1) for line in lines if ": " in line and not line.startswith(("┃", "│")))
    assert float(printed["nabla_over_best_of_8_wall"]) > 0 and float(printed["batched_throughput_gain"]) > 0
    assert printed["identical_tokens_pool"] == "2/2" and printed["pool_agreement"] == "2/2"
    assert float(printed["hf_b1_token_over_floor"]) > 1  # nothing decodes faster than its weights can be read
