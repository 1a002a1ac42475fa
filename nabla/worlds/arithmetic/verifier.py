"""The arithmetic world's reward stage: build supervision, train the reward model, judge it on held-out samples.

Three kinds of reward model (``reward.kind``):

* ``likelihood`` (default): a :class:`~nabla.prm.LikelihoodProcessReward`, the policy's causal LM trained further
  by process supervision. Its inputs are responses to fresh problems: the gold chain, corrupted chains
  (:func:`~nabla.worlds.arithmetic.process.corrupt`) and the policy's own graded samples. Every token of a chain is
  a target until the chain's first error and none after it, and every chain is followed by the *true* final answer
  (whatever the chain concluded) as a target, so the model learns where solutions go wrong and what the answer is;
  ``question → \\boxed{answer}`` rows teach the answer from the question alone. A step's probability is then the
  probability of its tokens: "this step continues the solution correctly", and for the last step "this is the
  right answer".
* ``classifier``: a :class:`~nabla.prm.ProcessRewardModel` (token classification) trained with binary
  cross-entropy on the same responses' step labels (every token labelled "no error yet", the last with the outcome).
* ``outcome``: the earlier outcome reward model (a sequence classifier on graded policy samples).

Every kind is judged the same way (:func:`judge`): scored through ``RewardModel.from_pretrained`` as decoding
scores, on held-out policy samples of ``reward_val`` and of ``test``, by within-problem pairwise accuracy, AUC,
best-of-8 lift over a random sample (95% CI) and the oracle ceiling pass@8.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nabla import jsonio
from nabla.errors import DataError
from nabla.sampler import SamplingConfig
from nabla.worlds.arithmetic.process import LabelledResponse, corrupt, step_labels
from nabla.worlds.arithmetic.task import STEP_SEPARATOR, Problem, stream

if TYPE_CHECKING:
    from nabla.policy import Policy
    from nabla.worlds.arithmetic.pipeline import RewardTraining, World
    from nabla.worlds.arithmetic.training import Sample

IGNORE = -100
EVAL_SAMPLES = 8  # policy samples per test problem for judging the reward model (best-of-8)
#: (problem, response token ids, labels) of one training response
Item = tuple[Problem, list[int], LabelledResponse]


# ---------------------------------------------------------------------- supervision
def synthetic_items(world: World, settings: RewardTraining, tokenizer: Any) -> list[Item]:
    """Gold and corrupted solutions of ``settings.process.problems`` fresh problems (a stream seeded apart from the
    policy's that never yields a held-out question), each as token ids with its step labels. A cut-off chain keeps
    its end token half of the time (a response can stop early, or run out of budget)."""
    data = settings.process
    rng = random.Random(world.seed + 3)
    kinds = list(data.kinds)
    eos = tokenizer.eos_token_id
    items: list[Item] = []
    problems = stream(world.task, world.seed + 3, exclude=world.splits.held_out())
    for problem in islice(problems, data.problems):
        versions = [step_labels(problem, problem.solution)]
        versions += [corrupt(problem, kind, rng) for kind in rng.choices(kinds, k=data.corruptions_per_problem)]
        for version in versions:
            ids = tokenizer(version.text, add_special_tokens=False)["input_ids"]
            if not ids or version.kind != "truncated" or rng.random() < 0.5:
                ids = [*ids, eos]
            items.append((problem, ids, version))
    return items


def sample_items(samples: Sequence[Sample], problems: dict[str, Problem]) -> list[Item]:
    """Graded policy samples with their exact step labels."""
    return [
        (problems[s.problem_id], list(s.token_ids), step_labels(problems[s.problem_id], s.response)) for s in samples
    ]


def likelihood_rows(
    items: Sequence[Item], reward: Any, tokenizer: Any, direct: bool
) -> list[tuple[list[int], list[int]]]:
    """``(input ids, targets)`` for a likelihood PRM: the reward input of ``chain ⊕ true answer ⊕ EOS``, the chain's
    tokens targets while they agree with the gold solution, the answer and EOS always; with ``direct``, one
    ``question → answer`` row per problem too."""
    eos = tokenizer.eos_token_id
    rows: list[tuple[list[int], list[int]]] = []
    seen: set[str] = set()
    for problem, _, labelled in items:
        chains = [_chain_of(labelled.text)]
        if direct and problem.id not in seen:
            chains.append("")
        seen.add(problem.id)
        gold = tokenizer(problem.solution, add_special_tokens=False)["input_ids"]
        answer = tokenizer(_box_of(problem.solution), add_special_tokens=False)["input_ids"] + [eos]
        for chain in chains:
            chain_ids = tokenizer(chain, add_special_tokens=False)["input_ids"]
            opening, _, _ = reward.input_parts(problem.question, "", [])
            agree = _agreement(chain_ids, gold)
            targets = [IGNORE] * len(opening) + [t if ok else IGNORE for t, ok in zip(chain_ids, agree)] + answer
            rows.append(([*opening, *chain_ids, *answer], targets))
    return rows


def _chain_of(text: str) -> str:
    """The steps of a response (everything up to its last separator), without its final answer."""
    cut = text.rfind(STEP_SEPARATOR)
    return text[: cut + 1] if cut >= 0 else ""


def _box_of(solution: str) -> str:
    return solution[len(_chain_of(solution)) :]


def _agreement(ids: Sequence[int], gold: Sequence[int]) -> list[bool]:
    """Per token: the response so far agrees with ``gold`` (no error yet)."""
    out, clean = [], True
    for index, token in enumerate(ids):
        clean = clean and index < len(gold) and gold[index] == token
        out.append(clean)
    return out


# ---------------------------------------------------------------------- training
def train_reward(
    world: World,
    settings: RewardTraining,
    policy_record: dict[str, Any],
    judge_sampling: SamplingConfig,
    progress: bool = True,
) -> dict[str, Any]:
    """Build the supervision, train, save and judge the reward model, or reuse the one in ``world.reward_dir``."""
    import lightning as L

    from nabla.policy import Policy
    from nabla.worlds.arithmetic.pipeline import TRAINING_FILE, _invalidate, _reusable, _save_atomically
    from nabla.worlds.arithmetic.training import sample_policy

    config = {
        "training": asdict(settings),
        "seed": world.seed,
        "policy": policy_record["settings"],
        "judge_sampling": asdict(judge_sampling),
    }
    known = _reusable(world.reward_dir, config, "reward model")
    if known is not None:
        return known
    _invalidate(world.folder / "compare")
    started = time.perf_counter()
    policy = Policy.from_pretrained(str(world.policy_dir))
    train_samples = sample_policy(
        policy, world.splits.reward_train, settings.samples_per_problem, settings.sampling, world.seed,
        world.max_new_tokens, description="sampling the policy (reward training problems)",
    )  # fmt: skip
    val_samples = sample_policy(
        policy, world.splits.reward_val, settings.samples_per_problem, settings.sampling, world.seed + 1,
        world.max_new_tokens, description="sampling the policy (reward validation problems)",
    )  # fmt: skip
    test_samples = sample_policy(
        policy, world.splits.test, EVAL_SAMPLES, judge_sampling, world.seed + 2, world.max_new_tokens,
        description="sampling the policy (test problems, to judge the reward model)",
    )  # fmt: skip
    sampling_s = time.perf_counter() - started
    L.seed_everything(world.seed, workers=True, verbose=False)
    train = {"likelihood": _train_likelihood, "classifier": _train_classifier, "outcome": _train_outcome}
    model, data_metrics = train[settings.kind](
        world, settings, policy, policy_record, train_samples, val_samples, progress
    )
    training_s = time.perf_counter() - started - sampling_s

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        policy.tokenizer.save_pretrained(folder)

    _save_atomically(world.reward_dir, save)
    _write_samples(world.folder / "reward_samples.jsonl", {"reward_train": train_samples, "reward_val": val_samples})
    _write_samples(world.folder / "judge_samples.jsonl", {"test": test_samples})
    metrics = {
        **data_metrics,
        "train_right_answer_rate": sum(s.correct for s in train_samples) / len(train_samples),
        **{
            f"val_{k}": v for k, v in judge(world.reward_dir, policy, val_samples, settings.samples_per_problem).items()
        },
        **{f"test_{k}": v for k, v in judge(world.reward_dir, policy, test_samples, EVAL_SAMPLES).items()},
    }
    metrics["best_of_8_lift"] = metrics["test_best_of_n_lift"]
    metrics["best_of_8_lift_ci95"] = metrics["test_best_of_n_lift_ci95"]
    record = {
        "settings": config,
        "kind": settings.kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": metrics,
        "sampling_s": sampling_s,
        "training_s": training_s,
        "wall_time_s": time.perf_counter() - started,
    }
    (world.reward_dir / TRAINING_FILE).write_text(jsonio.dumps(record, indent=2))
    return record


def _problems(world: World) -> dict[str, Problem]:
    return {p.id: p for split in (world.splits.reward_train, world.splits.reward_val) for p in split}


def _train_likelihood(world, settings, policy, policy_record, train_samples, val_samples, progress):
    from nabla.prm import LikelihoodProcessReward
    from nabla.worlds.arithmetic.models import deepened_policy, new_policy
    from nabla.worlds.arithmetic.pipeline import _trainer
    from nabla.worlds.arithmetic.training import MaskedRowsDataModule, OptimSettings, PolicyModule

    if settings.init == "policy":  # the policy itself, or deeper with identity layers on top
        model = deepened_policy(world.policy_dir, settings.extra_layers, world.seed + 1)
    else:  # a causal LM of ``size`` that learns the task from the reward data alone
        model = new_policy(policy.tokenizer, settings.size, world.seed + 1)
    model.config.process_reward = "likelihood"
    model.config.step_separator, model.config.step_aggregation = STEP_SEPARATOR, settings.aggregation
    formatter = LikelihoodProcessReward(model, policy.tokenizer)
    formatter.bind(policy)
    items = synthetic_items(world, settings, policy.tokenizer)
    if settings.process.policy_samples:
        items += sample_items(train_samples, _problems(world))
    rows = likelihood_rows(items, formatter, policy.tokenizer, settings.process.direct_answers)
    val_rows = likelihood_rows(sample_items(val_samples, _problems(world)), formatter, policy.tokenizer, False)
    data = MaskedRowsDataModule(rows, val_rows, policy.tokenizer.pad_token_id, settings.batch_size, world.seed)
    optim = OptimSettings(settings.lr, settings.weight_decay, settings.warmup_fraction)
    trainer = _trainer(settings.steps, -1, None, world.folder / "reward_logs", progress)
    trainer.fit(PolicyModule(model.requires_grad_(True).train(), optim), datamodule=data)
    return model.eval(), {"train_rows": len(rows), "train_responses": len(items)}


def _train_classifier(world, settings, policy, policy_record, train_samples, val_samples, progress):
    from nabla.prm import ProcessRewardModel
    from nabla.worlds.arithmetic.models import new_reward, reward_from_policy
    from nabla.worlds.arithmetic.pipeline import _trainer
    from nabla.worlds.arithmetic.training import OptimSettings, ProcessExamples, RewardDataModule, RewardModule

    extra = {"step_separator": STEP_SEPARATOR, "step_aggregation": settings.aggregation}
    if settings.init == "policy":
        model = reward_from_policy(world.policy_dir, world.seed + 1, settings.extra_layers, head="token", **extra)
    else:
        model = new_reward(policy.tokenizer, settings.size, world.seed + 1, head="token", **extra)
    formatter = ProcessRewardModel(model, policy.tokenizer)
    formatter.bind(policy)
    items = synthetic_items(world, settings, policy.tokenizer)
    if settings.process.policy_samples:
        items += sample_items(train_samples, _problems(world))
    val_items = sample_items(val_samples, _problems(world))
    gold = _gold_ids(policy.tokenizer, [problem for problem, _, _ in items + val_items])
    train = ProcessExamples([(p.id, p.question, ids, lab) for p, ids, lab in items], formatter, gold)
    val = ProcessExamples([(p.id, p.question, ids, lab) for p, ids, lab in val_items], formatter, gold)
    data = RewardDataModule(train, val, policy.tokenizer.pad_token_id, settings.problems_per_batch, world.seed)
    optim = OptimSettings(settings.lr, settings.weight_decay, settings.warmup_fraction)
    body_layers = model.config.num_hidden_layers - settings.extra_layers if settings.init == "policy" else 0
    module = RewardModule(model, optim, settings.loss, settings.step_weight, body_layers, settings.body_lr_scale)
    trainer = _trainer(settings.steps, -1, None, world.folder / "reward_logs", progress)
    trainer.fit(module, datamodule=data)
    return model.eval(), {"train_rows": len(train.rows), "train_positive_rate": train.positive_rate}


def _train_outcome(world, settings, policy, policy_record, train_samples, val_samples, progress):
    from nabla.reward import SequenceClassifierReward
    from nabla.worlds.arithmetic.models import new_reward, reward_from_policy
    from nabla.worlds.arithmetic.pipeline import _trainer, train_reward_body
    from nabla.worlds.arithmetic.training import OptimSettings, RewardDataModule, RewardExamples, RewardModule

    if settings.init == "policy":
        body = world.policy_dir
        if settings.pretrain_steps:
            body = train_reward_body(world, settings, policy_record, progress)
        model = reward_from_policy(body, world.seed + 1, settings.extra_layers)
    else:
        model = new_reward(policy.tokenizer, settings.size, world.seed + 1)
    formatter = SequenceClassifierReward(model, policy.tokenizer)
    formatter.bind(policy)
    problems = [p for split in (world.splits.reward_train, world.splits.reward_val) for p in split]
    gold = _gold_ids(policy.tokenizer, problems) if settings.step_weight or settings.label == "chain" else None
    train = RewardExamples(train_samples, formatter, gold, settings.label)
    val = RewardExamples(val_samples, formatter, gold, settings.label)
    if train.positive_rate in (0.0, 1.0):
        raise DataError(
            f"every policy sample is {'wrong' if train.positive_rate == 0 else 'right'}; the reward model has "
            "nothing to learn: train the policy for more or fewer steps"
        )
    data = RewardDataModule(train, val, policy.tokenizer.pad_token_id, settings.problems_per_batch, world.seed)
    optim = OptimSettings(settings.lr, settings.weight_decay, settings.warmup_fraction)
    body_layers = model.config.num_hidden_layers - settings.extra_layers if settings.init == "policy" else 0
    module = RewardModule(model, optim, settings.loss, settings.step_weight, body_layers, settings.body_lr_scale)
    trainer = _trainer(-1, settings.epochs, None, world.folder / "reward_logs", progress)
    trainer.fit(module, datamodule=data)
    return model.eval(), {"train_rows": len(train.rows), "train_positive_rate": train.positive_rate}


def _gold_ids(tokenizer: Any, problems: Sequence[Problem]) -> dict[str, list[int]]:
    """Token ids of each problem's gold response, EOS included (what a perfect policy would generate)."""
    unique = {p.id: p for p in problems}
    encoded = tokenizer([p.solution for p in unique.values()], add_special_tokens=False)["input_ids"]
    return {pid: [*ids, tokenizer.eos_token_id] for pid, ids in zip(unique, encoded)}


def _write_samples(path: Path, splits: dict[str, Sequence[Sample]]) -> None:
    with path.open("w") as handle:
        for split, samples in splits.items():
            for s in samples:
                handle.write(jsonio.dumps({"split": split, **asdict(s)}) + "\n")


# ---------------------------------------------------------------------- judging
def judge(reward_dir: Path, policy: Policy, samples: Sequence[Sample], n: int) -> dict[str, Any]:
    """How the saved reward model, loaded and scoring as decoding does, orders ``samples`` (several per problem):
    :func:`~nabla.eval.reward_metrics.reward_model_metrics` with best-of-``n``; for a PRM also under every step
    aggregation (``by_aggregation``; the top-level figures are its own aggregation's)."""
    from nabla.eval.reward_metrics import reward_model_metrics
    from nabla.prm import AGGREGATIONS, StepReward, aggregate_step_logits
    from nabla.reward import RewardModel

    reward = RewardModel.from_pretrained(str(reward_dir))
    reward.bind(policy)
    reward.batch_size = 256
    prompts = [s.prompt for s in samples]
    responses, ids = [s.response for s in samples], [s.token_ids for s in samples]
    order = list(dict.fromkeys(s.problem_id for s in samples))

    def metrics(scores: Sequence[float]) -> dict[str, Any]:
        by: dict[str, tuple[list[float], list[bool]]] = {pid: ([], []) for pid in order}
        for sample, score in zip(samples, scores):
            by[sample.problem_id][0].append(float(score))
            by[sample.problem_id][1].append(sample.correct)
        return reward_model_metrics([v[0] for v in by.values()], [v[1] for v in by.values()], n=n)

    if not isinstance(reward, StepReward):
        return metrics(reward.score(prompts, responses, ids).tolist())
    steps = reward.step_scores(prompts, responses, ids)
    by_aggregation = {a: metrics([float(aggregate_step_logits(s, a)) for s in steps]) for a in AGGREGATIONS}
    return {**by_aggregation[reward.aggregation], "aggregation": reward.aggregation, "by_aggregation": by_aggregation}
