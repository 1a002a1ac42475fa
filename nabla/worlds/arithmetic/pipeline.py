"""``nabla arithmetic``: the whole world in one command.

1. Problems: the held-out splits (``test``, ``dev``, ``reward_train``, ``reward_val``, disjoint by question) are
   written to ``output/problems/*.jsonl`` in the evaluation harness's fields.
2. Policy: a small ``LlamaForCausalLM`` trained with ``lightning.Trainer`` on gold chains of thought from a
   stream that excludes every held-out question; its greedy and sampled accuracy on ``dev`` are measured.
3. Reward model: a ``LlamaForSequenceClassification`` (started from the policy's body, or from a copy of the policy
   trained further on gold chains: ``reward.pretrain_steps``, saved in ``output/reward_lm``) trained on the
   policy's own samples of ``reward_train`` problems labelled by exact grading; AUC on the ``reward_val`` samples,
   scored by the saved model through :class:`~nabla.SequenceClassifierReward` exactly as decoding scores.
4. Comparison: :func:`nabla.eval.runner.compare` with greedy, self-consistency@N, best-of-N and ∇-Reasoner (rollout
   budget N) for every N in ``comparison.budgets``, on the ``test`` problems: table, plot, resumable records.

Each trained model is saved with ``save_pretrained`` in ``output/policy`` / ``output/reward`` with a
``training.json`` (settings, metrics, wall time) and reused by a rerun with the same settings; a rerun with other
settings is refused (delete the folder or pass another ``--output``). Retraining a model removes what was built
on it (the reward model, the comparison records). ``output/report.json`` gathers every figure and the timings.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from nabla import jsonio
from nabla.acceleration import Acceleration
from nabla.errors import ConfigurationError, DataError, require_finite
from nabla.mcmc import MCMCSettings
from nabla.optimizer import LatentOptimizer
from nabla.sampler import Sampler, SamplingConfig
from nabla.worlds.arithmetic.models import ModelSize
from nabla.worlds.arithmetic.process import CORRUPTION_KINDS
from nabla.worlds.arithmetic.task import ArithmeticTask, Problem, Splits, SplitSizes, read_jsonl, write_jsonl

SPLIT_NAMES = ("test", "dev", "reward_train", "reward_val")
TRAINING_FILE = "training.json"
WORLD_FILE = "world.json"
REPORT_FILE = "report.json"
QUESTION_TEMPLATE = "{question}"  # the prompt is the question itself: the policy was trained on exactly that


@dataclass
class PolicyTraining:
    """Supervised training of the policy on gold chains of thought (one pass over ``steps * batch_size`` fresh
    problems). Fewer steps leave more mistakes: the default aims at a greedy accuracy between 30% and 70%.

    Args:
        size: the model's size.
        steps: optimiser steps.
        batch_size: problems per step.
        lr: peak learning rate (AdamW; linear warm-up, then cosine).
        weight_decay: AdamW's weight decay.
        warmup_fraction: share of the steps spent warming up.
        val_every: steps between dev-set measurements.
    """

    size: ModelSize = field(default_factory=ModelSize)
    steps: int = 400
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    val_every: int = 200

    def __post_init__(self) -> None:
        require_finite(self)
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigurationError("policy.steps and policy.batch_size must be >= 1")


@dataclass
class ProcessData:
    """Synthetic process supervision (:mod:`nabla.worlds.arithmetic.process`) for the process reward models.

    Args:
        problems: fresh problems (never a held-out question) whose gold solution is kept and corrupted.
        corruptions_per_problem: corrupted versions of each (kinds drawn uniformly from ``kinds``), trained beside
            the gold one in the same batches.
        kinds: the corruption kinds to draw from.
        policy_samples: also train on the graded policy samples of the ``reward_train`` problems.
        direct_answers: likelihood PRMs also learn ``question → \\boxed{answer}`` (the answer without the steps).
    """

    problems: int = 8000
    corruptions_per_problem: int = 2
    kinds: list[str] = field(default_factory=lambda: list(CORRUPTION_KINDS))
    policy_samples: bool = True
    direct_answers: bool = True

    def __post_init__(self) -> None:
        require_finite(self)
        if self.problems < 1 or self.corruptions_per_problem < 0:
            raise ConfigurationError("reward.process.problems must be >= 1 and corruptions_per_problem >= 0")
        unknown = [kind for kind in self.kinds if kind not in CORRUPTION_KINDS]
        if unknown or not self.kinds:
            raise ConfigurationError(
                f"unknown reward.process.kinds {unknown}; choose from {', '.join(CORRUPTION_KINDS)}"
            )


@dataclass
class RewardTraining:
    """Training of the reward model (see :mod:`nabla.worlds.arithmetic.verifier`).

    Args:
        kind: ``likelihood`` (a process reward model read from a causal LM's step probabilities, trained on
            synthetic process supervision and graded policy samples), ``classifier`` (a token-classification PRM
            on the same data) or ``outcome`` (a sequence classifier on graded policy samples).
        process: the synthetic process supervision (``likelihood`` / ``classifier``).
        steps: optimiser steps of the process reward models.
        batch_size: rows per batch of the process reward models.
        aggregation: how a PRM turns step scores into one reward (``last``, ``min``, ``prod``, ``mean``).
        init: ``scratch`` (default) starts from random weights of ``size``; ``policy`` from the trained policy
            (``likelihood``: the policy itself; ``classifier`` / ``outcome``: its body with a new score head), with
            ``extra_layers`` new decoder layers on top. These are the reward model's scaling knobs (width and
            depth: ``scratch`` with a ``size``; depth on the policy: ``extra_layers``). For the likelihood PRM,
            scratch at the policy's size verifies better than the policy itself (docs/arithmetic.md).
        extra_layers: new decoder layers put on the policy (``init: policy``); for ``likelihood`` they start as the
            identity, so training starts from the policy's own predictions.
        size: the model's size with ``init: scratch``.
        epochs: passes over the graded samples (``outcome``).
        lr: peak learning rate (AdamW; linear warm-up, then cosine).
        weight_decay: AdamW's weight decay.
        warmup_fraction: share of the steps spent warming up.
        samples_per_problem: policy samples per ``reward_train`` / ``reward_val`` problem.
        sampling: how those samples are drawn.
        loss: ``pairwise`` (Bradley-Terry within each problem), ``pointwise`` (binary cross-entropy) or ``both``.
        problems_per_batch: problems per batch (each with all its samples).
        step_weight: weight of the auxiliary per-token loss ("the response so far agrees with the gold chain";
            0 trains on the outcome label alone).
        pretrain_steps: with ``init: policy``, first train a copy of the policy this many more steps on gold chains
            of thought (fresh problems, never a held-out one) and start the reward model from that stronger body, as
            reward models usually start from a stronger language model than the policy they judge. The policy is
            left as it is. 0: start from the policy itself. The body is saved in ``output/reward_lm`` and reused.
        pretrain_lr: the learning rate of that pre-training.
        pretrain_batch_size: its batch size.
        label: the outcome label: ``outcome`` (exact grading of the final answer) or ``chain`` (the response is
            the gold chain of thought, every step graded exactly; see :class:`RewardExamples`).
        body_lr_scale: with ``init: policy``, the embeddings and the layers taken from the language model learn at
            this fraction of ``lr`` (the new layers and the score head at ``lr``): keeps what the body knows while
            the new parts learn to judge.
    """

    kind: Literal["likelihood", "classifier", "outcome"] = "likelihood"
    process: ProcessData = field(default_factory=ProcessData)
    steps: int = 1000
    batch_size: int = 128
    aggregation: Literal["last", "min", "prod", "mean"] = "last"
    init: Literal["policy", "scratch"] = "scratch"
    extra_layers: int = 0
    size: ModelSize = field(default_factory=ModelSize)
    samples_per_problem: int = 4
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0, top_p=None))
    epochs: int = 4
    problems_per_batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    loss: Literal["pairwise", "pointwise", "both"] = "both"
    step_weight: float = 1.0
    pretrain_steps: int = 0
    pretrain_lr: float = 3e-3
    pretrain_batch_size: int = 64
    body_lr_scale: float = 1.0
    label: Literal["outcome", "chain"] = "outcome"

    def __post_init__(self) -> None:
        require_finite(self)
        if self.label not in ("outcome", "chain"):
            raise ConfigurationError(f"reward.label must be 'outcome' or 'chain' (got {self.label!r})")
        if self.pretrain_steps < 0:
            raise ConfigurationError("reward.pretrain_steps must be >= 0")
        if self.init not in ("policy", "scratch"):
            raise ConfigurationError(f"reward.init must be 'policy' or 'scratch' (got {self.init!r})")
        if self.extra_layers < 0:
            raise ConfigurationError(f"reward.extra_layers must be >= 0 (got {self.extra_layers})")
        if self.samples_per_problem < 1 or self.epochs < 1 or self.problems_per_batch < 1:
            raise ConfigurationError("reward.samples_per_problem, epochs and problems_per_batch must be >= 1")
        if self.loss not in ("pairwise", "pointwise", "both"):
            raise ConfigurationError(f"reward.loss must be pairwise, pointwise or both (got {self.loss!r})")
        if self.kind not in ("likelihood", "classifier", "outcome"):
            raise ConfigurationError(f"reward.kind must be likelihood, classifier or outcome (got {self.kind!r})")
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigurationError("reward.steps and reward.batch_size must be >= 1")
        if self.aggregation not in ("last", "min", "prod", "mean"):
            raise ConfigurationError(f"reward.aggregation must be last, min, prod or mean (got {self.aggregation!r})")


@dataclass
class Comparison:
    """The comparison run by the evaluation harness.

    Args:
        split: the problems (``test``; ``dev`` for tuning, never ``test``).
        limit: the first ``limit`` problems of the split (default: all).
        budgets: N of the scaling curves: samples of self-consistency / best-of-N, rollout budget of ∇-Reasoner.
        baselines: the sampling baselines run at every budget (greedy runs once).
        sampling: how every method draws its rollouts.
        optimizer, sampler, acceleration: ∇-Reasoner's settings (the sampler's rollout sampling, budget and length
            come from ``sampling``, ``budgets`` and the task).
        num_processes: processes to shard problems across (Lightning Fabric).
        paired: pairs of method labels compared problem by problem (exact McNemar test, paired bootstrap 95%
            interval of the accuracy difference) in ``report.json`` and ``paired.md``.
        temperatures: a temperature sweep: every sampling method again at ``sweep_budget``, with its rollouts at each
            of these temperatures (``output/compare_sweep``), so that sampling and the reward can be told apart.
        sweep_budget: N of the sweep.
        off_distribution: a harder task than the models were trained on (``null``: none), whose problems (never a
            held-out question) are solved at ``sweep_budget`` as well (``output/compare_off``).
        off_distribution_problems: how many of them.
        folder: the main comparison's subfolder of the output.
        enabled: run the comparison at all (``false``: train the models only).
        extra_methods: more methods of the main comparison, as ``name@n`` labels: ``nabla_metropolis@8``
            (∇-Reasoner with the Metropolis acceptance, budget 8), ``mcmc@16`` (the DMALA sampler of ρ*, 16 steps).
        mcmc: the DMALA sampler's ``lam``, ``step_size``, ``top_k``, ``answer`` and ``batch_size``.
        oracle: also run the search loops with the exact grader as their reward (``output/compare_oracle``):
            best-of-N picks a right sample whenever one exists, and ∇-Reasoner accepts a proposal only when it turns
            a wrong answer right (its DTO then follows the likelihood alone: the grader has no gradient). It
            measures the loops apart from the reward model's quality.
    """

    split: Literal["test", "dev"] = "test"
    limit: int | None = None
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    baselines: list[str] = field(
        default_factory=lambda: ["sampling", "self_consistency", "best_of_n", "weighted_majority"]
    )
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95))
    optimizer: LatentOptimizer = field(default_factory=LatentOptimizer)
    sampler: Sampler = field(default_factory=Sampler)
    acceleration: Acceleration = field(default_factory=Acceleration)
    num_processes: int = 2
    paired: list[list[str]] = field(
        default_factory=lambda: [["nabla@8", "greedy"], ["nabla@8", "self_consistency@8"], ["nabla@8", "best_of_n@8"]]
    )
    temperatures: list[float] = field(default_factory=list)
    sweep_budget: int = 8
    off_distribution: ArithmeticTask | None = None
    off_distribution_problems: int = 200
    folder: str = "compare"
    extra_methods: list[str] = field(default_factory=list)
    mcmc: MCMCSettings = field(default_factory=MCMCSettings)
    enabled: bool = True
    oracle: bool = False

    def __post_init__(self) -> None:
        if not self.budgets or min(self.budgets) < 1:
            raise ConfigurationError(f"comparison.budgets must be positive integers (got {self.budgets})")
        if self.sweep_budget < 1 or self.off_distribution_problems < 1:
            raise ConfigurationError("comparison.sweep_budget and off_distribution_problems must be >= 1")
        if any(len(pair) != 2 for pair in self.paired):
            raise ConfigurationError(f"comparison.paired takes pairs of method labels (got {self.paired})")
        for temperature in self.temperatures:
            SamplingConfig(temperature=temperature, top_p=self.sampling.top_p)
        from nabla.baselines import BASELINES

        unknown = [name for name in self.baselines if name not in BASELINES or name == "greedy"]
        if unknown:
            choices = ", ".join(name for name in BASELINES if name != "greedy")
            raise ConfigurationError(f"unknown comparison.baselines {unknown}; choose from {choices}")
        for label in self.extra_methods:
            extra_method(label)


EXTRA_METHODS = ("nabla_metropolis", "mcmc")


def extra_method(label: str) -> tuple[str, int]:
    """``"mcmc@16"`` → ``("mcmc", 16)``; refuses other names and budgets."""
    name, _, budget = label.partition("@")
    if name not in EXTRA_METHODS or not budget.isdigit() or int(budget) < 1:
        raise ConfigurationError(
            f"comparison.extra_methods takes name@n with name in {', '.join(EXTRA_METHODS)} and n >= 1 (got {label!r})"
        )
    return name, int(budget)


# ---------------------------------------------------------------------- the world's files
@dataclass
class World:
    """The output folder of one world: its settings, problems and models."""

    folder: Path
    task: ArithmeticTask
    splits: Splits
    seed: int

    @property
    def policy_dir(self) -> Path:
        return self.folder / "policy"

    @property
    def reward_dir(self) -> Path:
        return self.folder / "reward"

    @property
    def reward_lm_dir(self) -> Path:
        return self.folder / "reward_lm"

    def problems_path(self, split: str) -> Path:
        return self.folder / "problems" / f"{split}.jsonl"

    @property
    def max_new_tokens(self) -> int:
        """Room for the longest gold response and its EOS, with a margin for wrong detours."""
        return self.task.max_response_chars + 8

    @classmethod
    def prepare(cls, folder: Path, task: ArithmeticTask, sizes: SplitSizes, seed: int) -> World:
        """Write (or check) ``world.json`` and the problem files."""
        settings = {"task": asdict(task), "splits": asdict(sizes), "seed": seed}
        path = folder / WORLD_FILE
        if path.is_file():
            known = json.loads(path.read_text())
            if known != settings:
                raise DataError(
                    f"{folder} holds a world made with other task, split or seed settings; pass another --output "
                    "or delete the folder"
                )
        splits = Splits.build(task, seed, sizes)
        world = cls(folder, task, splits, seed)
        for name in SPLIT_NAMES:
            if not world.problems_path(name).is_file():
                write_jsonl(getattr(splits, name), world.problems_path(name))
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(jsonio.dumps(settings, indent=2))
        return world

    def problems(self, split: str) -> list[Problem]:
        return read_jsonl(self.problems_path(split))


def _load_training(folder: Path) -> dict[str, Any] | None:
    path = folder / TRAINING_FILE
    if not (path.is_file() and (folder / "config.json").is_file()):
        return None
    return json.loads(path.read_text())


def _reusable(folder: Path, settings: dict[str, Any], what: str) -> dict[str, Any] | None:
    """The saved ``training.json`` when ``folder`` holds a model trained with ``settings``; refuse other ones."""
    record = _load_training(folder)
    if record is None:
        return None
    if record["settings"] != json.loads(json.dumps(settings)):
        raise DataError(
            f"{folder} holds a {what} trained with other settings; delete that folder to retrain it, or pass "
            "another --output"
        )
    return record


def _save_atomically(folder: Path, save) -> None:
    """``save(staging)`` then one rename, so that a half-written folder is never taken for a trained model."""
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    save(staging)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def _invalidate(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            print(f"removing {path} (built on a model that is being retrained)")
            shutil.rmtree(path)


def _trainer(max_steps: int, max_epochs: int | None, val_every: int | None, folder: Path, progress: bool):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from nabla.progress import lightning_progress
    from nabla.rl.train import quiet_lightning

    quiet_lightning()  # Lightning's notices that do not apply here
    show_bar, callbacks = lightning_progress(progress, f"training {folder.name.removesuffix('_logs')}")

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=max_steps,
        max_epochs=max_epochs,
        val_check_interval=val_every,
        check_val_every_n_epoch=None if val_every else 1,
        deterministic=True,
        logger=CSVLogger(folder, name="logs"),
        enable_checkpointing=False,
        enable_progress_bar=show_bar,
        callbacks=callbacks,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )


# ---------------------------------------------------------------------- stages
def train_policy(world: World, settings: PolicyTraining, progress: bool = True) -> dict[str, Any]:
    """Train, save and measure the policy, or reuse the one in ``world.policy_dir``."""
    import lightning as L

    from nabla.worlds.arithmetic.models import new_policy
    from nabla.worlds.arithmetic.tokenizer import arithmetic_tokenizer
    from nabla.worlds.arithmetic.training import OptimSettings, PolicyDataModule, PolicyModule

    config = {"training": asdict(settings), "seed": world.seed}
    known = _reusable(world.policy_dir, config, "policy")
    if known is not None:
        return known
    _invalidate(world.reward_lm_dir, world.reward_dir, world.folder / "compare")
    started = time.perf_counter()
    L.seed_everything(world.seed, workers=True, verbose=False)
    tokenizer = arithmetic_tokenizer()
    model = new_policy(tokenizer, settings.size, world.seed)
    data = PolicyDataModule(
        tokenizer,
        world.task,
        world.splits.held_out(),
        world.splits.dev,
        train_size=settings.steps * settings.batch_size,
        batch_size=settings.batch_size,
        seed=world.seed,
    )
    optim = OptimSettings(settings.lr, settings.weight_decay, settings.warmup_fraction)
    val_every = min(settings.val_every, settings.steps)
    trainer = _trainer(settings.steps, 1, val_every, world.folder / "policy_logs", progress)
    trainer.fit(PolicyModule(model, optim), datamodule=data)
    training_s = time.perf_counter() - started

    def save(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    _save_atomically(world.policy_dir, save)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    metrics.update(measure_policy(world, progress))
    record = {
        "settings": config,
        "parameters": sum(p.numel() for p in model.parameters()),
        "metrics": metrics,
        "training_s": training_s,
        "wall_time_s": time.perf_counter() - started,
    }
    (world.policy_dir / TRAINING_FILE).write_text(jsonio.dumps(record, indent=2))
    return record


def measure_policy(world: World, progress: bool = True, rollout: SamplingConfig | None = None) -> dict[str, float]:
    """Greedy accuracy and per-sample accuracy (4 samples at the rollout temperature) on the ``dev`` problems,
    from the saved policy."""
    from nabla.policy import Policy
    from nabla.worlds.arithmetic.training import sample_policy

    policy = Policy.from_pretrained(str(world.policy_dir))
    dev = world.splits.dev
    rollout = rollout or Comparison().sampling
    greedy = sample_policy(
        policy, dev, 1, SamplingConfig(temperature=0.0, top_p=None), world.seed, world.max_new_tokens
    )
    sampled = sample_policy(policy, dev, 4, rollout, world.seed, world.max_new_tokens)
    by_problem: dict[str, bool] = {}
    for sample in sampled:
        by_problem[sample.problem_id] = by_problem.get(sample.problem_id, False) or sample.correct
    return {
        "dev_greedy_accuracy": sum(s.correct for s in greedy) / len(greedy),
        "dev_sample_accuracy": sum(s.correct for s in sampled) / len(sampled),
        "dev_pass_at_4": sum(by_problem.values()) / len(by_problem),
    }


def train_reward_body(
    world: World, settings: RewardTraining, policy_record: dict[str, Any], progress: bool = True
) -> Path:
    """The reward model's starting body: the policy trained ``settings.pretrain_steps`` more steps on gold chains
    of thought (a stream seeded apart from the policy's, excluding every held-out question), saved in
    ``world.reward_lm_dir`` and reused by a rerun with the same settings."""
    import lightning as L

    from nabla.worlds.arithmetic.training import OptimSettings, PolicyDataModule, PolicyModule

    config = {
        "steps": settings.pretrain_steps,
        "lr": settings.pretrain_lr,
        "batch_size": settings.pretrain_batch_size,
        "seed": world.seed,
        "policy": policy_record["settings"],
    }
    folder = world.reward_lm_dir
    record = _load_training(folder)
    if record is not None and record["settings"] == json.loads(json.dumps(config)):
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    started = time.perf_counter()
    L.seed_everything(world.seed + 2, workers=True, verbose=False)
    tokenizer = AutoTokenizer.from_pretrained(str(world.policy_dir))
    model = LlamaForCausalLM.from_pretrained(str(world.policy_dir), dtype=torch.float32)
    data = PolicyDataModule(
        tokenizer,
        world.task,
        world.splits.held_out(),
        world.splits.dev,
        train_size=settings.pretrain_steps * settings.pretrain_batch_size,
        batch_size=settings.pretrain_batch_size,
        seed=world.seed + 2,  # other problems than the policy's (the task may repeat some: it has few distinct ones)
    )
    optim = OptimSettings(settings.pretrain_lr, settings.weight_decay, settings.warmup_fraction)
    trainer = _trainer(settings.pretrain_steps, 1, settings.pretrain_steps, world.folder / "reward_lm_logs", progress)
    trainer.fit(PolicyModule(model, optim), datamodule=data)

    def save(target: Path) -> None:
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)

    _save_atomically(folder, save)
    metrics = {key: float(value) for key, value in trainer.callback_metrics.items()}
    record = {"settings": config, "metrics": metrics, "training_s": time.perf_counter() - started}
    (folder / TRAINING_FILE).write_text(jsonio.dumps(record, indent=2))
    return folder


def comparison_methods(
    comparison: Comparison,
    max_new_tokens: int,
    oracle: bool = False,
    budgets: list[int] | None = None,
    sampling: SamplingConfig | None = None,
    suffix: str = "",
) -> list:
    """Greedy once; every baseline and ∇-Reasoner at every budget (``budgets``, default the comparison's), their
    rollouts drawn with ``sampling`` (default the comparison's) and ``suffix`` appended to their labels.
    ``oracle``: best-of-N and ∇-Reasoner only, ∇-Reasoner's DTO on likelihood alone (the oracle reward has no
    gradient)."""
    from nabla.eval.methods import MethodSpec

    optimizer = replace(comparison.optimizer, reward_weight=0.0) if oracle else comparison.optimizer
    suffix = suffix + (" (oracle)" if oracle else "")
    sampling = sampling or comparison.sampling
    budgets = budgets or comparison.budgets

    def spec(name: str, n: int = 1) -> MethodSpec:
        label = f"{name}@{n}{suffix}" if n > 1 or name == "nabla" else f"{name}{suffix}"
        return MethodSpec(
            name,  # type: ignore[arg-type]
            n=n,
            sampling=sampling,
            max_new_tokens=max_new_tokens,
            optimizer=optimizer,
            sampler=comparison.sampler,
            acceleration=comparison.acceleration,
            mcmc=comparison.mcmc,
            label=label,
        )

    if oracle:
        return [spec(name, n) for n in budgets for name in ("best_of_n", "nabla")]
    methods = [spec("greedy")] if not suffix else []
    for n in budgets:
        methods += [spec(name, n) for name in comparison.baselines]
        methods.append(spec("nabla", n))
    if budgets == comparison.budgets and not suffix:
        methods += [spec(*extra_method(label)) for label in comparison.extra_methods]
    return methods


def run_comparison(world: World, comparison: Comparison, progress: bool = True) -> list:
    """The main comparison on ``comparison.split``: every method at every budget."""
    count = comparison.limit or len(world.problems(comparison.split))
    return _compare(
        world,
        comparison,
        world.problems_path(comparison.split),
        comparison_methods(comparison, world.max_new_tokens),
        comparison.folder,
        f"arithmetic world · {comparison.split} · {count} problems · seed {world.seed}",
        progress,
    )


def run_temperature_sweep(world: World, comparison: Comparison, progress: bool = True) -> list:
    """Every sampling method at ``sweep_budget`` with its rollouts at each of ``comparison.temperatures``."""
    methods = []
    for temperature in comparison.temperatures:
        sampling = replace(comparison.sampling, temperature=temperature)
        methods += comparison_methods(
            comparison, world.max_new_tokens, budgets=[comparison.sweep_budget], sampling=sampling,
            suffix=f" T={temperature:g}",
        )  # fmt: skip
    count = comparison.limit or len(world.problems(comparison.split))
    title = f"arithmetic world · {comparison.split} · {count} problems · rollout temperature sweep"
    return _compare(world, comparison, world.problems_path(comparison.split), methods, "compare_sweep", title, progress)


def run_off_distribution(world: World, comparison: Comparison, progress: bool = True) -> list:
    """Greedy and every method at ``sweep_budget`` on problems of the harder ``comparison.off_distribution`` task
    (never a held-out question), with the response budget that task needs."""
    from nabla.worlds.arithmetic.task import generate

    task = comparison.off_distribution
    assert task is not None
    path = world.folder / "problems" / "off_distribution.jsonl"
    if not path.is_file():
        count = comparison.off_distribution_problems
        write_jsonl(generate(task, count, seed=world.seed * 1000 + 7, exclude=world.splits.held_out()), path)
    budget = task.max_response_chars + 8
    methods = comparison_methods(comparison, budget, budgets=[comparison.sweep_budget])
    title = (
        f"arithmetic world · off distribution ({task.min_terms}-{task.max_terms} terms of "
        f"{task.min_value}-{task.max_value}) · {comparison.off_distribution_problems} problems"
    )
    return _compare(world, replace(comparison, limit=None), path, methods, "compare_off", title, progress)


def _compare(world: World, comparison: Comparison, path: Path, methods: list, folder: str, title: str, progress):
    from nabla.config import PolicySpec, RewardSpec
    from nabla.eval.datasets import DatasetSpec
    from nabla.eval.runner import compare

    dataset = DatasetSpec(
        name="jsonl",
        path=str(path),
        question_field="problem",
        answer_field="answer",
        id_field="id",
        prompt_template=QUESTION_TEMPLATE,
    )
    return compare(
        policy=PolicySpec(name_or_path=str(world.policy_dir)),
        reward=RewardSpec(kind="classifier", name_or_path=str(world.reward_dir)),
        dataset=dataset,
        methods=methods,
        output=str(world.folder / folder),
        limit=comparison.limit,
        seed=world.seed,
        num_processes=comparison.num_processes,
        progress=progress,
        title=title,
    )


def run_oracle_comparison(world: World, comparison: Comparison, progress: bool = True) -> list:
    """The harness's solvers, records and reports with the exact grader as the reward (in-process: a grader is a
    Python function, not a model folder that worker processes could load)."""
    from nabla.eval.datasets import Problem as HarnessProblem
    from nabla.eval.methods import Solver
    from nabla.eval.metrics import summarize
    from nabla.eval.report import plot_comparison, print_summaries, write_markdown
    from nabla.eval.runner import RECORDS_FOLDER, RecordWriter, read_records
    from nabla.policy import Policy
    from nabla.reward import CallableReward
    from nabla.worlds.arithmetic.task import is_correct
    from nabla.worlds.arithmetic.training import progress_bar

    problems = world.problems(comparison.split)[: comparison.limit]
    answers = {p.question: p.answer for p in problems}
    grader = CallableReward(lambda prompt, response: float(is_correct(response, answers[prompt])), name="exact")
    policy = Policy.from_pretrained(str(world.policy_dir))
    folder = world.folder / f"{comparison.folder}_oracle"
    methods = comparison_methods(comparison, world.max_new_tokens, oracle=True)
    done = {(r["method"], r["problem_id"]) for r in read_records(folder)}
    writer = RecordWriter(folder / RECORDS_FOLDER / "rank-0.jsonl")
    try:
        with progress_bar() as bar:
            task = bar.add_task("oracle comparison", total=len(methods) * len(problems), visible=progress)
            for method in methods:
                solver = Solver(method, policy, grader, QUESTION_TEMPLATE)
                for p in problems:
                    if (method.display_label, p.id) not in done:
                        writer.write(
                            solver.solve(HarnessProblem(p.id, p.question, str(p.answer), "arithmetic"), world.seed)
                        )
                    bar.update(task, advance=1)
    finally:
        writer.close()
    records = read_records(folder)
    summaries = [summarize([r for r in records if r["method"] == m.display_label]) for m in methods]
    title = f"arithmetic world · {comparison.split} · {len(problems)} problems · exact grader as the reward"
    print_summaries(summaries, title=title)
    write_markdown(summaries, folder / "comparison.md", title=title)
    plot_comparison(summaries, folder / "comparison.png", title=title)
    return summaries


# ---------------------------------------------------------------------- the command
def arithmetic(
    task: ArithmeticTask = ArithmeticTask(),  # noqa: B008 - jsonargparse reads dataclass defaults
    splits: SplitSizes = SplitSizes(),  # noqa: B008
    policy: PolicyTraining = PolicyTraining(),  # noqa: B008
    reward: RewardTraining = RewardTraining(),  # noqa: B008
    comparison: Comparison = Comparison(),  # noqa: B008
    output: str = "runs/arithmetic",
    seed: int = 0,
    threads: int | None = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the arithmetic world's policy and reward model (or reuse them from ``output``) and compare greedy,
    self-consistency, best-of-N and ∇-Reasoner on held-out problems; writes ``output/report.json``.

    Args:
        task: the generator's difficulty settings.
        splits: sizes of the held-out problem sets.
        policy: how the policy is trained.
        reward: how the reward model is trained.
        comparison: the methods, budgets and ∇-Reasoner settings of the comparison.
        output: the folder of problems, models, records, table, plot and report; a rerun reuses what is there.
        seed: the seed of everything (problems, initial weights, data order, sampling).
        threads: torch CPU threads (1 is fastest for these small models, and on a busy machine); null: torch's.
        progress: show progress bars.
    """
    started = time.perf_counter()
    if threads:
        import torch

        torch.set_num_threads(threads)
    world = World.prepare(Path(output), task, splits, seed)
    report: dict[str, Any] = {"output": output, "seed": seed}
    stage = time.perf_counter()
    report["policy"] = train_policy(world, policy, progress)
    report["policy_stage_s"] = time.perf_counter() - stage
    stage = time.perf_counter()
    from nabla.eval.paired import paired_tests
    from nabla.worlds.arithmetic.verifier import train_reward

    report["reward"] = train_reward(world, reward, report["policy"], comparison.sampling, progress)
    report["reward_stage_s"] = time.perf_counter() - stage
    if comparison.enabled:
        stage = time.perf_counter()
        summaries = run_comparison(world, comparison, progress)
        report["comparison"] = [s.to_dict() for s in summaries]
        report["paired"] = paired_tests(world.folder / comparison.folder, comparison.paired, "main comparison")
        report["comparison_stage_s"] = time.perf_counter() - stage
        if comparison.temperatures:
            stage = time.perf_counter()
            report["temperature_sweep"] = [s.to_dict() for s in run_temperature_sweep(world, comparison, progress)]
            sweep_pairs = [
                [f"{a} T={t:g}", f"{b} T={t:g}" if b != "greedy" else b]
                for t in comparison.temperatures
                for a, b in comparison.paired
            ]
            report["temperature_sweep_paired"] = paired_tests(world.folder / "compare_sweep", sweep_pairs, "sweep")
            report["temperature_sweep_stage_s"] = time.perf_counter() - stage
        if comparison.off_distribution is not None:
            stage = time.perf_counter()
            report["off_distribution"] = [s.to_dict() for s in run_off_distribution(world, comparison, progress)]
            report["off_distribution_paired"] = paired_tests(
                world.folder / "compare_off", comparison.paired, "off distribution"
            )
            report["off_distribution_stage_s"] = time.perf_counter() - stage
    if comparison.oracle:
        stage = time.perf_counter()
        report["oracle_comparison"] = [s.to_dict() for s in run_oracle_comparison(world, comparison, progress)]
        report["oracle_stage_s"] = time.perf_counter() - stage
    report["total_s"] = time.perf_counter() - started
    (world.folder / REPORT_FILE).write_text(jsonio.dumps(report, indent=2))
    _print_report(report)
    return report


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="arithmetic world")
    table.add_column("what")
    table.add_column("value", justify="right")
    policy, reward = report["policy"], report["reward"]
    table.add_row("policy parameters", f"{policy['parameters']:,}")
    for key in ("dev_greedy_accuracy", "dev_sample_accuracy", "dev_pass_at_4"):
        table.add_row(f"policy {key.replace('_', ' ')}", f"{policy['metrics'][key]:.1%}")
    table.add_row("policy training (s)", f"{policy['training_s']:.0f}")
    metrics = reward["metrics"]
    table.add_row(f"reward model ({reward.get('kind', 'outcome')}) parameters", f"{reward['parameters']:,}")
    for split in ("val", "test"):
        table.add_row(
            f"reward {split}: same-problem pairs ordered", _percent(metrics.get(f"{split}_pairwise_accuracy"))
        )
        table.add_row(f"reward {split}: AUC", _decimal(metrics.get(f"{split}_auc")))
    low, high = metrics.get("best_of_8_lift_ci95") or (None, None)
    lift = f"{_percent(metrics.get('best_of_8_lift'))} [{_percent(low)}, {_percent(high)}]"
    table.add_row("reward test: best-of-8 lift over a sample", lift)
    table.add_row("test: best-of-8 with the exact grader (pass@8)", _percent(metrics.get("test_pass_at_n")))
    table.add_row("reward sampling + training (s)", f"{reward['sampling_s'] + reward['training_s']:.0f}")
    stages = {
        "policy_stage_s": "policy stage",
        "reward_stage_s": "reward stage",
        "comparison_stage_s": "comparison",
        "temperature_sweep_stage_s": "temperature sweep",
        "off_distribution_stage_s": "off-distribution set",
    }
    for key, name in {**stages, "total_s": "total"}.items():
        if key in report:
            table.add_row(f"{name} (s)", f"{report[key]:.0f}")
    Console().print(table)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _decimal(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
