"""The newcomer's path: the README's quick start runs as written (on tiny models behind ``default``), one set of
defaults everywhere, progress from the first token, a help that is fast and complete, readable reports, packaged
recipes, and a CI script that lints."""

from __future__ import annotations

import argparse
import ast
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import nabla.defaults
from nabla.acceleration import Acceleration
from nabla.cli import COMMANDS, build_parser, main
from nabla.config import PolicySpec, RewardSpec
from nabla.eval.methods import MethodSpec
from nabla.optimizer import LatentOptimizer
from nabla.sampler import Sampler

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
USER_GUIDE = ROOT / "docs" / "user_guide.md"
RECIPE = ROOT / "recipes" / "default.yaml"

pytestmark = pytest.mark.usefixtures("one_thread")


def quick_start() -> str:
    """The README's Python quick start: the first ``python`` block after the "Quick start" heading."""
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md has no python block under ## Quick start"
    return match.group(1)


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    """``$NABLA_HOME`` with a tiny model as the converted default policy, and a tiny LoRA adapter with a score
    head on it as the default reward model's adapter: ``default`` then resolves exactly as it does for real."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from nabla.tiny import tiny_causal_lm, tiny_tokenizer

    home = tmp_path_factory.mktemp("nabla_home")
    policy_dir = home / nabla.defaults.POLICY_FOLDER
    tokenizer = tiny_tokenizer()
    tiny_causal_lm(tokenizer, seed=0).save_pretrained(policy_dir)
    tokenizer.save_pretrained(policy_dir)
    classifier = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1)
    lora = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    adapter = home / "reward_adapter"
    get_peft_model(classifier, lora).save_pretrained(adapter)
    return home, adapter


@pytest.fixture
def tiny_defaults(tiny_home, monkeypatch):
    home, adapter = tiny_home
    monkeypatch.setenv("NABLA_HOME", str(home))
    monkeypatch.setattr(nabla.defaults, "REWARD_ADAPTER", adapter)
    return home


# ---------------------------------------------------------------------------------------------- 1. `default`
def test_the_readme_quick_start_runs_as_written(tiny_defaults, capsys):
    snippet = quick_start()
    assert 'Policy.from_pretrained("default")' in snippet and 'RewardModel.from_pretrained("default")' in snippet
    namespace: dict = {}
    exec(compile(snippet, "README.md quick start", "exec"), namespace)
    result, policy = namespace["result"], namespace["policy"]
    assert Path(policy.model.name_or_path) == tiny_defaults / nabla.defaults.POLICY_FOLDER
    assert result.stats["rollouts"] >= 1 and result.reward is not None
    printed = capsys.readouterr().out
    assert str(result.stats) in printed and result.text in printed


def test_default_is_a_model_name_everywhere(tiny_defaults):
    from nabla import Policy, RewardModel, SequenceClassifierReward

    folder = str(tiny_defaults / nabla.defaults.POLICY_FOLDER)
    assert PolicySpec().resolved_path() == folder
    assert nabla.defaults.resolve_reward("default") == (folder, str(nabla.defaults.REWARD_ADAPTER))
    assert nabla.defaults.resolve_reward("default", "mine") == (folder, "mine")
    assert nabla.defaults.resolve_reward("/models/rm", None) == ("/models/rm", None)
    policy = Policy.from_pretrained("default")
    reward = RewardModel.from_pretrained("default")
    direct = SequenceClassifierReward.from_pretrained("default")
    assert isinstance(reward, SequenceClassifierReward)
    scores = [r.score(["what is 2 plus 3 ?"], ["5"]) for r in (reward, direct)]
    assert float(scores[0][0]) == float(scores[1][0])  # the same adapter (and score head) both ways
    assert policy.encode("what is 2 plus 3 ?").numel() > 0


# ---------------------------------------------------------------------------------------------- 2. defaults
def _calls(snippet: str) -> dict[str, dict[str, object]]:
    """Literal keyword arguments of every call in ``snippet``, by the called name."""
    calls = {}
    for node in ast.walk(ast.parse(snippet)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            literal = {k.arg: ast.literal_eval(k.value) for k in node.keywords if isinstance(k.value, ast.Constant)}
            calls[node.func.id] = literal
    return calls


def _parse_recipe(path: Path, instantiate: bool = True):
    parser, _ = build_parser("fit")
    config = parser.parse_args(["--config", str(path)])
    config.pop("config", None)
    return parser, parser.instantiate(config) if instantiate else config


def test_the_readme_and_the_default_recipe_hold_the_library_defaults():
    calls = _calls(quick_start())
    for name, cls in (("LatentOptimizer", LatentOptimizer), ("Sampler", Sampler)):
        for key, value in calls[name].items():
            assert getattr(cls(), key) == value, f"README's {name}({key}={value!r}) is not the default"
    _, init = _parse_recipe(RECIPE)
    assert init.policy == PolicySpec() and init.reward == RewardSpec()
    assert init.optimizer == LatentOptimizer() and init.sampler == Sampler() and init.acceleration == Acceleration()
    assert MethodSpec().max_new_tokens == Sampler().max_new_tokens


@pytest.mark.parametrize(
    ("name", "ablated"),
    [
        ("ablation_likelihood_only", {"optimizer.reward_weight"}),
        ("ablation_no_rejection", {"sampler.rejection_sampling"}),
    ],
)
def test_the_ablations_change_one_setting_of_the_default_recipe(name, ablated):
    parser, default = _parse_recipe(RECIPE, instantiate=False)
    _, ablation = _parse_recipe(ROOT / "recipes" / f"{name}.yaml", instantiate=False)
    first, second = (_flatten(json.loads(parser.dump(config, format="json"))) for config in (default, ablation))
    assert {key for key in first if first[key] != second[key]} == ablated


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _printed_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def test_print_config_of_the_default_recipe_is_the_bare_command(capsys):
    recipe = yaml.safe_load(RECIPE.read_text())
    assert _printed_config(["--config", "default"], capsys) == _printed_config(["--prompt", recipe["prompt"]], capsys)


def test_the_user_guide_describes_the_recipe_and_the_output_as_they_are():
    from nabla.report import revisions_table

    guide = USER_GUIDE.read_text()
    recipe = yaml.safe_load(RECIPE.read_text())
    assert recipe["prompt"] in guide.replace("\\\\", "\\"), "the user guide does not quote the recipe's prompt"
    tokens = re.search(r"answers are at most (\d+) tokens", guide)
    rollouts = re.search(r"a budget of (\d+) rollouts", guide)
    assert tokens and int(tokens.group(1)) == Sampler().max_new_tokens
    assert rollouts and int(rollouts.group(1)) == Sampler().max_rollouts
    from nabla.trainer import FitResult

    empty = FitResult("p", "", [], None, "eos", {})
    for column in revisions_table(empty).columns:
        assert str(column.header) in guide, f"the user guide's revisions table lacks the column {column.header!r}"


# ---------------------------------------------------------------------------------------------- 3. progress
def _tiny_trainer(policy, reward, **kwargs):
    from nabla import TestTimeTrainer

    sampler = Sampler(max_new_tokens=12, max_rollouts=3)
    return TestTimeTrainer(policy, reward, LatentOptimizer(steps=3), sampler, **kwargs)


def test_progress_covers_the_first_rollout_and_leaves_the_tokens_alone(policy, reward):
    from nabla import Callback, ProgressBar

    class Events(Callback):
        def __init__(self):
            self.events = []

        def on_fit_start(self, trainer, state):
            self.events.append(("start", state.rollout))

        def on_generate(self, trainer, state, tokens):
            self.events.append(("token", tokens))

        def on_rollout(self, trainer, state, rollout):
            self.events.append(("rollout", len(rollout)))

    events = Events()
    watched = _tiny_trainer(policy, reward, callbacks=[events, ProgressBar(mode="lines", interval=60)])
    plain = _tiny_trainer(policy, reward, enable_progress_bar=False)
    assert watched.fit("what is 2 plus 3 ?", seed=4).token_ids == plain.fit("what is 2 plus 3 ?", seed=4).token_ids
    first_rollout = events.events.index(next(e for e in events.events if e[0] == "rollout"))
    assert events.events[0] == ("start", None)
    counts = [n for kind, n in events.events[1:first_rollout] if kind == "token"]
    assert counts == list(range(1, events.events[first_rollout][1] + 1))


def test_without_a_terminal_progress_is_plain_lines_on_stderr(policy, reward, capsys):
    from nabla import ProgressBar

    trainer = _tiny_trainer(policy, reward, enable_progress_bar=True)
    assert any(isinstance(c, ProgressBar) and c.mode == "lines" for c in trainer.callbacks)
    trainer.fit("what is 2 plus 3 ?", seed=1)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("∇-Reasoner: 0/12 tokens") and "rollout 1" in lines[0]
    assert lines[-1].startswith("∇-Reasoner: done in") and "rollouts" in lines[-1]
    assert not any("\r" in line or "\x1b" in line for line in lines)  # plain text, no bar redraws
    assert _tiny_trainer(policy, reward).callbacks == []  # library default: nothing off a terminal


def test_on_a_terminal_the_trainer_shows_a_bar_by_default(policy, reward, monkeypatch):
    from rich.console import Console

    from nabla import progress

    screen = io.StringIO()
    monkeypatch.setattr(progress, "_console", Console(file=screen, force_terminal=True, width=100))
    trainer = _tiny_trainer(policy, reward)
    trainer.fit("what is 2 plus 3 ?", seed=1)
    shown = screen.getvalue()
    assert "∇-Reasoner" in shown and "tokens" in shown and "rollout" in shown


def test_progress_false_silences_third_party_bars_and_restores_them():
    from transformers.utils import logging as hf_logging

    from nabla.progress import quiet, silenced

    before = hf_logging.is_progress_bar_enabled(), os.environ.get("TQDM_DISABLE")
    with silenced():
        assert quiet() and os.environ["TQDM_DISABLE"] == "1" and not hf_logging.is_progress_bar_enabled()
    assert (hf_logging.is_progress_bar_enabled(), os.environ.get("TQDM_DISABLE")) == before and not quiet()


def test_the_default_policy_conversion_reports_itself_and_mutes_its_bars(tmp_path, monkeypatch, capsys):
    from tqdm import tqdm

    from nabla import progress
    from nabla.tiny import tiny_causal_lm, tiny_tokenizer

    def fake_gguf(source):
        for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
            pass
        tokenizer = tiny_tokenizer()
        return tokenizer, tiny_causal_lm(tokenizer)

    monkeypatch.setattr(nabla.defaults, "gguf_path", lambda: tmp_path / "model.gguf")
    monkeypatch.setattr(nabla.defaults, "_load_gguf", fake_gguf)
    nabla.defaults.default_policy_dir(tmp_path / "a")
    err = capsys.readouterr().err
    assert "converting the default policy" in err and "converted the default policy in" in err
    assert "de-quantizing" not in err and "%|" not in err  # not a terminal: our two lines, no tqdm bar at all
    with progress.silenced():
        nabla.defaults.default_policy_dir(tmp_path / "b")
    assert capsys.readouterr().err == ""


def test_fit_with_progress_false_prints_nothing_on_stderr(saved_models, capsys):
    policy_dir, reward_dir = saved_models
    code = main(
        ["fit", "--prompt", "what is 2 plus 3 ?", "--policy.name_or_path", str(policy_dir)]
        + ["--reward.name_or_path", str(reward_dir), "--sampler.max_new_tokens", "6", "--sampler.max_rollouts", "2"]
        + ["--optimizer.steps", "2", "--progress", "false"]
    )
    captured = capsys.readouterr()
    assert code == 0 and captured.err == "" and "greedy" in captured.out


def test_evaluation_reports_progress_in_lines_or_not_at_all(saved_models, tmp_path, capsys):
    from nabla.eval.datasets import DatasetSpec, Problem
    from nabla.eval.runner import evaluate

    policy_dir, reward_dir = saved_models
    problems = [Problem(f"p{i}", f"what is {i} plus 1 ?", str(i + 1), "tiny") for i in range(2)]
    kwargs = {
        "policy": PolicySpec(str(policy_dir)),
        "reward": RewardSpec("classifier", str(reward_dir)),
        "dataset": DatasetSpec(prompt_template="{question}"),
        "method": MethodSpec("greedy", max_new_tokens=4),
        "problems": problems,
    }
    evaluate(output=str(tmp_path / "on"), progress=True, **kwargs)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("evaluating: 0/2 · loading the models") and lines[-1].startswith("evaluating: 2/2")
    evaluate(output=str(tmp_path / "off"), progress=False, **kwargs)
    assert capsys.readouterr().err == ""


def test_a_counter_without_a_terminal_prints_a_few_lines_not_one_per_item(capsys):
    from nabla.progress import Counter

    with Counter("caching", 500, done=100) as counter:
        for _ in range(400):
            counter.advance(note="busy")
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("caching: 100/500") and lines[-1].startswith("caching: 500/500 · busy")
    assert len(lines) == 2  # the first and the last: a background log stays readable
    with Counter("caching", 5, progress=False) as counter:
        counter.advance(5)
    assert capsys.readouterr().err == ""


def test_lightning_training_without_a_terminal_reports_in_plain_lines(tmp_path, capsys, caplog):
    import lightning as L
    import torch

    from nabla.progress import lightning_progress
    from nabla.rl.train import quiet_lightning

    quiet_lightning()

    class Regression(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            loss = self.layer(batch).pow(2).mean()
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    show_bar, callbacks = lightning_progress(True, "training the toy")
    assert show_bar is False and len(callbacks) == 1  # no terminal here: plain lines, not Lightning's bar
    data = torch.utils.data.DataLoader(torch.ones(6, 2), batch_size=2)
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=show_bar,
        callbacks=callbacks,
        default_root_dir=tmp_path,
    )
    trainer.fit(Regression(), data)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training the toy")]
    assert lines[0].startswith("training the toy: step 0/6 · epoch 1/2")
    assert lines[-1].startswith("training the toy: step 6/6 · epoch 2/2 · loss") and lines[-1].endswith("done")
    assert lightning_progress(False, "x") == (False, [])
    assert "litlogger" not in caplog.text and "GPU available" in caplog.text  # the advert dropped, notices kept


# ---------------------------------------------------------------------------------------------- 4. help
#: run in a fresh interpreter: every fast command's --help, then which heavy modules got imported, and by whom
HELP_PROBE = """
import builtins, sys
culprit = []
real_import = builtins.__import__

