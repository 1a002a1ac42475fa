"""Continuous batching: a pool of prompt coroutines kept full, a finished prompt's slot refilled at once, and every
prompt's result the one it gets alone (the trainer, the baselines, the solver and the runner)."""

from __future__ import annotations

import json

import pytest
from conftest import PROMPT

from nabla import ConfigurationError, LatentOptimizer, Sampler, SamplingConfig, TestTimeTrainer, TokenSelection
from nabla.baselines import Baselines
from nabla.config import PolicySpec, RewardSpec
from nabla.eval.datasets import DatasetSpec, Problem
from nabla.eval.methods import MethodSpec, Solver
from nabla.eval.runner import compare, read_records
from nabla.scheduling import PromptPool

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [PROMPT, "what is 7 minus 2 ?", "pears and apples so we get the total ?", "what is 4 plus 9 ?"]


# ---------------------------------------------------------------------------------------------- the pool itself
def _countdown(index: int, steps: int):
    """A prompt that needs ``steps`` answers; its result is what it was answered."""
    got = []
    for step in range(steps):
        got.append((yield (index, step)))
    return got


class _Server:
    def __init__(self, fail_on=None) -> None:
        self.rounds: list[list[int]] = []
        self.fail_on = fail_on

    def __call__(self, requests):
        self.rounds.append(sorted(requests))
        if any(request == self.fail_on for request in requests.values()):
            raise ValueError("a request this server cannot answer")
        return {key: request[0] * 10 + request[1] for key, request in requests.items()}


LENGTHS = [3, 1, 4, 1, 2, 2]


def _run(size, server=None, catch=()):
    server = server or _Server()
    pool = PromptPool(server, size, catch=catch)
    finished = list(pool.run(len(LENGTHS), lambda i: _countdown(i, LENGTHS[i])))
    return finished, server, pool


def test_the_pool_stays_full_and_a_finished_prompt_is_replaced_at_once():
    finished, server, pool = _run(2)
    assert sorted(f.index for f in finished) == list(range(len(LENGTHS)))
    assert server.rounds[:4] == [[0, 1], [0, 2], [0, 2], [2, 3]]  # prompt 1 ends after round 1: prompt 2 joins
    assert all(len(served) == 2 for served in server.rounds[:-1]) and pool.round_sizes == [2] * 6 + [1]
    assert [f.index for f in finished][:3] == [1, 0, 3]  # in the order they finish


def test_results_do_not_depend_on_the_pool_size():
    expected = {i: [i * 10 + step for step in range(n)] for i, n in enumerate(LENGTHS)}
    for size in (1, 2, 5, None):
        finished, server, _ = _run(size)
        assert {f.index: f.result for f in finished} == expected
        assert max(len(served) for served in server.rounds) == min(size or len(LENGTHS), len(LENGTHS))
    assert len(_run(1)[1].rounds) == sum(LENGTHS) and len(_run(None)[1].rounds) == max(LENGTHS)
    with pytest.raises(ConfigurationError, match="pool size"):
        PromptPool(_Server(), 0)


def test_a_caught_error_ends_its_prompt_only():
    def flaky(index):
        if index == 2:
            yield (index, 0)
            raise ValueError("this prompt failed")
        return (yield from _countdown(index, LENGTHS[index]))

    pool = PromptPool(_Server(), 2, catch=(ValueError,))
    finished = {f.index: f for f in pool.run(len(LENGTHS), flaky)}
    assert isinstance(finished[2].error, ValueError) and finished[2].result is None
    assert all(finished[i].error is None and len(finished[i].result) == LENGTHS[i] for i in finished if i != 2)
    with pytest.raises(ValueError):
        list(PromptPool(_Server(), 2).run(len(LENGTHS), flaky))
    # a round the server cannot answer is answered one request at a time: only the prompt that asked fails
    finished, server, _ = _run(3, _Server(fail_on=(2, 1)), catch=(ValueError,))
    outcome = {f.index: f for f in finished}
    assert isinstance(outcome[2].error, ValueError)
    assert all(outcome[i].result == [i * 10 + s for s in range(LENGTHS[i])] for i in outcome if i != 2)
    assert [1] not in server.rounds and [2] in server.rounds


def test_wall_time_shares_add_up_to_the_run():
    import time

    def slow(requests):
        time.sleep(0.01)
        return {key: 0 for key in requests}

    started = time.perf_counter()
    finished = list(PromptPool(slow, 3).run(len(LENGTHS), lambda i: _countdown(i, LENGTHS[i])))
    total = time.perf_counter() - started
    shares = [f.wall_time_s for f in finished]
    assert all(share > 0 for share in shares) and sum(shares) == pytest.approx(total, rel=0.2)


# ---------------------------------------------------------------------------------------------- the trainer
def _trainer(policy, reward):
    optimizer = LatentOptimizer(steps=4, lr=0.3)
    sampler = Sampler(max_new_tokens=10, selection=TokenSelection(0.97, 0.25, 0.0))
    return TestTimeTrainer(policy, reward, optimizer, sampler)


def _decisions(result):
    return result.token_ids, [(r.position, r.proposed_token, r.accepted) for r in result.revisions]


def _counts(stats):
    return {key: value for key, value in stats.items() if key != "wall_time_s"}


