import json
import os
import subprocess
import sys
import textwrap

import pytest

from nabla import ConfigurationError, LatentOptimizer, Sampler
from nabla.config import PolicySpec, RewardSpec
from nabla.errors import DataError
from nabla.eval.datasets import DatasetSpec, Problem
from nabla.eval.methods import MethodSpec
from nabla.eval.runner import RECORDS_FOLDER, RunPlan, compare, evaluate, read_records, run

QUESTIONS = [
    ("what is 2 plus 3 ?", "5"),
    ("what is 4 minus 1 ?", "3"),
    ("what is 2 times 3 ?", "6"),
    ("what is 7 plus 5 ?", "12"),
    ("what is 9 minus 4 ?", "5"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, saved_models):
    folder = tmp_path_factory.mktemp("runner")
    policy_dir, reward_dir = saved_models
    data = folder / "problems.jsonl"
    data.write_text("".join(json.dumps({"problem": q, "answer": a}) + "\n" for q, a in QUESTIONS))
    specs = {
        "policy": PolicySpec(name_or_path=str(policy_dir)),
        "reward": RewardSpec(kind="classifier", name_or_path=str(reward_dir)),
        "dataset": DatasetSpec(name="jsonl", path=str(data), prompt_template="{question}"),
    }
    return folder, specs


METHODS = [
    MethodSpec("greedy", max_new_tokens=8),
    MethodSpec("self_consistency", n=3, max_new_tokens=8),
    MethodSpec("best_of_n", n=3, max_new_tokens=8),
    MethodSpec("nabla", n=2, max_new_tokens=8, optimizer=LatentOptimizer(steps=2)),
]


def _comparable(records):
    """Records keyed by (method, problem), without wall times (the only field that may differ between runs)."""
    out = {}
    for record in records:
        record = json.loads(json.dumps(record))
        record["cost"].pop("wall_time_s")
        out[(record["method"], record["problem_id"])] = record
    return out


@pytest.fixture(scope="module")
def reference(setup):
    folder, specs = setup
    output = folder / "one-process"
    summaries = compare(**specs, methods=METHODS, output=str(output), progress=False)
    return output, summaries


def test_compare_writes_records_table_and_plot(reference):
    output, summaries = reference
    records = read_records(output)
    assert len(records) == len(QUESTIONS) * len(METHODS)
    assert [s.method for s in summaries] == ["greedy", "self_consistency@3", "best_of_n@3", "nabla@2"]
    record = next(r for r in records if r["method"] == "best_of_n@3")
    assert record["gold"] in {a for _, a in QUESTIONS} and len(record["samples"]) == 3
    assert record["cost"]["rm_forward"] == 3 and record["cost"]["model_calls"] > record["cost"]["generated_tokens"]
    assert all(r["cost"]["rollouts"] <= 2 for r in records if r["method"] == "nabla@2")
    table = (output / "comparison.md").read_text()
    assert all(f"| {s.method} |" in table for s in summaries)
    assert (output / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((output / "summary.json").read_text())[0]["method"] == "greedy"
    paired = (output / "paired.md").read_text()  # by default ∇-Reasoner against every other method
    assert [line.split(" | ")[:2] for line in paired.splitlines()[4:]] == [
        ["| nabla@2", "greedy"],
        ["| nabla@2", "self_consistency@3"],
        ["| nabla@2", "best_of_n@3"],
    ]


def test_two_processes_give_the_same_records_as_one(setup, reference):
    folder, specs = setup
    output = folder / "two-processes"
    compare(**specs, methods=METHODS, output=str(output), num_processes=2, progress=False)
    files = sorted(p.name for p in (output / RECORDS_FOLDER).glob("*.jsonl"))
    assert files == ["rank-0.jsonl", "rank-1.jsonl"]
    assert all((output / RECORDS_FOLDER / name).read_text() for name in files)
    assert _comparable(read_records(output)) == _comparable(read_records(reference[0]))


KILLER = """
import os, signal, sys
from nabla.eval import methods

solve, calls = methods.Solver.solve, [0]

def solve_then_die(self, *args, **kwargs):
    if calls[0] == {kill_after}:
        os.kill(os.getpid(), signal.SIGKILL)  # a hard kill in the middle of the run
    calls[0] += 1
    return solve(self, *args, **kwargs)

methods.Solver.solve = solve_then_die
from nabla.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _cli_options(specs, method, output):
    policy, reward, dataset = specs["policy"], specs["reward"], specs["dataset"]
    return [
        f"--policy.name_or_path={policy.name_or_path}",
        f"--reward.kind={reward.kind}",
        f"--reward.name_or_path={reward.name_or_path}",
        "--dataset.name=jsonl",
        f"--dataset.path={dataset.path}",
        "--dataset.prompt_template={question}",
        f"--method.name={method.name}",
        f"--method.n={method.n}",
        f"--method.max_new_tokens={method.max_new_tokens}",
        f"--output={output}",
        "--progress=false",
    ]


def test_resume_after_a_kill_neither_redoes_nor_duplicates(setup, reference):
    folder, specs = setup
    output = folder / "killed"
    method = METHODS[1]
    script = textwrap.dedent(KILLER).replace("{kill_after}", "3")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", script, "evaluate", *_cli_options(specs, method, output)]
    killed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    records_file = output / RECORDS_FOLDER / "rank-0.jsonl"
    assert len(records_file.read_text().splitlines()) == 3
    with records_file.open("a") as handle:  # and a record whose newline the kill cut off: not done, so redone
        handle.write(json.dumps({"problem_id": "3", "method": method.display_label, "response": "cut"}))

    solved = []
    summaries = run(
        RunPlan(**specs, methods=[method], output=str(output), progress=False), on_record=lambda r: solved.append(r)
    )
    assert [r["problem_id"] for r in solved] == ["3", "4"]  # only what was missing
    records = read_records(output)
    keys = [(r["method"], r["problem_id"]) for r in records]
    assert len(keys) == len(set(keys)) == len(QUESTIONS)
    assert records_file.read_text().count("\n") == len(QUESTIONS) and '"cut"' not in records_file.read_text()
    expected = {k: v for k, v in _comparable(read_records(reference[0])).items() if k[0] == method.display_label}
    assert _comparable(records) == expected
    assert summaries[0].problems == len(QUESTIONS)


def test_problems_can_be_given_directly(setup, tmp_path):
    _, specs = setup
    problems = [Problem(f"gen/{i}", q, a, "generated") for i, (q, a) in enumerate(QUESTIONS)]
    summaries = evaluate(**specs, method=METHODS[0], output=str(tmp_path), problems=problems, limit=2, offset=1)
    assert sorted(r["problem_id"] for r in read_records(tmp_path)) == ["gen/1", "gen/2"]
    assert summaries[0].problems == 2


def test_a_rerun_with_other_settings_is_refused(setup, reference):
    _, specs = setup
    output, _ = reference
    with pytest.raises(DataError, match="another seed"):
        evaluate(**specs, method=METHODS[0], output=str(output), seed=1, progress=False)
    changed = MethodSpec("self_consistency", n=3, max_new_tokens=9)
    with pytest.raises(DataError, match="other settings"):
        evaluate(**specs, method=changed, output=str(output), progress=False)


def test_records_scored_by_a_retrained_reward_model_of_the_same_name_are_not_mixed(setup, tmp_path):
    import shutil

    from nabla.eval.runner import reward_weights_digest

    _, specs = setup
    retrained = tmp_path / "reward"
    shutil.copytree(specs["reward"].name_or_path, retrained)
    reward = RewardSpec(kind="classifier", name_or_path=str(retrained))
    greedy = MethodSpec("greedy", max_new_tokens=2)
    evaluate(**{**specs, "reward": reward}, method=greedy, output=str(tmp_path / "out"), limit=1, progress=False)
    before = reward_weights_digest(reward)
    weights = next(retrained.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: the same folder, another model
    weights.write_bytes(bytes(data))
    assert reward_weights_digest(reward) not in (before, None)
    with pytest.raises(DataError, match="another reward_weights"):
        evaluate(**{**specs, "reward": reward}, method=greedy, output=str(tmp_path / "out"), limit=1, progress=False)
    assert reward_weights_digest(RewardSpec(kind="self_judge")) is None


def test_bad_method_lists_are_one_line_errors(setup, tmp_path):
    _, specs = setup
    with pytest.raises(ConfigurationError, match="label"):
        compare(**specs, methods=[METHODS[0], METHODS[0]], output=str(tmp_path), progress=False)
    no_reward = {**specs, "reward": RewardSpec(kind="none")}
    with pytest.raises(ConfigurationError, match="reward"):
        evaluate(**no_reward, method=METHODS[2], output=str(tmp_path), progress=False)
    with pytest.raises(ConfigurationError, match="contradicts"):
        MethodSpec("nabla", n=4, sampler=Sampler(max_rollouts=2))


def test_compare_recipe_parses_a_list_of_methods(tmp_path):
    from nabla.cli import build_parser

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        textwrap.dedent(
            """
            reward: {kind: self_judge}
            dataset: {name: svamp}
            limit: 40
            methods:
              - {name: greedy, max_new_tokens: 128}
              - {name: best_of_n, n: 4, max_new_tokens: 128}
              - name: nabla
                n: 4
                max_new_tokens: 128
                optimizer: {steps: 10}
            """
        )
    )
    parser, _ = build_parser("compare")
    config = parser.instantiate(parser.parse_args(["--config", str(recipe)]))
    methods = config["methods"]
    assert [m.display_label for m in methods] == ["greedy", "best_of_n@4", "nabla@4"]
    assert methods[2].optimizer.steps == 10 and methods[2].nabla_sampler().max_rollouts == 4
    assert config["limit"] == 40 and config["reward"].kind == "self_judge"
