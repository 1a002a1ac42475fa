"""The arithmetic world: task, grading, tokenizer, and a CI-sized version of the whole recipe (tiny models trained in
seconds with fixed seeds) checking real properties of the trained models and of the ∇-Reasoner loop."""

from __future__ import annotations

import json

import pytest
import torch

from nabla import (
    LatentOptimizer,
    Policy,
    RewardModel,
    Sampler,
    SamplingConfig,
    SequenceClassifierReward,
    TestTimeTrainer,
)
from nabla.errors import ConfigurationError, DataError
from nabla.eval import grading
from nabla.worlds.arithmetic.task import (
    ArithmeticTask,
    Splits,
    SplitSizes,
    extract_answer,
    generate,
    is_correct,
    make_problem,
    read_jsonl,
    write_jsonl,
)
from nabla.worlds.arithmetic.tokenizer import arithmetic_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- task and grading
def test_problems_are_seeded_solved_left_to_right_and_graded_exactly():
    task = ArithmeticTask()
    problems = generate(task, 50, seed=3)
    assert problems == generate(task, 50, seed=3) and problems != generate(task, 50, seed=4)
    for p in problems:
        terms = p.question.removesuffix("=?")
        assert p.answer == eval(terms)  # the expression itself, evaluated by Python
        assert 3 <= terms.count("+") + terms.count("-") - terms.startswith("-") + 1 <= 5
        assert is_correct(p.solution, p.answer) and extract_answer(p.solution) == p.answer
    example = make_problem([47, 23, 15, 62], ["+", "+", "-", "+"])
    assert example.question == "47+23-15+62=?"
    assert example.solution == "47+23=70;70-15=55;55+62=117;\\boxed{117}"
    assert not is_correct("47+23=70;\\boxed{116}", 117)
    assert extract_answer("\\boxed{1}\\boxed{-12}") == -12 and extract_answer("no box 117") is None
    assert extract_answer("\\boxed{1.5}") is None


def test_difficulty_settings_are_respected():
    task = ArithmeticTask(min_terms=2, max_terms=2, min_value=1, max_value=9, allow_negative=False)
    for p in generate(task, 40, seed=0):
        assert len(p.solution.split(";")) == 2 and p.answer >= 0
    with pytest.raises(ConfigurationError, match="min_terms"):
        ArithmeticTask(min_terms=4, max_terms=3)
    with pytest.raises(ConfigurationError, match="distinct problems"):
        generate(ArithmeticTask(min_terms=2, max_terms=2, min_value=1, max_value=2, subtraction_rate=0.0), 10, 0)


def test_held_out_splits_are_disjoint_and_training_never_sees_them():
    task = ArithmeticTask()
    splits = Splits.build(task, seed=0, sizes=SplitSizes(test=100, dev=50, reward_train=200, reward_val=50))
    parts = [splits.test, splits.dev, splits.reward_train, splits.reward_val]
    questions = [p.question for part in parts for p in part]
    assert len(questions) == len(set(questions)) == 400
    training = generate(task, 3000, seed=0, exclude=splits.held_out())
    assert not {p.question for p in training} & splits.held_out()


