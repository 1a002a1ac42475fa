"""``nabla rl-vs-testtime``: the two paths to ρ* on the arithmetic world, side by side, at a measured cost.

1. The world (``nabla arithmetic``: task, trained policy and reward model, held-out problems) is read from its
   folder, or built there with that command's defaults when missing.
2. RL: :class:`~nabla.rl.KLRegularizedRL` trains a LoRA adapter of the policy against the same reward model that
   ∇-Reasoner uses, with ``β = 1 / λ`` and ``λ = optimizer.lam`` (the test-time λ), on fresh problems that exclude
   every held-out question. Checkpoints make it resumable; a rerun with the same settings reuses the adapter.
3. Evaluation with the harness (:func:`nabla.eval.runner.compare`, resumable records): base policy greedy and
   sampled and ∇-Reasoner on the base policy; the RL policy greedy and sampled.
4. ``KL(π_RL ‖ π_base)`` at temperature 1 on the evaluation prompts (k1 and k3 from samples of π_RL).
5. The table (``docs/results/rl_vs_testtime_lam<λ>.md``) and the plot (``….png``), with the break-even number
   of prompts: how many prompts must be served before RL's up-front training cost plus its per-prompt cost falls
   below ∇-Reasoner's per-prompt cost (by FLOPs, model calls and wall time).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from nabla import jsonio
from nabla._typing import TYPE_CHECKING
from nabla.errors import ConfigurationError, ModelNotFoundError
from nabla.optimizer import LatentOptimizer
from nabla.rl.settings import LoRASettings, RLConfig, RLTrainerSettings
from nabla.sampler import Sampler, SamplingConfig

if TYPE_CHECKING:  # torch and the models are imported where they are used (a fast `--help`)
    from nabla.reward import RewardModel

COST_KEYS = ("model_calls", "flops", "wall_time_s")


@dataclass
class RLStage:
    """The RL fine-tuning of the comparison.

    Args:
        config: RL settings; ``config.lam`` must equal the test-time ``optimizer.lam`` (one λ for both paths).
        lora: the adapter.
        trainer: the Lightning trainer (``default_root_dir`` is set under the output folder).
        train_prompts: fresh problems generated for training (never a held-out question).
        batch_size: prompts per step.
        reward: ``model`` (the world's reward model, as ∇-Reasoner) or ``verifier`` (exact grading).
    """

    config: RLConfig = field(default_factory=lambda: RLConfig(lam=1000.0, group_size=8, lr=1e-3, max_new_tokens=64))
    lora: LoRASettings = field(default_factory=LoRASettings)
    trainer: RLTrainerSettings = field(default_factory=lambda: RLTrainerSettings(max_steps=200))
    train_prompts: int = 2000
    batch_size: int = 8
    reward: Literal["model", "verifier"] = "model"


def load_arithmetic_world(folder: Path, build: bool, progress: bool) -> Any:
    """The world saved in ``folder`` by ``nabla arithmetic`` (built there with its defaults when ``build``)."""
    from nabla.worlds.arithmetic.pipeline import WORLD_FILE, Comparison, SplitSizes, World, arithmetic
    from nabla.worlds.arithmetic.task import ArithmeticTask

    ready = all((folder / part / "config.json").is_file() for part in ("policy", "reward"))
    if not ready:
        if not build:
            raise ModelNotFoundError(
                f"no trained arithmetic world in {folder}; run `nabla arithmetic --output {folder}` first or set "
                "build_world=true"
            )
        arithmetic(output=str(folder), comparison=Comparison(enabled=False), progress=progress)
    settings = json.loads((folder / WORLD_FILE).read_text())
    return World.prepare(folder, ArithmeticTask(**settings["task"]), SplitSizes(**settings["splits"]), settings["seed"])


def world_fingerprint(world: Any) -> str:
    """A digest of the world's problems and model weights: results computed on another world are never reused."""
    digest = hashlib.blake2b(digest_size=16)
    files = [world.problems_path(name) for name in ("test", "dev")]
    files += sorted(world.policy_dir.glob("*.safetensors")) + sorted(world.reward_dir.glob("*.safetensors"))
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def forget_other_world(folder: Path, fingerprint: str) -> None:
    """Delete the adapter, checkpoints and evaluation records of ``folder`` when they belong to another world."""
    marker = folder / "world_fingerprint.txt"
    if marker.is_file() and marker.read_text().strip() == fingerprint:
        return
    for part in ("rl", "adapter", "eval_base", "eval_rl", "rl.json", "report.json"):
        path = folder / part
        if path.is_dir():
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint + "\n")