def test_fit_pool_gives_every_prompt_its_one_at_a_time_result(policy, reward):
    trainer = _trainer(policy, reward)
    rounds = []
    serve = trainer._serve
    trainer._serve = lambda states, requests: rounds.append(sorted(requests)) or serve(states, requests)
    pooled = dict(trainer.fit_pool(PROMPTS, seeds=[4, 5, 6, 7], pool=2))
    del trainer._serve
    last = {i: max(k for k, served in enumerate(rounds) if i in served) for i in range(len(PROMPTS))}
    for k, served in enumerate(rounds):  # kept full: two prompts a round while two are left
        assert len(served) == min(2, sum(end >= k for end in last.values()))
    for index, (prompt, seed) in enumerate(zip(PROMPTS, [4, 5, 6, 7])):
        alone = trainer.fit(prompt, seed=seed)
        assert _decisions(pooled[index]) == _decisions(alone)
        assert pooled[index].reward == pytest.approx(alone.reward, abs=1e-6)
        assert _counts(pooled[index].stats) == pytest.approx(_counts(alone.stats))
        assert pooled[index].stats["wall_time_s"] > 0
    assert [r.token_ids for r in trainer.fit_batch(PROMPTS[:2], seeds=[4, 5], pool=1)] == [
        pooled[0].token_ids,
        pooled[1].token_ids,
    ]
    assert trainer.fit_batch([], pool=2) == []


# ---------------------------------------------------------------------------------------------- baselines
def test_baselines_share_batches_across_prompts_and_give_the_same_samples(policy, reward):
    baselines = Baselines(policy, reward, SamplingConfig(temperature=0.9), max_new_tokens=8)
    rows = []
    generate = policy.generate
    policy.generate = lambda contexts, *args, **kwargs: (
        rows.append(len(contexts)) or generate(contexts, *args, **kwargs)
    )
    try:
        pooled = dict(baselines.run_pool("best_of_n", PROMPTS, 3, seeds=[1, 2, 3, 4], pool=3))
    finally:
        del policy.generate
    assert rows[0] == 9 and max(rows) == 9  # three prompts' samples in one generation
    for index, (prompt, seed) in enumerate(zip(PROMPTS, [1, 2, 3, 4])):
        alone = baselines.best_of_n(prompt, 3, seed=seed)
        assert [s.token_ids for s in pooled[index].samples] == [s.token_ids for s in alone.samples]
        assert (pooled[index].chosen, pooled[index].text) == (alone.chosen, alone.text)
        assert pooled[index].reward == pytest.approx(alone.reward, abs=1e-6)
        assert _counts(pooled[index].stats) == pytest.approx(_counts(alone.stats))
    greedy = dict(baselines.run_pool("greedy", PROMPTS, 1, pool=None))
    assert [greedy[i].text for i in range(len(PROMPTS))] == [baselines.greedy(p).text for p in PROMPTS]


# ---------------------------------------------------------------------------------------------- solver and runner
def test_solve_many_skips_an_unreadable_problem_and_keeps_the_others(policy, reward):
    problems = [Problem(f"p{i}", q, "5", "test") for i, q in enumerate(PROMPTS[:3])]
    problems.insert(1, Problem("long", "what " * 400, "5", "test"))  # longer than the tiny model's window
    solver = Solver(MethodSpec("self_consistency", n=2, max_new_tokens=6), policy, reward, "{question}")
    records = {r["problem_id"]: r for r in solver.solve_many(problems, base_seed=3, pool=2)}
    assert records["long"]["status"] == "skipped" and "context window" in records["long"]["error"]
    for problem in problems:
        if problem.id != "long":
            alone = solver.solve(problem, base_seed=3)
            assert records[problem.id]["response"] == alone["response"]
            assert _counts(records[problem.id]["cost"]) == pytest.approx(_counts(alone["cost"]))


def test_compare_with_a_pool_writes_the_records_of_one_at_a_time(tmp_path, saved_models):
    policy_dir, reward_dir = saved_models
    data = tmp_path / "problems.jsonl"
    questions = [("what is 2 plus 3 ?", "5"), ("what is 4 minus 1 ?", "3"), ("what is 2 times 3 ?", "6")]
    data.write_text("".join(json.dumps({"problem": q, "answer": a}) + "\n" for q, a in questions))
    specs = {
        "policy": PolicySpec(name_or_path=str(policy_dir)),
        "reward": RewardSpec(kind="classifier", name_or_path=str(reward_dir)),
        "dataset": DatasetSpec(name="jsonl", path=str(data), prompt_template="{question}"),
    }
    methods = [
        MethodSpec("best_of_n", n=2, max_new_tokens=6),
        MethodSpec("nabla", n=2, max_new_tokens=6, optimizer=LatentOptimizer(steps=2)),
    ]
    runs = {}
    for pool in (1, 3):
        output = tmp_path / f"pool-{pool}"
        compare(**specs, methods=methods, output=str(output), progress=False, pool=pool)
        runs[pool] = {(r["method"], r["problem_id"]): r for r in read_records(output)}
    assert len(runs[3]) == len(questions) * len(methods)
    for key, record in runs[1].items():
        pooled = runs[3][key]
        assert _counts(pooled.pop("cost")) == pytest.approx(_counts(record.pop("cost")))
        assert pooled == record
    with pytest.raises(ConfigurationError, match="pool must be >= 1"):
        compare(**specs, methods=methods, output=str(tmp_path / "bad"), progress=False, pool=0)
