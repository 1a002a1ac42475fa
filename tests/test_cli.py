"""The ``nabla`` command line: a fit on tiny models (answer, revisions, costs, JSON), option overrides and
``--print_config``, and every error path ending in one line on stderr and exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml

from nabla.cli import main


@pytest.fixture()
def tiny_fit_args(saved_models):
    policy_dir, reward_dir = saved_models
    return [
        "fit",
        "--prompt", "what is 2 plus 3 ?",
        "--policy.name_or_path", str(policy_dir),
        "--reward.kind", "classifier",
        "--reward.name_or_path", str(reward_dir),
        "--sampler.max_new_tokens", "8",
        "--sampler.max_rollouts", "3",
        "--sampler.selection.max_confidence", "1.0",
        "--sampler.selection.min_entropy", "0.0",
        "--optimizer.steps", "3",
        "--progress", "false",
    ]  # fmt: skip


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_fit_prints_the_answer_revisions_and_costs_and_writes_json(tiny_fit_args, tmp_path, capsys):
    output = tmp_path / "out" / "result.json"
    assert main([*tiny_fit_args, "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "answer" in printed and "reward:" in printed and "model calls: total" in printed
    assert "rejection rate" in printed
    result = json.loads(output.read_text())
    assert set(result) >= {"prompt", "text", "token_ids", "reward", "stats", "revisions", "dto_runs", "settings"}
    assert result["stats"]["rollouts"] >= 1 and result["settings"]["optimizer"]["steps"] == 3
    assert len(result["dto_runs"]) >= 1
    greedy = result["greedy"]  # the policy's own greedy answer beside ∇-Reasoner's, its cost apart
    assert set(greedy) >= {"text", "final_answer", "reward", "finish_reason", "stats"} and greedy["reward"] is not None
    assert greedy["stats"]["rollouts"] == 1 and greedy["stats"]["generated_tokens"] == len(greedy["token_ids"])
    assert "greedy answer (the policy alone" in printed and "greedy (policy alone)" in printed


def _print_config(args: list[str]) -> None:
    with pytest.raises(SystemExit) as stop:  # jsonargparse prints the config and exits 0
        main(args)
    assert stop.value.code in (0, None)


def test_print_config_round_trips_with_overrides(tiny_fit_args, tmp_path, capsys):
    _print_config([*tiny_fit_args, "--optimizer.lr", "0.05", "--print_config"])
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["optimizer"]["lr"] == 0.05 and config["sampler"]["max_new_tokens"] == 8
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(printed)
    _print_config(["fit", "--config", str(recipe), "--optimizer.steps", "2", "--print_config"])
    again = yaml.safe_load(capsys.readouterr().out)
    assert again["optimizer"]["steps"] == 2 and again["optimizer"]["lr"] == 0.05


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--optimizer.stepz", "3"], "stepz"),  # unknown option
        (["--optimizer.steps", "many"], "steps"),  # wrong type
        (["--optimizer.steps", "0"], "steps must be"),  # out of range
        (["--sampler.rollout.top_p", "1.5"], "top_p"),
        (["--reward.kind", "oracle"], "kind"),
        (["--prompt", "   "], "prompt is empty"),
        (["--policy.name_or_path", "/no/such/model"], "no model folder"),
        (["--reward.name_or_path", "./missing-reward"], "no model folder"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(tiny_fit_args, capsys, extra, words):
    assert main([*tiny_fit_args, *extra]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("nabla fit: error:") and words in line


def test_unknown_command_and_no_command(capsys):
    assert main(["fitt"]) == 2
    assert "unknown command 'fitt'" in _one_error_line(capsys)
    assert main([]) == 2
    assert "train-reward" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--data.datasets", "[svamp/test]"], "evaluation set"),
        (["--data.datasets", "[mawps]"], "needs a split"),
        (["--stages", "[sample,fly]"], "stages"),
        (["--lora.rank", "0"], "lora.rank"),
        (["--training.loss", "hinge"], "loss"),
    ],
)
def test_train_reward_refuses_bad_settings_in_one_line(tmp_path, capsys, extra, words):
    code = main(["train-reward", "--work_dir", str(tmp_path / "run"), "--progress", "false", *extra])
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith("nabla train-reward: error:") and words in line
    assert not (tmp_path / "run").exists()


def test_train_reward_without_samples_says_what_to_run(tmp_path, capsys):
    assert main(["train-reward", "--work_dir", str(tmp_path), "--stages", "[grade]", "--progress", "false"]) == 2
    assert "run the sample stage first" in _one_error_line(capsys)