def _reward(world: Any, source: str, answers: dict[str, int]) -> RewardModel:
    from nabla.reward import CallableReward, RewardModel

    if source == "model":  # the world's reward model, whichever kind it is (a PRM by default)
        return RewardModel.from_pretrained(str(world.reward_dir))
    if source == "verifier":
        from nabla.worlds.arithmetic.task import is_correct

        return CallableReward(lambda prompt, response: float(is_correct(response, answers[prompt])), name="exact")
    raise ConfigurationError(f"rl.reward must be 'model' or 'verifier' (got {source!r})")


def train_stage(world: Any, stage: RLStage, lam: float, folder: Path) -> dict[str, Any]:
    """Train (or reuse) the adapter; returns its record (settings, training cost, final metrics)."""
    from nabla.worlds.arithmetic.task import generate

    config = replace(stage.config, max_new_tokens=min(stage.config.max_new_tokens, world.max_new_tokens))
    settings = json.loads(json.dumps({"stage": asdict(stage), "lam": lam, "world": str(world.folder)}, default=str))
    record_path, adapter = folder / "rl.json", folder / "adapter"
    if record_path.is_file() and (adapter / "adapter_config.json").is_file():
        record = json.loads(record_path.read_text())
        if record["settings"] == settings:
            return record
        shutil.rmtree(folder / "eval_rl", ignore_errors=True)
        shutil.rmtree(folder / "rl", ignore_errors=True)
    from nabla.policy import Policy
    from nabla.rl.train import train_rl

    problems = generate(world.task, stage.train_prompts, seed=world.seed * 1000 + 101, exclude=world.splits.held_out())
    answers = {p.question: p.answer for p in problems}
    policy = Policy.from_pretrained(str(world.policy_dir))
    trainer_settings = replace(stage.trainer, default_root_dir=str(folder / "rl"))
    last = folder / "rl" / "checkpoints" / "last.ckpt"
    started = time.perf_counter()
    module, trainer = train_rl(
        policy,
        _reward(world, stage.reward, answers),
        list(answers),
        config=config,
        lora=stage.lora,
        settings=trainer_settings,
        batch_size=stage.batch_size,
        resume=str(last) if last.is_file() else None,
    )
    module.save_adapter(adapter)
    record = {
        "settings": settings,
        "lam": lam,
        "beta": config.beta,
        "steps": trainer.global_step,
        "training_cost": module.training_cost(),
        "session_wall_s": time.perf_counter() - started,
        "final_metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    record_path.write_text(jsonio.dumps(record, indent=2))
    return record


def kl_to_base(
    policy_dir: Path, adapter: Path, prompts: list[str], samples: int, max_new_tokens: int, seed: int
) -> dict[str, float]:
    """``KL(π_RL ‖ π_base)`` per response at temperature 1: k1 and k3 averaged over ``samples`` draws of π_RL per
    prompt; the base is the same model with the adapter disabled."""
    import torch
    from peft import PeftModel

    from nabla.baselines import derive_seed
    from nabla.policy import Policy
    from nabla.rl.kl import kl_k3
    from nabla.rl.module import padding_id, response_log_probs

    policy = Policy.from_pretrained(str(policy_dir))
    tuned = PeftModel.from_pretrained(policy.model, str(adapter))
    unit = SamplingConfig(temperature=1.0, top_p=None)
    k1_values, k3_values = [], []
    for index, prompt in enumerate(prompts):
        contexts = [policy.encode(prompt)] * samples
        generators = [torch.Generator().manual_seed(derive_seed(seed, "kl", index, j)) for j in range(samples)]
        pad = padding_id(policy)
        with torch.no_grad():
            responses = [r.token_ids for r in policy.generate(contexts, unit, generators, max_new_tokens)]
            rl = response_log_probs(tuned, contexts, responses, pad)
            with tuned.disable_adapter():
                base = response_log_probs(tuned, contexts, responses, pad)
        k1_values += (rl.sequence() - base.sequence()).tolist()
        k3_values += ((kl_k3(rl.log_probs, base.log_probs) * rl.mask).sum(-1)).tolist()
    count = len(k1_values)
    mean = sum(k1_values) / count
    spread = math.sqrt(sum((v - mean) ** 2 for v in k1_values) / max(1, count - 1) / count)
    return {"kl_k1": mean, "kl_k1_se": spread, "kl_k3": sum(k3_values) / count, "samples": count}


def break_even(training: float, rl_per_prompt: float, nabla_per_prompt: float) -> float:
    """Prompts after which ``training + P · rl_per_prompt <= P · nabla_per_prompt`` (inf: never)."""
    saving = nabla_per_prompt - rl_per_prompt
    return training / saving if saving > 0 else math.inf


def comparison_rows(
    base: list[Any], tuned: list[Any], training: dict[str, float], kl: dict[str, float], nabla_label: str
) -> list[dict[str, Any]]:
    """One row per (policy, method): accuracy, reward, KL, training and per-prompt costs, break-even."""
    nabla = next(s for s in base if s.method == nabla_label)
    rows = []
    for policy_name, summaries in (("base", base), ("RL", tuned)):
        for summary in summaries:
            row = {
                "policy": policy_name,
                "method": summary.method,
                "problems": summary.problems,
                "accuracy": summary.accuracy,
                "ci": [summary.ci_low, summary.ci_high],
                "mean_reward": summary.mean_reward,
                "kl_to_base": 0.0 if policy_name == "base" and summary.method_name != "nabla" else None,
                "inference": {k: summary.mean_cost.get(k, 0.0) for k in COST_KEYS},
                "training": {k: 0.0 for k in COST_KEYS},
                "break_even": {},
            }
            if policy_name == "RL":
                row["kl_to_base"] = kl["kl_k1"]
                row["training"] = {k: training[k] for k in COST_KEYS}
                row["break_even"] = {
                    k: break_even(training[k], row["inference"][k], nabla.mean_cost.get(k, 0.0)) for k in COST_KEYS
                }
            rows.append(row)
    return rows


def _number(value: float | None, digits: str = ".3g") -> str:
    if value is None:
        return "n/a"
    if math.isinf(value):
        return "never"
    return format(value, digits)


def markdown_table(rows: list[dict[str, Any]], title: str) -> str:
    lines = [
        f"**{title}**",
        "",
        "| policy | method | accuracy [95% CI] | mean reward | KL to base | training: calls / FLOPs / wall s "
        "| per prompt: calls / FLOPs / wall s | break-even prompts vs ∇-Reasoner (calls / FLOPs / wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        train, infer, even = row["training"], row["inference"], row["break_even"]
        trained = "–" if row["policy"] == "base" else " / ".join(_number(train[k]) for k in COST_KEYS)
        evens = "–" if not even else " / ".join(_number(even[k], ".0f") for k in COST_KEYS)
        lines.append(
            f"| {row['policy']} | {row['method']} | {row['accuracy']:.1%} [{row['ci'][0]:.1%}, {row['ci'][1]:.1%}] "
            f"| {_number(row['mean_reward'])} | {_number(row['kl_to_base'])} | {trained} "
            f"| {' / '.join(_number(infer[k]) for k in COST_KEYS)} | {evens} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """Accuracy per method (left) and cumulative FLOPs against prompts served (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['policy']} {r['method']}" for r in rows]
    accuracies = [r["accuracy"] for r in rows]
    errors = [[r["accuracy"] - r["ci"][0] for r in rows], [r["ci"][1] - r["accuracy"] for r in rows]]
    colors = ["tab:blue" if r["policy"] == "base" else "tab:orange" for r in rows]
    left.bar(range(len(rows)), accuracies, yerr=errors, color=colors, capsize=3)
    left.set_xticks(range(len(rows)), labels, rotation=25, ha="right", fontsize=8)
    left.set_ylabel("accuracy (95% Wilson CI)")
    left.set_ylim(0, 1)
    rewards = [(i, r["mean_reward"]) for i, r in enumerate(rows) if r["mean_reward"] is not None]
    if rewards:
        twin = left.twinx()
        twin.plot(*zip(*rewards), "kD", label="mean reward (right axis)")
        twin.set_ylabel("mean reward of the returned responses")
        twin.legend(fontsize=7, loc="upper center")
    finite = [r["break_even"]["flops"] for r in rows if r["break_even"] and math.isfinite(r["break_even"]["flops"])]
    horizon = max([*finite, 100.0]) * 3
    prompts = [10 ** (math.log10(horizon) * i / 199) for i in range(200)]
    for row, label in zip(rows, labels):
        if row["policy"] == "base" and row["method"].startswith("sampling"):
            continue
        cost = [row["training"]["flops"] + p * row["inference"]["flops"] for p in prompts]
        right.plot(prompts, cost, label=label)
        even = row["break_even"].get("flops") if row["break_even"] else None
        if even is not None and math.isfinite(even):
            right.scatter([even], [row["training"]["flops"] + even * row["inference"]["flops"]], marker="x", color="k")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("prompts served")
    right.set_ylabel("total FLOPs (training + inference)")
    right.legend(fontsize=7)
    right.set_title("× : break-even with ∇-Reasoner", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def rl_vs_testtime(
    world: str = "runs/arithmetic",
    build_world: bool = False,
    rl: RLStage = RLStage(),  # noqa: B008 - jsonargparse reads dataclass defaults
    optimizer: LatentOptimizer = LatentOptimizer(),  # noqa: B008
    sampler: Sampler = Sampler(),  # noqa: B008
    sampling: SamplingConfig = SamplingConfig(temperature=0.6, top_p=0.95),  # noqa: B008
    budget: int = 8,
    split: Literal["test", "dev"] = "test",
    limit: int | None = 100,
    kl_samples: int = 4,
    output: str = "runs/rl_vs_testtime",
    docs: str = "docs/results",
    threads: int | None = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """RL fine-tuning against ∇-Reasoner on the arithmetic world: accuracy, reward, KL and costs side by side.

    Args:
        world: the arithmetic world's folder (``nabla arithmetic --output``).
        build_world: build the world there with ``nabla arithmetic``'s defaults when it is missing.
        rl: the RL fine-tuning (its ``config.lam`` must equal ``optimizer.lam``).
        optimizer: ∇-Reasoner's DTO settings; ``optimizer.lam`` is the λ shared by both paths.
        sampler: ∇-Reasoner's resampling, selection and acceptance settings.
        sampling: how every sampled method (and ∇-Reasoner's rollouts) draws tokens.
        budget: ∇-Reasoner's rollout budget.
        split: the evaluation problems (never trained on).
        limit: how many of them.
        kl_samples: samples per prompt for ``KL(π_RL ‖ π_base)``.
        output: the folder of the adapter, checkpoints, evaluation records and ``report.json``.
        docs: where ``rl_vs_testtime_lam<λ>.md`` and ``rl_vs_testtime_lam<λ>.png`` are written.
        threads: torch CPU threads (1 is fastest for these small models); null: torch's default.
        progress: show progress bars.
    """
    from nabla.config import PolicySpec, RewardSpec
    from nabla.eval.datasets import DatasetSpec
    from nabla.eval.methods import MethodSpec
    from nabla.eval.runner import compare
    from nabla.worlds.arithmetic.pipeline import QUESTION_TEMPLATE

    if threads:
        import torch

        torch.set_num_threads(threads)
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    arithmetic_world = load_arithmetic_world(Path(world), build_world, progress)
    lam = optimizer.lam
    if not math.isclose(rl.config.lam, lam):
        raise ConfigurationError(
            f"the two paths must share λ: rl.config.lam={rl.config.lam:g} but optimizer.lam = reward_weight / "
            f"likelihood_weight = {lam:g}; set rl.config.lam to {lam:g}"
        )
    forget_other_world(folder, world_fingerprint(arithmetic_world))
    record = train_stage(arithmetic_world, rl, lam, folder)
    adapter = folder / "adapter"
    length = arithmetic_world.max_new_tokens
    dataset = DatasetSpec(
        name="jsonl",
        path=str(arithmetic_world.problems_path(split)),
        question_field="problem",
        answer_field="answer",
        id_field="id",
        prompt_template=QUESTION_TEMPLATE,
    )
    reward_spec = RewardSpec(kind="classifier", name_or_path=str(arithmetic_world.reward_dir))
    common = {"sampling": sampling, "max_new_tokens": length}
    nabla = MethodSpec("nabla", n=budget, optimizer=optimizer, sampler=sampler, **common)  # type: ignore[arg-type]
    count = limit or len(arithmetic_world.problems(split))
    heading = f"arithmetic world · {split} · {count} problems · λ = {lam:g} · RL reward: {rl.reward}"
    base = compare(
        policy=PolicySpec(name_or_path=str(arithmetic_world.policy_dir)),
        reward=reward_spec,
        dataset=dataset,
        methods=[MethodSpec("greedy", **common), MethodSpec("sampling", **common), nabla],  # type: ignore[arg-type]
        output=str(folder / "eval_base"),
        limit=limit,
        seed=arithmetic_world.seed,
        progress=progress,
        title=f"{heading} · base policy",
    )
    tuned = compare(
        policy=PolicySpec(name_or_path=str(arithmetic_world.policy_dir), adapter=str(adapter)),
        reward=reward_spec,
        dataset=dataset,
        methods=[MethodSpec("greedy", **common), MethodSpec("sampling", **common)],  # type: ignore[arg-type]
        output=str(folder / "eval_rl"),
        limit=limit,
        seed=arithmetic_world.seed,
        progress=progress,
        title=f"{heading} · RL policy",
    )
    prompts = [p.question for p in arithmetic_world.problems(split)[:count]]
    kl = kl_to_base(arithmetic_world.policy_dir, adapter, prompts, kl_samples, length, arithmetic_world.seed)
    rows = comparison_rows(base, tuned, record["training_cost"], kl, nabla.display_label)
    world_report = arithmetic_world.folder / "report.json"
    report = {
        "rl": record,
        "kl": kl,
        "rows": rows,
        "title": heading,
        "world": json.loads(world_report.read_text()) if world_report.is_file() else None,
        "world_fingerprint": world_fingerprint(arithmetic_world),
    }
    (folder / "report.json").write_text(jsonio.dumps(report, indent=2))
    docs_folder = Path(docs)
    docs_folder.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, heading)
    stem = f"rl_vs_testtime_lam{lam:g}" + ("" if rl.reward == "model" else f"_{rl.reward}")
    (docs_folder / f"{stem}.md").write_text(table)
    plot(rows, docs_folder / f"{stem}.png", heading)
    print(table)
    return rows