def spy(name, *args, **kwargs):
    if name.split(".")[0] == "torch" and "torch" not in sys.modules and not culprit:
        frame = sys._getframe(1)
        while frame is not None:  # jsonargparse running a module's `if typing.TYPE_CHECKING:` block, or an import
            if frame.f_code.co_name == "update_aliases":
                culprit.append("the typing.TYPE_CHECKING block of " + frame.f_locals["module"])
                break
            if frame.f_globals.get("__name__", "").startswith("nabla"):
                culprit.append(frame.f_globals["__name__"])
                break
            frame = frame.f_back
    return real_import(name, *args, **kwargs)

builtins.__import__ = spy
import json
from nabla.cli import COMMANDS, main
for command in COMMANDS:
    try:
        main([command, "--help"])
    except SystemExit:
        pass
assert main(["--help"]) == 0
heavy = sorted(m for m in ("torch", "transformers", "lightning") if m in sys.modules)
print(json.dumps({"imported": heavy, "by": culprit}))
"""


def test_help_builds_without_importing_torch():
    env = {**os.environ, "COLUMNS": "100"}
    done = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["imported"] == [], f"--help imported torch via {probe['by']} (use nabla._typing.TYPE_CHECKING there)"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_text(command):
    parser, _ = build_parser(command)
    options = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]
    missing = {a.option_strings[-1].rstrip("+") for a in options if not (a.help or "").strip()}
    assert not missing, f"undocumented options: {sorted(missing)}"
    description = parser.description or ""
    assert "Args:" not in description and description.strip()


def test_compare_help_lists_no_python_only_option(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    shown = capsys.readouterr().out
    assert "--methods" in shown and "--problems" not in shown


# ---------------------------------------------------------------------------------------------- 5. reports
def _summaries():
    from nabla.eval.metrics import MethodSummary

    def summary(label, name, n, accuracy, low, high, calls, proposals=0.0):
        samples = {1: accuracy, n: min(1.0, 1.5 * accuracy)} if n > 1 else {}
        return MethodSummary(
            label, name, n, 200, 200, 0, int(200 * accuracy), accuracy, low, high, -3.14159, samples, samples,
            {"model_calls": calls, "generated_tokens": calls * 0.9, "flops": calls * 2.7e8, "wall_time_s": calls / 7},
            {"proposals": proposals, "rejection_rate": 0.66},
        )  # fmt: skip

    return [
        summary("greedy", "greedy", 1, 0.49, 0.42, 0.56, 27),
        *(summary(f"self_consistency@{n}", "self_consistency", n, 0.38, 0.31, 0.45, 26 * n) for n in (2, 4, 8)),
        *(summary(f"best_of_n@{n}", "best_of_n", n, 0.3, 0.24, 0.37, 27 * n) for n in (2, 4, 8)),
        *(summary(f"nabla@{n}", "nabla", n, 0.4, 0.33, 0.47, 20 + 3.5 * n, proposals=9.0) for n in (2, 4, 8)),
        summary("nabla-likelihood-only", "nabla", 8, 0.0, 0.0, 0.02, 50, proposals=9.0),
    ]


def test_the_comparison_table_fits_100_columns():
    from rich.console import Console

    from nabla.eval.report import LEGEND, print_summaries, summary_rows

    console = Console(file=io.StringIO(), width=160, record=True)
    summaries = _summaries()
    print_summaries(summaries, title="svamp · 200 problems · seed 0", console=console)
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 100
    _, rows = summary_rows(summaries)
    for row in rows:  # every row on one line, every cell whole
        assert any(all(cell in line for cell in row) for line in lines), row
    assert LEGEND.split(";")[0] in " ".join(lines)


def test_the_comparison_plot_labels_overlap_nothing(tmp_path):
    from nabla.eval.report import draw_comparison, plot_comparison

    summaries = _summaries()
    figure = draw_comparison(summaries, title="tiny")
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    labels = [t for t in axes.texts if t.get_text() in {s.method for s in summaries}]
    assert len(labels) == len(summaries)
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    legend = axes.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(axes.get_window_extent(renderer))  # beside the plot, covering nothing
    assert axes.get_ylim()[0] < 0  # a marker at 0% is drawn whole
    low, high = axes.get_xlim()
    shown = [t for t in axes.get_xticklabels() if low <= t.get_position()[0] <= high]
    assert len(shown) >= 3 and all(t.get_text() for t in shown)  # readable log ticks, not just two decades
    assert plot_comparison(summaries, tmp_path / "plot.png").stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------- 6. packaging
def test_recipes_are_packaged_and_found_by_name(capsys):
    from nabla.recipebook import RECIPES, find_recipe, recipe_names, resolve_config_args

    assert (ROOT / "recipes").resolve() == RECIPES  # one copy: the top-level folder is the packaged one
    assert {"default", "default_reward", "paper_math500", "arithmetic/default"} <= set(recipe_names())
    assert resolve_config_args(["--config", "default"]) == ["--config", str(find_recipe("default"))]
    assert resolve_config_args(["--config=paper_fit.yaml"]) == [f"--config={find_recipe('paper_fit')}"]
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert "default" in listed and "train-reward" in listed
    assert main(["recipes", "--show", "default"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(RECIPE.read_text())
    package_data = re.search(
        r"\[tool\.setuptools\.package-data\]\nnabla = \[(.*?)\]", (ROOT / "pyproject.toml").read_text()
    )
    assert package_data and '"recipes/**/*.yaml"' in package_data.group(1)


def test_ci_runs_the_readme_test_command_and_ruff():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = README.read_text()
    command = re.search(r"Install and run the tests:\n\n```bash\n(.*?)\n```", readme, re.S).group(1)
    assert command in ci
    assert "ruff check ." in ci and "ruff format --check ." in ci


def test_warnings_are_filtered_with_a_reason():
    text = (ROOT / "pyproject.toml").read_text()
    lines = [line.strip() for line in text.split("filterwarnings = [", 1)[1].split("\n]", 1)[0].splitlines()]
    entries = [(i, line) for i, line in enumerate(lines) if line[:1] in "\"'" and line]
    assert entries, "no warning filters found"
    for i, line in entries:  # the reason on the same line or on the comment line just above
        assert "#" in line or (i > 0 and lines[i - 1].startswith("#")), f"{line} needs a comment giving its reason"