def test_exact_grading_agrees_with_the_harness_grader(tmp_path):
    problems = generate(ArithmeticTask(), 30, seed=1)
    for p in problems:
        for response, _ in [(p.solution, True), (p.solution.replace(f"{{{p.answer}}}", f"{{{p.answer + 1}}}"), False)]:
            assert grading.is_correct(str(p.answer), response) == is_correct(response, p.answer)
    path = write_jsonl(problems, tmp_path / "p.jsonl")
    assert read_jsonl(path) == problems
    from nabla.eval.datasets import load_jsonl

    loaded = load_jsonl(path, id_field="id")
    assert [(q.id, q.question, q.answer) for q in loaded] == [(p.id, p.question, str(p.answer)) for p in problems]
    (tmp_path / "bad.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        read_jsonl(tmp_path / "bad.jsonl")


def test_tokenizer_round_trips_and_loads_like_a_downloaded_one(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = arithmetic_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for p in generate(ArithmeticTask(), 20, seed=2):
        text = p.question + "\n" + p.solution
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.unk_token_id not in ids
        assert loaded.decode(ids) == text
        assert len(ids) == len(text) - len("\\boxed{") + 1  # one token per character, \boxed{ is one
    assert loaded.eos_token == "</s>" and loaded.pad_token == "<pad>"
    assert loaded.decode([loaded.eos_token_id, loaded.pad_token_id], skip_special_tokens=True) == ""


# ---------------------------------------------------------------------- the recipe in miniature
TINY_TASK = ArithmeticTask(min_terms=2, max_terms=3, min_value=1, max_value=5)
TINY_SIZE = dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=96, max_positions=64)


def _tiny_policy_training(steps: int = 250):
    from nabla.worlds.arithmetic.models import ModelSize
    from nabla.worlds.arithmetic.pipeline import PolicyTraining

    return PolicyTraining(size=ModelSize(**TINY_SIZE), steps=steps, batch_size=32, lr=1e-2, val_every=steps)


JUDGE_SAMPLING = SamplingConfig(temperature=1.0, top_p=None)


def _tiny_reward_training(**overrides):
    from nabla.worlds.arithmetic.pipeline import ProcessData, RewardTraining

    # The tiny world's PRM starts from its policy: from scratch at this size, 300 steps order only ~0.55 of the
    # validation pairs (the full-size world's default, scratch, is trained 1,000 steps). 500 steps, not 300: at 300
    # the validation pairs ordered swing with the CPU's float rounding (0.82 on one machine, 0.65 on another); at
    # 500 they are 0.89, 0.94, 0.86, 0.89 for world seeds 0-3.
    settings = dict(process=ProcessData(problems=1500), steps=500, batch_size=64, lr=1e-2, init="policy")
    return RewardTraining(**{**settings, **overrides})


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A world trained in seconds: policy, process reward model, and their training records."""
    from nabla.worlds.arithmetic.pipeline import SplitSizes, World, train_policy
    from nabla.worlds.arithmetic.verifier import train_reward

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    sizes = SplitSizes(test=10, dev=40, reward_train=100, reward_val=40)
    world = World.prepare(tmp_path_factory.mktemp("arithmetic"), TINY_TASK, sizes, seed=0)
    policy_record = train_policy(world, _tiny_policy_training(), progress=False)
    reward_settings = _tiny_reward_training()
    reward_record = train_reward(world, reward_settings, policy_record, JUDGE_SAMPLING, progress=False)
    torch.set_num_threads(threads)
    return world, policy_record, reward_record, reward_settings


def test_trained_models_load_like_downloaded_ones_and_the_policy_is_competent_but_fallible(tiny_world):
    from nabla.prm import LikelihoodProcessReward

    world, policy_record, reward_record, _ = tiny_world
    policy = Policy.from_pretrained(str(world.policy_dir))
    reward = RewardModel.from_pretrained(str(world.reward_dir))
    assert type(policy.model).__name__ == "LlamaForCausalLM" and not policy.use_chat_template
    assert isinstance(reward, LikelihoodProcessReward) and type(reward.model).__name__ == "LlamaForCausalLM"
    assert (reward.step_separator, reward.aggregation) == (";", "last")
    assert reward.tokenizer.get_vocab() == policy.tokenizer.get_vocab()
    metrics = policy_record["metrics"]
    # learned the task (a guess is right ~3% of the time), still makes mistakes: 0.25 with world seed 0, 0.15-0.48
    # over seeds 0-3 (40 dev problems)
    assert 0.1 <= metrics["dev_greedy_accuracy"] <= 0.95
    assert reward_record["kind"] == "likelihood" and reward_record["metrics"]["train_rows"] > 4000


def _samples(world, name: str, split: str):
    from nabla.worlds.arithmetic.training import Sample

    rows = [json.loads(line) for line in (world.folder / name).read_text().splitlines()]
    return [
        Sample(r["problem_id"], r["prompt"], r["response"], r["token_ids"], r["correct"])
        for r in rows
        if r["split"] == split
    ]


def test_process_reward_model_orders_right_above_wrong_answers_to_the_same_problem(tiny_world):
    """On held-out problems (never trained on) it orders far more same-problem (right, wrong) pairs right than
    chance (0.89 of 93 pairs with these seeds); the recorded figures are those the saved samples give again."""
    from nabla.worlds.arithmetic.verifier import judge

    world, _, reward_record, _ = tiny_world
    metrics = reward_record["metrics"]
    assert metrics["val_pairs"] >= 50 and metrics["val_pairwise_accuracy"] > 0.7
    for key in ("test_pairwise_accuracy", "test_auc", "best_of_8_lift", "best_of_8_lift_ci95", "test_pass_at_n"):
        assert key in metrics
    assert set(metrics["val_by_aggregation"]) == {"last", "min", "prod", "mean"}
    policy = Policy.from_pretrained(str(world.policy_dir))
    again = judge(world.reward_dir, policy, _samples(world, "reward_samples.jsonl", "reward_val"), n=4)
    assert again["pairwise_accuracy"] == pytest.approx(metrics["val_pairwise_accuracy"])
    assert again["auc"] == pytest.approx(metrics["val_auc"])


def test_reward_training_targets_are_the_probabilities_scoring_reads(tiny_world):
    """The supervised loss of a row is the negative log-probability the PRM reads from the same tokens: the last
    step of a gold solution scores exactly the answer-and-end targets the training row holds."""
    from nabla.worlds.arithmetic.training import MaskedRowsDataModule, OptimSettings, PolicyModule
    from nabla.worlds.arithmetic.verifier import likelihood_rows, sample_items

    world, *_ = tiny_world
    policy = Policy.from_pretrained(str(world.policy_dir))
    reward = RewardModel.from_pretrained(str(world.reward_dir))
    reward.bind(policy)
    problem = world.splits.reward_val[0]
    gold_ids = policy.tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [
        policy.tokenizer.eos_token_id
    ]
    from nabla.worlds.arithmetic.training import Sample

    item = sample_items([Sample(problem.id, problem.question, problem.solution, gold_ids, True)], {problem.id: problem})
    (ids, targets) = likelihood_rows(item, reward, policy.tokenizer, direct=False)[0]
    assert ids == reward.input_ids(problem.question, problem.solution, gold_ids).tolist()
    assert all(t == i for t, i in zip(targets, ids) if t != -100) and targets.count(-100) == len(problem.question) + 1
    batch = MaskedRowsDataModule([(ids, targets)], [], policy.tokenizer.pad_token_id, 1, 0).collate([(ids, targets)])
    module = PolicyModule(reward.model, OptimSettings()).eval()
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"]).logits[0, :-1]
    per_token = torch.log_softmax(logits.double(), -1).gather(-1, batch["input_ids"][0, 1:, None])[:, 0]
    box = (
        len(problem.solution) - problem.solution.rindex(";") - len("\\boxed{") + 1
    )  # box tokens + EOS after the last ;
    last_step = per_token[-box:].sum()
    steps = reward.step_scores([problem.question], [problem.solution], [gold_ids])[0]
    assert float(steps[-1]) == pytest.approx(float(last_step - torch.log(-torch.expm1(last_step))), abs=1e-3)


def test_trained_models_are_reused_and_other_settings_are_refused(tiny_world):
    import time

    from nabla.worlds.arithmetic.pipeline import train_policy
    from nabla.worlds.arithmetic.verifier import train_reward

    world, policy_record, reward_record, reward_settings = tiny_world
    started = time.perf_counter()
    assert train_policy(world, _tiny_policy_training(), progress=False) == policy_record
    assert train_reward(world, reward_settings, policy_record, JUDGE_SAMPLING, progress=False) == reward_record
    assert time.perf_counter() - started < 2.0
    with pytest.raises(DataError, match="other settings"):
        train_policy(world, _tiny_policy_training(steps=251), progress=False)
    with pytest.raises(DataError, match="other settings"):
        train_reward(world, _tiny_reward_training(steps=501), policy_record, JUDGE_SAMPLING, progress=False)


@pytest.mark.parametrize(("kind", "init"), [("classifier", "policy"), ("outcome", "policy"), ("likelihood", "scratch")])
def test_the_other_reward_kinds_train_and_are_judged_the_same_way(tiny_world, tmp_path, kind, init):
    import shutil

    from nabla.prm import ProcessRewardModel
    from nabla.worlds.arithmetic.models import ModelSize
    from nabla.worlds.arithmetic.pipeline import World
    from nabla.worlds.arithmetic.verifier import train_reward

    world, policy_record, *_ = tiny_world
    other = World.prepare(
        tmp_path / "world", world.task, SplitSizes(test=10, dev=40, reward_train=100, reward_val=40), 0
    )
    shutil.copytree(world.policy_dir, other.policy_dir)
    scratch_size = ModelSize(**{**TINY_SIZE, "hidden_size": 48})
    settings = _tiny_reward_training(kind=kind, steps=10, epochs=1, init=init, size=scratch_size)
    record = train_reward(other, settings, policy_record, JUDGE_SAMPLING, progress=False)
    loaded = RewardModel.from_pretrained(str(other.reward_dir))
    assert isinstance(loaded, ProcessRewardModel) == (kind == "classifier")
    assert loaded.model.config.hidden_size == (48 if init == "scratch" else TINY_SIZE["hidden_size"])
    assert record["kind"] == kind and 0.0 <= record["metrics"]["test_pairwise_accuracy"] <= 1.0


def test_policy_training_is_deterministic_for_a_seed(tmp_path):
    from nabla.worlds.arithmetic.pipeline import SplitSizes, World, train_policy

    weights = []
    for name in ("a", "b"):
        world = World.prepare(tmp_path / name, TINY_TASK, SplitSizes(test=5, dev=5, reward_train=5, reward_val=5), 0)
        train_policy(world, _tiny_policy_training(steps=8), progress=False)
        weights.append(Policy.from_pretrained(str(world.policy_dir)).model.state_dict())
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


def test_nabla_reasoner_accepted_revisions_raise_the_trained_reward(tiny_world):
    world, *_ = tiny_world
    policy = Policy.from_pretrained(str(world.policy_dir))
    reward = RewardModel.from_pretrained(str(world.reward_dir))
    sampling = SamplingConfig(temperature=0.6, top_p=0.95)
    budget = world.max_new_tokens
    nabla = TestTimeTrainer(
        policy,
        reward,
        LatentOptimizer(steps=10, lr=0.1),
        Sampler(rollout=sampling, max_rollouts=6, max_new_tokens=budget),
    )
    plain = TestTimeTrainer(
        policy, reward, LatentOptimizer(), Sampler(rollout=sampling, max_rollouts=1, max_new_tokens=budget)
    )
    accepted = 0
    for seed, problem in enumerate(world.splits.dev[:12]):
        result = nabla.fit(problem.question, seed=seed)
        first = plain.fit(problem.question, seed=seed)  # the same first rollout, never revised
        for revision in result.revisions:
            assert revision.accepted == (revision.proposal_reward > revision.current_reward)
        accepted += sum(bool(r.accepted) for r in result.revisions)
        assert result.reward >= first.reward
        rescored = float(reward.score([problem.question], [result.text], [result.token_ids])[0])
        assert result.reward == pytest.approx(rescored, abs=1e-4)
    assert accepted > 0


def test_reward_options_are_checked_and_chain_labels_need_every_step_right(tiny_world):
    from nabla.worlds.arithmetic.models import reward_from_policy
    from nabla.worlds.arithmetic.pipeline import ProcessData, RewardTraining
    from nabla.worlds.arithmetic.training import RewardExamples
    from nabla.worlds.arithmetic.verifier import _gold_ids

    with pytest.raises(ConfigurationError, match="label"):
        RewardTraining(label="steps")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="pretrain_steps"):
        RewardTraining(pretrain_steps=-1)
    with pytest.raises(ConfigurationError, match=r"reward\.kind"):
        RewardTraining(kind="judge")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"reward\.aggregation"):
        RewardTraining(aggregation="median")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"unknown reward\.process\.kinds"):
        ProcessData(kinds=["typo"])
    world, *_ = tiny_world
    policy = Policy.from_pretrained(str(world.policy_dir))
    samples = _samples(world, "reward_samples.jsonl", "reward_train") + _samples(
        world, "reward_samples.jsonl", "reward_val"
    )
    gold = _gold_ids(policy.tokenizer, world.splits.reward_train + world.splits.reward_val)
    formatter = SequenceClassifierReward(reward_from_policy(world.policy_dir, 1), policy.tokenizer)
    formatter.bind(policy)
    chain = RewardExamples(samples, formatter, gold, label="chain")
    outcome = RewardExamples(samples, formatter, gold)
    solutions = {p.id: p.solution for p in world.splits.reward_train + world.splits.reward_val}
    by_problem = {}
    for s in samples:
        by_problem.setdefault(s.problem_id, []).append(s)
    expected = [s.correct and s.response == solutions[s.problem_id] for group in by_problem.values() for s in group]
    assert [bool(row[1]) for row in chain.rows] == expected
    assert [bool(row[1]) for row in outcome.rows] == [s.correct for group in by_problem.values() for s in group]
    assert all(row[2][-1] == row[1] for row in chain.rows)  # the last token carries the row's label
    with pytest.raises(ValueError, match="chain"):
        RewardExamples(samples, formatter, None, label="chain")


def test_reward_body_is_the_policy_trained_further_and_is_reused(tiny_world):
    import time

    from nabla.worlds.arithmetic.pipeline import RewardTraining, train_reward_body

    world, policy_record, *_ = tiny_world
    settings = RewardTraining(pretrain_steps=5, pretrain_batch_size=8)
    folder = train_reward_body(world, settings, policy_record, progress=False)
    policy = Policy.from_pretrained(str(world.policy_dir)).model.state_dict()
    body = Policy.from_pretrained(str(folder)).model.state_dict()
    assert policy.keys() == body.keys() and any(not torch.equal(policy[k], body[k]) for k in policy)
    started = time.perf_counter()
    assert train_reward_body(world, settings, policy_record, progress=False) == folder
    assert time.perf_counter() - started < 1.0


def test_comparison_extra_methods_are_parsed_checked_and_run_at_their_own_budget():
    from nabla.worlds.arithmetic.pipeline import Comparison, comparison_methods

    comparison = Comparison(budgets=[1, 8], baselines=["best_of_n"], extra_methods=["nabla_metropolis@8", "mcmc@4"])
    methods = comparison_methods(comparison, max_new_tokens=32)
    labels = [m.display_label for m in methods]
    assert labels[-2:] == ["nabla_metropolis@8", "mcmc@4"]
    assert methods[-2].nabla_sampler().acceptance == "metropolis" and methods[-1].mcmc_settings().steps == 4
    sweep = comparison_methods(comparison, 32, budgets=[8], suffix=" T=1")  # extras only in the main comparison
    assert not any(m.name in ("mcmc", "nabla_metropolis") for m in sweep)
    for bad in ("mcmc", "mcmc@0", "greedy@8"):
        with pytest.raises(ConfigurationError, match="extra_methods"):
            Comparison(extra_methods=[bad])
