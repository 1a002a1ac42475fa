"""Every top-level recipe parses with the parser of its subcommand and instantiates its dataclasses; the default
recipe mirrors the library's defaults; the paper recipes hold the paper's settings; the default recipe runs end to
end (slow, opt-in)."""

from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

import pytest

from nabla.cli import COMMANDS, build_parser, main
from nabla.config import PolicySpec, RewardSpec
from nabla.optimizer import LatentOptimizer
from nabla.sampler import Sampler

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TOP_LEVEL = sorted(RECIPES.glob("*.yaml"))
EVERY_RECIPE = TOP_LEVEL + sorted(RECIPES.glob("*/*.yaml"))  # recipes/arithmetic/ too


def command_of(recipe: Path) -> str:
    """The subcommand a recipe is for, from its ``Run:  nabla <command> --config`` line (else the first such
    command it names: a recipe may name the one that makes its inputs first)."""
    text = recipe.read_text()
    match = re.search(r"Run:\s+nabla ([a-z-]+) --config", text) or re.search(r"nabla ([a-z-]+) --config", text)
    assert match, f"{recipe.name} does not say which command runs it (`nabla <command> --config ...`)"
    return match.group(1)


def load(recipe: Path):
    parser, _ = build_parser(command_of(recipe))
    config = parser.parse_args(["--config", str(recipe)])
    config.pop("config", None)
    return parser.instantiate(config)


def test_the_expected_recipes_are_there():
    names = {path.stem for path in TOP_LEVEL}
    expected = {"default", "default_reward", "paper_math500", "paper_aime", "paper_amc", "paper_fit"}
    assert expected | {"ablation_likelihood_only", "ablation_no_rejection", "ablations"} <= names


@pytest.mark.parametrize("recipe", EVERY_RECIPE, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_parses_and_instantiates(recipe):
    assert command_of(recipe) in COMMANDS
    init = load(recipe)
    if command_of(recipe) == "arithmetic":  # trains its own models: its policy and reward groups are training settings
        return
    if "policy" in init:
        assert isinstance(init.policy, PolicySpec)
    if "reward" in init:
        assert isinstance(init.reward, RewardSpec)


def test_the_default_recipe_mirrors_the_library_defaults():
    init = load(RECIPES / "default.yaml")
    assert init.policy.name_or_path == "default"
    assert init.optimizer == LatentOptimizer()
    default_sampler = Sampler()
    for field in fields(Sampler):
        if field.name != "max_new_tokens":  # the recipe keeps answers short for a quick first run
            assert getattr(init.sampler, field.name) == getattr(default_sampler, field.name), field.name


@pytest.mark.parametrize(("name", "grad_norm"), [("paper_math500", 4.0), ("paper_aime", 8.0), ("paper_amc", 4.0)])
def test_paper_recipes_hold_the_paper_settings(name, grad_norm):
    init = load(RECIPES / f"{name}.yaml")
    assert init.policy.name_or_path == "Qwen/Qwen2.5-7B-Instruct"
    assert init.reward.name_or_path == "Skywork/Skywork-Reward-V2-Qwen3-4B"
    assert (init.policy.dtype, init.policy.device, init.reward.dtype) == ("bfloat16", "cuda", "bfloat16")
    method = init.method
    assert method.name == "nabla" and method.n == 8
    assert method.sampler.selection.min_grad_norm == grad_norm
    assert (method.optimizer.steps, method.optimizer.lr, method.optimizer.likelihood_weight) == (20, 0.01, 1e-3)
    assert (method.sampling.temperature, method.sampler.resample.temperature) == (0.6, 0.5)


def test_ablations_change_one_setting_each():
    likelihood = load(RECIPES / "ablation_likelihood_only.yaml")
    no_rejection = load(RECIPES / "ablation_no_rejection.yaml")
    assert likelihood.optimizer.reward_weight == 0.0 and likelihood.sampler.rejection_sampling
    assert no_rejection.optimizer.reward_weight == 1.0 and not no_rejection.sampler.rejection_sampling
    labels = [m.display_label for m in load(RECIPES / "ablations.yaml").methods]
    assert labels == ["best_of_n@4", "nabla", "nabla-likelihood-only", "nabla-no-rejection"]


def test_the_reward_recipe_trains_only_on_training_splits():
    init = load(RECIPES / "default_reward.yaml")
    training_sources = ("mawps/", "generated/onestep")  # MAWPS and the procedural one-step set: no evaluation set
    assert all(source.startswith(training_sources) or source.endswith("/train") for source in init.data.datasets)
    assert init.data.exclude_evaluation_overlap
    assert init.export == "nabla/defaults/reward_adapter"


@pytest.mark.slow
def test_the_default_recipe_runs_end_to_end(tmp_path, capsys):
    output = tmp_path / "result.json"
    code = main(["fit", "--config", str(RECIPES / "default.yaml"), "--output", str(output), "--progress", "false"])
    assert code == 0
    result = json.loads(output.read_text())
    assert result["text"].strip() and result["stats"]["rollouts"] >= 1
    assert result["reward"] is not None
    printed = capsys.readouterr().out
    assert "answer" in printed and "model calls: total" in printed
