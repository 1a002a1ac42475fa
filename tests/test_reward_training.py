"""The reward-model recipe on tiny models: sampling (resumable, batch-independent), grading, training (the loss
falls), the exported adapter (reloads and scores as the trained module does), held-out metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nabla import DataError, SequenceClassifierReward, defaults
from nabla.config import PolicySpec, RewardSpec
from nabla.eval.datasets import Problem
from nabla.rewardtrain.data import collate_groups, grade_record
from nabla.rewardtrain.evaluation import HELDOUT_SCORES_FILE, read_heldout_scores, selection_metrics
from nabla.rewardtrain.module import fit_reward_model, pairwise_loss, warmup_cosine
from nabla.rewardtrain.pipeline import train_reward
from nabla.rewardtrain.sampling import (
    GREEDY_FILE,
    SAMPLES_FILE,
    SampleSettings,
    check_meta,
    is_heldout,
    parse_source,
    read_jsonl,
    sample_greedy,
    sample_problems,
    sampling_meta,
    select_problems,
)
from nabla.rewardtrain.settings import LoraSettings, TrainSettings

PROMPT = "what is 2 plus 3 ?"
RIGHT = ["so we get 5", "the answer is 5", "2 plus 3 is 5", "we get \\boxed{ 5 }"]
WRONG = ["so we get 6", "the answer is 7", "2 plus 3 is 4", "we get \\boxed{ 9 }"]


def _fake_graded(tokenizer, problems: int = 10) -> list[dict]:
    """Problems whose correct responses say 5 and wrong ones another number; every third one held out."""
    records = []
    for index in range(problems):
        texts = [(t, True) for t in RIGHT[: 1 + index % 2]] + [(t, False) for t in WRONG[: 2 + index % 3]]
        responses = [
            {
                "token_ids": tokenizer(text, add_special_tokens=False)["input_ids"],
                "text": text,
                "finish_reason": "eos",
                "correct": correct,
            }
            for text, correct in texts
        ]
        records.append(
            {
                "id": f"toy/{index}",
                "source": "toy",
                "prompt": PROMPT,
                "answer": "5",
                "heldout": index % 3 == 0,
                "responses": responses,
            }
        )
    return records


def _write_graded(folder, records) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "graded.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


FAST = TrainSettings(lr=1e-2, epochs=4, problems_per_batch=1, gradient_clip=None)
SMALL_LORA = LoraSettings(rank=4, alpha=8.0, dropout=0.0)
TOP_LAYER_LORA = LoraSettings(rank=4, alpha=8.0, dropout=0.0, layers=[1])  # layer 0 frozen: its output is cached


@pytest.fixture(scope="module")
def trained(tmp_path_factory, saved_models, tokenizer):
    folder = tmp_path_factory.mktemp("reward_run")
    _write_graded(folder, _fake_graded(tokenizer))
    _, reward_dir = saved_models
    module, data, summary = fit_reward_model(folder, str(reward_dir), TOP_LAYER_LORA, FAST, seed=0, progress=False)
    module.save_adapter(folder / "adapter", "tiny")
    return folder, module, data, summary


def test_training_lowers_the_loss_and_learns_the_label(trained):
    _, _, _, summary = trained
    history = summary["history"]
    assert len(history) == FAST.epochs
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert history[-1]["val_auc"] > 0.9
    assert summary["trainable_parameters"] > 0


def test_only_the_adapter_and_the_score_head_train(trained):
    _, module, _, _ = trained
    names = [name for name, p in module.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "score" in n for n in names)
    assert any("score" in n for n in names)


def test_exported_adapter_reloads_and_scores_like_the_trained_module(trained, saved_models, policy):
    """The module trained on cached lower-layer outputs, the full forward and the reloaded adapter agree."""
    folder, module, data, _ = trained
    assert module.first_layer == 1 and all(e.features is not None for g in data.val_groups for e in g)
    _, reward_dir = saved_models
    assert {p.name for p in (folder / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    reward = SequenceClassifierReward.from_pretrained(str(reward_dir), adapter=str(folder / "adapter"))
    reward.bind(policy)
    records = read_jsonl(folder / "graded.jsonl")
    module.eval()
    batch = collate_groups(data.val_groups, data.pad_id)
    with torch.no_grad():
        trained_scores = module(batch["input_ids"], batch["attention_mask"], batch["features"])
        full_forward = module(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(full_forward, trained_scores, rtol=1e-5, atol=1e-5)
    heldout = [r for r in records if r["heldout"]]
    responses = [resp for r in heldout for resp in r["responses"]]
    reloaded = reward.score(
        [PROMPT] * len(responses), [r["text"] for r in responses], [r["token_ids"] for r in responses]
    )
    torch.testing.assert_close(reloaded, trained_scores, rtol=1e-4, atol=1e-4)


def test_pairwise_loss_compares_responses_of_the_same_problem_only():
    scores = torch.tensor([2.0, 0.0, 5.0, -1.0])
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    group = torch.tensor([0, 0, 1, 1])
    expected = -(torch.nn.functional.logsigmoid(torch.tensor(2.0)) + torch.nn.functional.logsigmoid(torch.tensor(-6.0)))
    torch.testing.assert_close(pairwise_loss(scores, labels, group), expected / 2)
    assert pairwise_loss(scores, torch.tensor([1.0, 1.0, 0.0, 0.0]), group) is None


def test_learning_rate_warms_up_then_decays_to_the_floor():
    factors = [warmup_cosine(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:]))


def test_selection_metrics_against_hand_computed_values():
    scores = [[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]]
    labels = [[True, False, False], [False, False, True]]
    metrics = selection_metrics(scores, labels, greedy=[False, True], bootstrap=200)
    assert metrics["auc"] == pytest.approx(0.75)
    assert (metrics["pairwise_accuracy"], metrics["pairs"]) == (pytest.approx(0.75), 4)  # 2/2 and 1/2 pairs
    assert metrics["auc_within_problem_mean"] == pytest.approx(0.75)
    assert metrics["best_of_n_accuracy"] == pytest.approx(0.5)
    assert metrics["random_sample_accuracy"] == pytest.approx(1 / 3)
    assert metrics["greedy_accuracy"] == pytest.approx(0.5)
    assert metrics["lift_over_random"] == pytest.approx(1 / 6)
    assert metrics["pass_at_n"] == 1.0
    low, high = metrics["lift_over_random_ci95"]
    assert low <= metrics["lift_over_random"] <= high


def test_grading_marks_each_response_and_skips_unparsable_gold():
    record = {"answer": "5", "responses": [{"text": "so \\boxed{5}"}, {"text": "\\boxed{6}"}, {"text": "no idea"}]}
    graded = grade_record(record)
    assert [r["correct"] for r in graded["responses"]] == [True, False, False]
    assert grade_record({"answer": "", "responses": [{"text": "\\boxed{5}"}]}) is None


def test_evaluation_sets_are_refused_as_training_data():
    assert parse_source("mawps/addsub") == ("mawps", "addsub", None)
    assert parse_source("generated/onestep:40") == ("generated", "onestep", 40)
    for source in ("svamp/test", "asdiv/test", "gsm8k/test", "math_oai/test", "math/test"):
        with pytest.raises(DataError, match="evaluation"):
            parse_source(source)


def _problems(count: int) -> list[Problem]:
    return [Problem(f"toy/{i}", f"what is {i} plus 3 ?", str(i + 3), "toy") for i in range(count)]


def _sample(policy, folder, problems, per_batch):
    settings = SampleSettings(
        datasets=["mawps/addsub"], problems=len(problems), samples_per_problem=3, max_new_tokens=6,
        problems_per_batch=per_batch, heldout_fraction=0.5,
    )  # fmt: skip
    return sample_problems(policy, problems, settings, folder, seed=0, progress=False), settings


def test_sampling_resumes_and_does_not_depend_on_batching(policy, tmp_path):
    problems = _problems(5)
    assert _sample(policy, tmp_path / "a", problems[:2], 2)[0] == 2
    sampled, settings = _sample(policy, tmp_path / "a", problems, 2)
    assert sampled == 3
    assert _sample(policy, tmp_path / "a", problems, 2)[0] == 0
    _sample(policy, tmp_path / "b", problems, 5)
    first = {r["id"]: r for r in read_jsonl(tmp_path / "a" / SAMPLES_FILE)}
    second = {r["id"]: r for r in read_jsonl(tmp_path / "b" / SAMPLES_FILE)}
    assert len(first) == 5 and first == second
    assert all(len(r["responses"]) == 3 for r in first.values())
    assert sample_greedy(policy, problems, settings, tmp_path / "a", seed=0, progress=False) == sum(
        r["heldout"] for r in first.values()
    )
    assert all(r["heldout"] for r in read_jsonl(tmp_path / "a" / GREEDY_FILE))


def test_a_cut_last_line_is_ignored_and_changed_settings_are_refused(tmp_path):
    (tmp_path / SAMPLES_FILE).write_text('{"id": "a"}\n{"id": "b", "resp')
    assert [r["id"] for r in read_jsonl(tmp_path / SAMPLES_FILE)] == ["a"]
    settings = SampleSettings()
    check_meta(tmp_path, sampling_meta(settings, "default", 0))
    check_meta(tmp_path, sampling_meta(SampleSettings(problems=999), "default", 0))  # more problems extend a run
    with pytest.raises(DataError, match="other settings"):
        check_meta(tmp_path, sampling_meta(SampleSettings(max_new_tokens=7), "default", 0))


def test_the_pipeline_grades_trains_evaluates_and_exports(tmp_path, saved_models, tokenizer):
    policy_dir, reward_dir = saved_models
    folder = tmp_path / "run"
    folder.mkdir()
    data = SampleSettings(datasets=["generated/onestep:6"], heldout_fraction=0.3)
    selected = select_problems(data, seed=0)
    records = [{**r, "id": p.id, "source": p.source, "heldout": is_heldout(p.id, 0.3, 0)}
               for r, p in zip(_fake_graded(tokenizer, problems=6), selected)]  # fmt: skip
    assert 0 < sum(r["heldout"] for r in records) < 6
    ungraded = [[{k: v for k, v in x.items() if k != "correct"} for x in r["responses"]] for r in records]
    samples = [{**r, "responses": responses} for r, responses in zip(records, ungraded)]
    extra = {**samples[0], "id": "not/selected"}  # cached samples of a problem this run does not draw
    (folder / SAMPLES_FILE).write_text("".join(json.dumps(r) + "\n" for r in [*samples, extra]))
    outcome = train_reward(
        policy=PolicySpec(name_or_path=str(policy_dir)),
        data=data,
        lora=SMALL_LORA,
        training=TrainSettings(lr=1e-2, epochs=1, gradient_clip=None),
        backbone=str(reward_dir),
        work_dir=str(folder),
        export=str(tmp_path / "shipped"),
        stages=["grade", "train", "evaluate", "export"],
        progress=False,
    )
    heldout = [r for r in records if r["heldout"]]
    assert outcome["grading"]["train"]["problems"] == 6 - len(heldout)
    metrics = json.loads((tmp_path / "shipped" / "metrics.json").read_text())
    assert metrics["reward_model"]["problems"] == len(heldout) and "self_judge" in metrics
    assert 0.0 <= metrics["reward_model"]["auc"] <= 1.0
    assert (tmp_path / "shipped" / "adapter_model.safetensors").is_file()
    correct = sum(x["correct"] for r in heldout for x in r["responses"])
    assert outcome["grading"]["heldout"]["correct_responses"] == correct
    # every held-out score is kept, and gives the recorded metrics again (what reward_paired.py --work-dirs reads)
    kept = read_heldout_scores(folder / HELDOUT_SCORES_FILE)
    assert [row["id"] for row in kept] == [r["id"] for r in heldout] and set(kept[0]["scores"]) == {
        "reward_model",
        "self_judge",
    }
    assert [row["labels"] for row in kept] == [[x["correct"] for x in r["responses"]] for r in heldout]
    again = selection_metrics([row["scores"]["reward_model"] for row in kept], [row["labels"] for row in kept])
    assert again["pairwise_accuracy"] == metrics["reward_model"]["pairwise_accuracy"]
    assert again["auc"] == pytest.approx(metrics["reward_model"]["auc"])


def test_lora_layers_limit_the_adapter_to_the_chosen_layers(saved_models):
    from nabla.rewardtrain.module import load_classifier, with_lora

    _, reward_dir = saved_models
    classifier, _ = load_classifier(str(reward_dir))
    model = with_lora(classifier, LoraSettings(rank=2, layers=[1], target_modules=["q_proj", "down_proj"]))
    adapted = {name.split(".lora_")[0] for name, _ in model.named_parameters() if "lora_" in name}
    assert adapted and all(".layers.1." in name for name in adapted)
    assert {name.rsplit(".", 1)[-1] for name in adapted} == {"q_proj", "down_proj"}


SHIPPED = Path(defaults.__file__).parent / "reward_adapter"


def test_the_shipped_reward_adapter_is_complete_small_and_measured():
    config = json.loads((SHIPPED / "adapter_config.json").read_text())
    assert "score" in config["modules_to_save"] and config["base_model_name_or_path"] == "default"
    weights = SHIPPED / "adapter_model.safetensors"
    assert weights.stat().st_size < 10 * 2**20
    with safe_open(str(weights), framework="pt") as tensors:
        names = list(tensors.keys())
    assert any("lora_A" in n for n in names) and any("score" in n for n in names)
    metrics = json.loads((SHIPPED / "metrics.json").read_text())["reward_model"]
    assert metrics["problems"] >= 20 and 0.0 <= metrics["auc"] <= 1.0
    assert 0.0 <= metrics["pairwise_accuracy"] <= 1.0 and metrics["pairs"] > 0  # judged within problems too
    low, high = metrics["lift_over_random_ci95"]
    assert low <= metrics["lift_over_random"] <= high


@pytest.mark.slow
def test_the_shipped_reward_model_loads_on_the_default_policy_and_scores():
    policy = PolicySpec().load()
    reward = RewardSpec().load(policy)
    reward.bind(policy)
    assert isinstance(reward, SequenceClassifierReward) and reward.alignment.identical
    prompt = "Tom has 3 apples and buys 5 more. How many apples does he have now? Put the final answer in \\boxed{}."
    responses = [
        "Tom has 3 + 5 = 8 apples.\nThe answer is \\boxed{8}.",
        "Tom has 3 + 5 = 9 apples.\nThe answer is \\boxed{9}.",
    ]
    scores = reward.score([prompt] * 2, responses)
    assert torch.isfinite(scores).all() and scores[0] > scores[1]  # it verifies: the right sum scores higher


def test_generated_word_problems_are_fixed_distinct_and_answered():
    from nabla.rewardtrain.wordproblems import one_step_problems

    problems = one_step_problems(300)
    assert problems == one_step_problems(300)
    assert len({p.question for p in problems}) == 300 and len({p.id for p in problems}) == 300
    assert all(p.answer.isdigit() and int(p.answer) > 0 for p in problems)
    tom = next(p for p in problems if " buys " in p.question and " more." in p.question)
    first, second = (int(w) for w in tom.question.split() if w.isdigit())
    assert int(tom.answer) == first + second


def test_counted_sources_are_drawn_after_the_pooled_ones():
    pooled = select_problems(SampleSettings(datasets=["mawps/addsub"], problems=5), seed=0)
    both = select_problems(SampleSettings(datasets=["mawps/addsub", "generated/onestep:3"], problems=5), seed=0)
    assert both[:5] == pooled and [p.source for p in both[5:]] == ["generated/onestep"] * 3
