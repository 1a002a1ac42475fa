"""The measured duality check: how close each path gets to ρ* on the enumerable world.

For each λ and prompt, the total-variation distance to ``ρ* ∝ π_ref · exp(λ r)`` of

- ``pi_ref``: the base policy itself (exact);
- ``rl_exact``: the LoRA policy that maximises the RL objective computed exactly by enumeration
  (``E_π[λ r] - KL(π ‖ π_ref) = -KL(π ‖ ρ*) + const``): what this adapter can reach at best (exact);
- ``rl_{k1,k3}_{rloo,grpo}``: :class:`nabla.rl.KLRegularizedRL` trained on samples (k1 in the reward or k3 in
  the loss; RLOO or GRPO advantages), its distribution computed exactly after training;
- ``nabla`` / ``nabla_no_rejection`` / ``nabla_metropolis``: the empirical distribution of
  :meth:`nabla.TestTimeTrainer.fit` over many seeds (rollouts and resampling at temperature 1 so that the base
  measure is π_ref; every position optimised), with the paper's acceptance, none, or the Metropolis test;
- ``langevin`` / ``langevin_noise_only``: the empirical distribution of :func:`langevin_sample` over as many seeds
  (the second without the gradient step);
- ``mcmc`` / ``mcmc@N`` / ``dula``: the empirical distribution of :class:`nabla.MCMCSampler` (DMALA) at its
  recommended step count / at ``N`` steps / without its Metropolis test;
- ``nabla_exact`` / ``nabla_no_rejection_exact`` / ``nabla_metropolis_exact`` (``@S``): the exact law of the
  ∇-Reasoner rows' output, by enumerating the loop's transitions (:mod:`nabla.worlds.enumerable.loop`; after ``S``
  sweeps of the Metropolis loop instead of the loop's one);

beside the sampling-noise floor: the TV of an empirical distribution of the same size drawn from ρ* itself
(and from π_ref, for the distance to π_ref). Rows go to a JSONL file as they finish; a rerun skips them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import Tensor

from nabla import jsonio
from nabla.cost import CostMeter
from nabla.mcmc import MCMCSampler
from nabla.optimizer import LatentOptimizer
from nabla.rl.kl import exact_kl, total_variation
from nabla.rl.module import LoRASettings, RLConfig, attach_lora, response_log_probs
from nabla.rl.train import RLTrainerSettings, train_rl
from nabla.sampler import Sampler, SamplingConfig, TokenSelection
from nabla.trainer import TestTimeTrainer
from nabla.worlds.enumerable.command import (
    MCMC_PREFIX,
    METHODS,
    NABLA_METHODS,
    RL_METHODS,
    SWEEPS_PREFIX,
    DualitySettings,
    LangevinDTO,
    count_suffix,
    loop_sweeps,
    mcmc_steps,
)
from nabla.worlds.enumerable.langevin import langevin_sample
from nabla.worlds.enumerable.loop import LoopChain, loop_law
from nabla.worlds.enumerable.world import EnumerableWorld, build_world, load_world, save_world


def method_order(method: str) -> tuple[int, int]:
    """Table and legend order: :data:`METHODS`, the ``mcmc@N`` rows by N just before ``mcmc``, the
    ``nabla_metropolis_exact@N`` rows by N after ``nabla_metropolis_exact``."""
    if (steps := count_suffix(method, MCMC_PREFIX)) is not None:
        return METHODS.index("mcmc"), steps - 10**9
    if (sweeps := count_suffix(method, SWEEPS_PREFIX)) is not None:
        return METHODS.index("nabla_metropolis_exact"), sweeps
    return METHODS.index(method), 0


def lora_settings(settings: DualitySettings) -> LoRASettings:
    return LoRASettings(r=settings.lora_rank, alpha=2 * settings.lora_rank, target_modules=list(settings.lora_targets))


def noise_floor(target: Tensor, samples: int, repeats: int, seed: int) -> tuple[float, float]:
    """Mean and standard deviation of the TV between ``target`` and the empirical distribution of ``samples``
    draws from it."""
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(repeats):
        draws = torch.multinomial(target.float(), samples, replacement=True, generator=generator)
        empirical = torch.bincount(draws, minlength=len(target)).double() / samples
        values.append(total_variation(empirical, target))
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))


def fresh_world(settings: DualitySettings, folder: Path) -> EnumerableWorld:
    """The world of these settings, built once and saved (see ``world_folder``), then reloaded untouched."""
    saved = Path(settings.world_folder) if settings.world_folder else folder / f"world_seed{settings.world_seed}"
    if not (saved / "policy" / "config.json").is_file():
        save_world(build_world(settings.world_seed, settings.prompts, settings.max_new_tokens), saved)
    return load_world(saved, settings.prompts, settings.max_new_tokens)


def exact_rl(world: EnumerableWorld, lam: float, settings: DualitySettings) -> tuple[dict[str, Tensor], float]:
    """Minimise ``Σ_x KL(π_θ ‖ ρ*_x)`` over a LoRA adapter by enumeration; returns the exact distributions."""
    attach = attach_lora(world.policy, lora_settings(settings))
    responses = world.responses()
    targets = {p: torch.log(world.rho_star(p, lam)) for p in world.prompts}
    contexts = {p: [world.policy.encode(p)] * len(responses) for p in world.prompts}
    parameters = [p for p in attach.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=settings.exact_lr)
    decay = lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * step / settings.exact_steps))  # noqa: E731
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    started = time.perf_counter()
    for _ in range(settings.exact_steps):
        optimizer.zero_grad()
        loss = torch.zeros(())
        for prompt in world.prompts:
            log_q = response_log_probs(attach, contexts[prompt], responses, 0).sequence().double()
            loss = loss + exact_kl(log_q, targets[prompt])
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - started
    return {p: world.log_probs(p, attach).exp() for p in world.prompts}, seconds


class ExactTVTracker(L.Callback):
    """Records the exact TV of the policy being trained to ρ* (a learning curve): before the first step, at
    steps 1, 2, 5, 10, 20, 50 and every ``every`` steps."""

    EARLY = (1, 2, 5, 10, 20, 50)

    def __init__(self, world: EnumerableWorld, targets: dict[str, Tensor], every: int) -> None:
        self.world, self.targets, self.every = world, targets, every
        self.curve: list[dict[str, float]] = []

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        self._record(0, module)

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step in self.EARLY or step % self.every == 0 or step == trainer.max_steps:
            self._record(step, module)

    def _record(self, step: int, module: Any) -> None:
        tvs = [total_variation(self.world.log_probs(p, module.model).exp(), t) for p, t in self.targets.items()]
        cost = module.cost.snapshot()
        self.curve.append(
            {"step": step, "tv": sum(tvs) / len(tvs), "model_calls": cost["model_calls"], "flops": cost["flops"]}
        )


def sampled_rl(
    world: EnumerableWorld, lam: float, settings: DualitySettings, placement: str, advantage: str, folder: Path
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    targets = {p: world.rho_star(p, lam) for p in world.prompts}
    config = RLConfig(
        lam=lam,
        kl_placement=placement,  # type: ignore[arg-type]
        advantage=advantage,  # type: ignore[arg-type]
        group_size=settings.rl_group_size,
        lr=settings.rl_lr,
        lr_decay=True,
        max_new_tokens=settings.max_new_tokens,
        seed=settings.world_seed,
    )
    tracker = ExactTVTracker(world, targets, every=max(1, settings.rl_steps // 20))
    trainer_settings = RLTrainerSettings(
        max_steps=settings.rl_steps, default_root_dir=str(folder), checkpoint_every_n_steps=0, progress=False
    )
    module, _ = train_rl(
        world.policy,
        world.reward,
        world.prompts,
        config=config,
        lora=lora_settings(settings),
        settings=trainer_settings,
        batch_size=len(world.prompts),
        callbacks=[tracker],
    )
    distributions = {p: world.log_probs(p, module.model).exp() for p in world.prompts}
    return distributions, {"curve": tracker.curve, "training_cost": module.training_cost()}


def add_stats(totals: dict[str, float], stats: dict[str, Any]) -> None:
    """Sum a sample's cost snapshot into ``totals`` (its number kinds only)."""
    for key, value in stats.items():
        if isinstance(value, (int, float)):
            totals[key] = totals.get(key, 0.0) + float(value)


def nabla_trainer(world: EnumerableWorld, lam: float, settings: DualitySettings, method: str) -> TestTimeTrainer:
    """∇-Reasoner as this check runs it: rollouts and resampling at temperature 1 (π_ref is the base measure),
    every position optimised, the acceptance of ``method`` (``nabla``, ``nabla_no_rejection`` or
    ``nabla_metropolis``)."""
    unit = SamplingConfig(temperature=1.0, top_p=None)
    metropolis = method == "nabla_metropolis"
    return TestTimeTrainer(
        world.policy,
        world.reward,
        LatentOptimizer(steps=settings.dto_steps, lr=settings.dto_lr, reward_weight=lam, likelihood_weight=1.0),
        Sampler(
            rollout=unit,
            resample=unit,
            selection=TokenSelection(max_confidence=None, min_entropy=None, min_grad_norm=None),
            rejection_sampling=method != "nabla_no_rejection",
            acceptance="metropolis" if metropolis else "reward",
            target_lam=lam if metropolis else None,
            max_rollouts=settings.max_rollouts,
            max_new_tokens=settings.max_new_tokens,
        ),
        enable_progress_bar=False,
    )


def nabla_samples(
    world: EnumerableWorld, lam: float, settings: DualitySettings, method: str, meter_totals: dict[str, float]
) -> dict[str, list[list[int]]]:
    trainer = nabla_trainer(world, lam, settings, method)
    out: dict[str, list[list[int]]] = {}
    for prompt in world.prompts:
        results = []
        for start in range(0, settings.samples, 100):
            count = min(100, settings.samples - start)
            results += trainer.fit_batch([prompt] * count, seeds=list(range(start, start + count)))
        out[prompt] = [r.token_ids for r in results]
        for result in results:
            add_stats(meter_totals, result.stats)
    return out


def langevin_samples(
    world: EnumerableWorld, lam: float, settings: DualitySettings, meter_totals: dict[str, float], drift: bool = True
) -> dict[str, list[list[int]]]:
    langevin = LangevinDTO(**{**asdict(settings.langevin), "lam": lam, "drift": drift})
    meter = CostMeter()
    out = {}
    for prompt in world.prompts:
        out[prompt] = [
            langevin_sample(langevin, world.policy, world.reward, prompt, torch.Generator().manual_seed(seed),
                            settings.max_new_tokens, meter).response
            for seed in range(settings.samples)
        ]  # fmt: skip
    add_stats(meter_totals, meter.snapshot())
    return out


def mcmc_samples(
    world: EnumerableWorld,
    lam: float,
    settings: DualitySettings,
    steps: int,
    metropolis: bool,
    totals: dict[str, float],
) -> dict[str, list[list[int]]]:
    """Samples of :class:`MCMCSampler` at this row's λ and step count, ``settings.samples`` seeds per prompt."""
    mcmc = replace(settings.mcmc, lam=lam, steps=steps, metropolis=metropolis, max_new_tokens=settings.max_new_tokens)
    sampler = MCMCSampler(world.policy, world.reward, mcmc)
    out: dict[str, list[list[int]]] = {}
    for prompt in world.prompts:
        results = sampler.sample_batch([prompt] * settings.samples, seeds=list(range(settings.samples)))
        out[prompt] = [r.token_ids for r in results]
        for result in results:
            add_stats(totals, result.stats)
    return out


def per_sample(totals: dict[str, float], samples: int) -> dict[str, float | None]:
    """Mean cost of one response: model calls, FLOPs, objective evaluations (LM+RM forward and backward at one
    text: counted by their LM backward pass), proposals; and the acceptance rate of the proposals."""
    proposals = totals.get("proposals", 0.0)
    return {
        "model_calls": totals.get("model_calls", 0.0) / samples,
        "flops": totals.get("flops", 0.0) / samples,
        "evaluations": totals.get("lm_backward", 0.0) / samples,
        "proposals": proposals / samples,
        "acceptance_rate": totals.get("acceptances", 0.0) / proposals if proposals else None,
    }


def measure(method: str, lam: float, settings: DualitySettings, folder: Path) -> dict[str, Any]:
    """One row: the method's TV to ρ* (and to π_ref) per prompt and on average, with its cost."""
    world = fresh_world(settings, folder)  # every method starts from the same untouched π_ref
    pi_ref = {p: world.log_probs(p).exp() for p in world.prompts}
    rho = {p: world.rho_star(p, lam) for p in world.prompts}
    row: dict[str, Any] = {"method": method, "lam": lam, "samples": None}
    started = time.perf_counter()
    cost: dict[str, float] = {}
    empirical = False
    if method == "pi_ref":
        distributions = pi_ref
    elif method == "rl_exact":
        distributions, _ = exact_rl(world, lam, settings)
    elif method in RL_METHODS:
        placement, advantage = RL_METHODS[method]
        distributions, extra = sampled_rl(world, lam, settings, placement, advantage, folder / f"{method}_{lam:g}")
        row.update(extra)
        cost = {k: extra["training_cost"][k] for k in ("model_calls", "flops")}
    elif method in NABLA_METHODS:
        samples = nabla_samples(world, lam, settings, method, cost)
        distributions, empirical = {p: world.distribution(s) for p, s in samples.items()}, True
    elif method in ("langevin", "langevin_noise_only"):
        samples = langevin_samples(world, lam, settings, cost, drift=method == "langevin")
        distributions, empirical = {p: world.distribution(s) for p, s in samples.items()}, True
    elif (loop := loop_sweeps(method)) is not None:
        rule, sweeps = loop
        name = {"reward": "nabla", "always": "nabla_no_rejection", "metropolis": "nabla_metropolis"}[rule]
        trainer = nabla_trainer(world, lam, settings, name)
        distributions = {p: loop_law(LoopChain(world, trainer, p), rule, sweeps) for p in world.prompts}
        row["sweeps"] = sweeps
    elif (steps := mcmc_steps(method, settings)) is not None:
        samples = mcmc_samples(world, lam, settings, steps, method != "dula", cost)
        distributions, empirical = {p: world.distribution(s) for p, s in samples.items()}, True
        row["steps"] = steps
    else:
        raise ValueError(
            f"unknown method {method!r}; choose from {', '.join(METHODS)}, mcmc@<steps>, {SWEEPS_PREFIX}<n>"
        )
    row["seconds"] = time.perf_counter() - started
    row["cost"] = cost
    prompts = world.prompts
    row["tv_rho"] = {p: total_variation(distributions[p], rho[p]) for p in prompts}
    row["tv_pi_ref"] = {p: total_variation(distributions[p], pi_ref[p]) for p in prompts}
    uniform = torch.full((len(world.responses()),), 1.0 / len(world.responses()), dtype=torch.float64)
    row["tv_uniform"] = {p: total_variation(distributions[p], uniform) for p in prompts}
    row["distributions"] = {p: distributions[p].tolist() for p in prompts}
    rewards = {p: world.rewards(p) for p in prompts}
    row["mean_reward"] = {p: float((distributions[p] * rewards[p]).sum()) for p in prompts}
    row["rho_mean_reward"] = {p: float((rho[p] * rewards[p]).sum()) for p in prompts}
    if empirical:
        row["samples"] = settings.samples
        row["per_sample"] = per_sample(cost, settings.samples * len(prompts))
        seed = int(lam * 1000) + settings.world_seed
        row["floor_rho"] = {p: noise_floor(rho[p], settings.samples, settings.noise_repeats, seed) for p in prompts}
        row["floor_pi_ref"] = {
            p: noise_floor(pi_ref[p], settings.samples, settings.noise_repeats, seed + 1) for p in prompts
        }
    for key in ("tv_rho", "tv_pi_ref", "tv_uniform", "mean_reward", "rho_mean_reward"):
        row[f"{key}_mean"] = sum(row[key].values()) / len(prompts)
    return row


def run_duality(
    settings: DualitySettings, folder: Path, on_row: Callable[[dict[str, Any]], None] | None = None
) -> list[dict[str, Any]]:
    """Every (method, λ) row, appended to ``folder/duality.jsonl``; rows already there are kept and skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    records = folder / "duality.jsonl"
    rows = [json.loads(line) for line in records.read_text().splitlines()] if records.is_file() else []
    done = {(r["method"], r["lam"]) for r in rows}
    todo = [(m, lam) for lam in settings.lams for m in settings.methods if (m, lam) not in done]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("duality", total=len(todo))
        for method, lam in todo:
            progress.update(task, description=f"{method} λ={lam:g}")
            row = measure(method, lam, settings, folder)
            rows.append(row)
            with records.open("a") as handle:
                handle.write(jsonio.dumps(row) + "\n")
            if on_row is not None:
                on_row(row)
            progress.advance(task)
    return rows


LABELS = {
    "pi_ref": "π_ref (no optimisation)",
    "rl_exact": "RL, exact objective by enumeration",
    "rl_k1_rloo": "RL sampled: k1 in reward, RLOO",
    "rl_k1_grpo": "RL sampled: k1 in reward, GRPO",
    "rl_k3_rloo": "RL sampled: k3 in loss, RLOO",
    "rl_k3_grpo": "RL sampled: k3 in loss, GRPO",
    "nabla": "∇-Reasoner (DTO + rejection)",
    "nabla_no_rejection": "∇-Reasoner without rejection",
    "nabla_metropolis": "∇-Reasoner, Metropolis acceptance",
    "langevin": "Langevin DTO",
    "langevin_noise_only": "Langevin DTO, noise only (no drift)",
    "dula": "discrete Langevin without the MH test (DULA)",
    "mcmc": "DMALA sampler (mcmc)",
    "nabla_exact": "∇-Reasoner (DTO + rejection): exact law of its output",
    "nabla_no_rejection_exact": "∇-Reasoner without rejection: exact law",
    "nabla_metropolis_exact": "∇-Reasoner, Metropolis acceptance: exact law",
}


def method_label(method: str, row: dict[str, Any] | None = None) -> str:
    """The display name of a method; MCMC rows name their step count."""
    steps = row.get("steps") if row else None
    if method.startswith(MCMC_PREFIX):
        return f"DMALA sampler, {method[len(MCMC_PREFIX) :]} steps"
    if method.startswith(SWEEPS_PREFIX):
        return f"∇-Reasoner, Metropolis acceptance: exact law after {method[len(SWEEPS_PREFIX) :]} sweeps"
    if method in ("mcmc", "dula") and steps is not None:
        return f"{LABELS[method]}, {steps} steps"
    return LABELS[method]


def ordered_methods(rows: list[dict[str, Any]]) -> list[str]:
    return sorted({r["method"] for r in rows}, key=method_order)


def duality_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: TV to ρ* (mean over prompts) per method and λ, with mean reward and the noise floors."""
    lams = sorted({r["lam"] for r in rows})
    by_key = {(r["method"], r["lam"]): r for r in rows}
    header = "| method | " + " | ".join(f"TV to ρ*, λ={lam:g}" for lam in lams) + " | "
    header += " | ".join(f"E[r], λ={lam:g}" for lam in lams) + " |"
    lines = [header, "|---" * (1 + 2 * len(lams)) + "|"]
    for method in ordered_methods(rows):
        cells = [_cell(by_key.get((method, lam)), "tv_rho_mean") for lam in lams]
        cells += [_cell(by_key.get((method, lam)), "mean_reward_mean") for lam in lams]
        first = next(by_key[(method, lam)] for lam in lams if (method, lam) in by_key)
        lines.append(f"| {method_label(method, first)} | " + " | ".join(cells) + " |")
    floors = [next((r for r in rows if r["lam"] == lam and r.get("floor_rho")), None) for lam in lams]
    if any(floors):
        cells = [_floor(f, "floor_rho") for f in floors]
        lines.append(f"| noise floor: N draws from ρ* itself | {' | '.join(cells)} |" + " |" * len(lams))
    optimum = [next((r for r in rows if r["lam"] == lam), None) for lam in lams]
    cells = ["" for _ in lams] + [_cell(r, "rho_mean_reward_mean") for r in optimum]
    lines.append("| ρ* itself | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cost_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per response, the acceptance rate of the proposals, objective evaluations and model calls, per
    method and λ (sampled methods only)."""
    lams = sorted({r["lam"] for r in rows})
    by_key = {(r["method"], r["lam"]): r for r in rows}
    parts = [("acceptance", "acceptance_rate", "{:.2f}"), ("evaluations", "evaluations", "{:.1f}")]
    parts.append(("model calls", "model_calls", "{:.1f}"))
    header = "| method | " + " | ".join(f"{name}, λ={lam:g}" for name, _, _ in parts for lam in lams) + " |"
    lines = [header, "|---" * (1 + len(parts) * len(lams)) + "|"]
    for method in ordered_methods(rows):
        keyed = [by_key.get((method, lam)) for lam in lams]
        if not any(r and r.get("per_sample") for r in keyed):
            continue
        cells = []
        for _, key, form in parts:
            for r in keyed:
                value = (r.get("per_sample") or {}).get(key) if r else None
                cells.append("–" if value is None else form.format(value))
        first = next(r for r in keyed if r)
        lines.append(f"| {method_label(method, first)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def lam_key(lam: float) -> str:
    return f"{lam:g}"


def duality_summary(rows: list[dict[str, Any]], floors: dict[float, float]) -> dict[str, Any]:
    """``duality.json``: ``tv[method][λ]`` and ``noise_floor[λ]`` (λ as ``"1"``, ``"4"``, ``"16"``), with mean
    rewards, ρ*'s, and per-response acceptance rates, evaluations and model calls of the sampled methods."""
    out: dict[str, Any] = {"tv": {}, "noise_floor": {lam_key(lam): floor for lam, floor in sorted(floors.items())}}
    for key in ("tv_pi_ref", "mean_reward", "acceptance_rate", "evaluations_per_sample", "model_calls_per_sample"):
        out[key] = {}
    out["rho_mean_reward"] = {}
    for row in sorted(rows, key=lambda r: (method_order(r["method"]), r["lam"])):
        method, lam = row["method"], lam_key(row["lam"])
        out["tv"].setdefault(method, {})[lam] = row["tv_rho_mean"]
        out["tv_pi_ref"].setdefault(method, {})[lam] = row["tv_pi_ref_mean"]
        out["mean_reward"].setdefault(method, {})[lam] = row["mean_reward_mean"]
        out["rho_mean_reward"][lam] = row["rho_mean_reward_mean"]
        cost = row.get("per_sample")
        if cost:
            out["acceptance_rate"].setdefault(method, {})[lam] = cost["acceptance_rate"]
            out["evaluations_per_sample"].setdefault(method, {})[lam] = cost["evaluations"]
            out["model_calls_per_sample"].setdefault(method, {})[lam] = cost["model_calls"]
    return out


def noise_floors(settings: DualitySettings, folder: Path) -> dict[float, float]:
    """The noise floor at each λ: mean over prompts of the TV of ``samples`` draws from ρ* (as in the rows)."""
    world = fresh_world(settings, folder)
    floors = {}
    for lam in settings.lams:
        seed = int(lam * 1000) + settings.world_seed
        values = [
            noise_floor(world.rho_star(p, lam), settings.samples, settings.noise_repeats, seed)[0]
            for p in world.prompts
        ]
        floors[lam] = sum(values) / len(values)
    return floors


def _cell(row: dict[str, Any] | None, key: str) -> str:
    return "–" if row is None else f"{row[key]:.3f}"


def _floor(row: dict[str, Any] | None, key: str) -> str:
    if row is None:
        return "–"
    means = [value[0] for value in row[key].values()]
    spreads = [value[1] for value in row[key].values()]
    return f"{sum(means) / len(means):.3f} ± {sum(spreads) / len(spreads):.3f}"


def duality_plots(rows: list[dict[str, Any]], folder: Path) -> list[Path]:
    """``duality_tv.png`` (TV to ρ* against λ) and ``duality_rl_curves.png`` (RL learning curves)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    lams = sorted({r["lam"] for r in rows})
    by_key = {(r["method"], r["lam"]): r for r in rows}
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    for method in ordered_methods(rows):
        points = [(lam, by_key[(method, lam)]["tv_rho_mean"]) for lam in lams if (method, lam) in by_key]
        if points:
            style = "--" if method == "pi_ref" else "-"
            axis.plot(*zip(*points), style, marker="o", label=method_label(method, by_key[(method, points[0][0])]))
    floors = [
        (lam, r) for lam in lams for r in [next((x for x in rows if x["lam"] == lam and x.get("floor_rho")), None)] if r
    ]
    if floors:
        means = [sum(v[0] for v in r["floor_rho"].values()) / len(r["floor_rho"]) for _, r in floors]
        spreads = [sum(v[1] for v in r["floor_rho"].values()) / len(r["floor_rho"]) for _, r in floors]
        xs = [lam for lam, _ in floors]
        low, high = [m - s for m, s in zip(means, spreads)], [m + s for m, s in zip(means, spreads)]
        label = f"noise floor ({floors[0][1]['samples']} draws from ρ*)"
        axis.fill_between(xs, low, high, color="grey", alpha=0.3, label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("λ  (ρ* ∝ π_ref · exp(λ r);  RL β = 1/λ)")
    axis.set_ylabel("total variation to ρ*  (mean over prompts)")
    axis.set_ylim(0, 1)
    axis.set_title("Enumerable world: how close each path gets to ρ*")
    axis.legend(fontsize=7, loc="upper left")
    figure.tight_layout()
    tv_path = folder / "duality_tv.png"
    figure.savefig(tv_path, dpi=130)
    plt.close(figure)

    figure, axes = plt.subplots(1, len(lams), figsize=(4 * len(lams), 3.6), sharey=True, squeeze=False)
    for axis, lam in zip(axes[0], lams):
        for method in RL_METHODS:
            row = by_key.get((method, lam))
            if row and row.get("curve"):
                axis.plot([c["step"] for c in row["curve"]], [c["tv"] for c in row["curve"]], label=LABELS[method])
        for method, style in (
            ("pi_ref", "k--"),
            ("rl_exact", "k:"),
            ("nabla", "r--"),
            ("langevin", "m--"),
            ("mcmc", "g--"),
        ):
            row = by_key.get((method, lam))
            if row:
                axis.axhline(row["tv_rho_mean"], linestyle=style[1:], color=style[0], label=LABELS[method], lw=1)
        axis.set_title(f"λ = {lam:g}")
        axis.set_xscale("symlog", linthresh=1)
        axis.set_xlim(left=0)
        axis.set_xlabel("RL step (symlog)")
    axes[0][0].set_ylabel("TV to ρ* (exact)")
    axes[0][-1].legend(fontsize=6)
    figure.tight_layout()
    curve_path = folder / "duality_rl_curves.png"
    figure.savefig(curve_path, dpi=130)
    plt.close(figure)
    return [tv_path, curve_path, tv_cost_plot(rows, folder)]


def tv_cost_plot(rows: list[dict[str, Any]], folder: Path) -> Path:
    """``duality_tv_cost.png``: TV to ρ* against objective evaluations per response, one panel per λ; the DMALA
    rows (``mcmc@N``, ``mcmc``) joined by step count, π_ref and the best RL row as reference lines, the noise
    floor as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = sorted({r["lam"] for r in rows})
    by_key = {(r["method"], r["lam"]): r for r in rows}
    figure, axes = plt.subplots(1, len(lams), figsize=(4.6 * len(lams), 5.4), squeeze=False)
    most = max((r["per_sample"]["evaluations"] for r in rows if r.get("per_sample")), default=1.0)
    markers = dict(
        zip(("nabla", "nabla_no_rejection", "nabla_metropolis", "langevin", "langevin_noise_only", "dula"), "s^vDdx")
    )
    for axis, lam in zip(axes[0], lams):
        chain = sorted(
            (by_key[(m, lam)]["per_sample"]["evaluations"], by_key[(m, lam)]["tv_rho_mean"])
            for m in {r["method"] for r in rows}
            if (m, lam) in by_key and (m == "mcmc" or m.startswith(MCMC_PREFIX)) and by_key[(m, lam)].get("per_sample")
        )  # fmt: skip
        if chain:
            axis.plot(*zip(*chain), "g-o", label="DMALA sampler (mcmc), by step count")
        for method, marker in markers.items():
            row = by_key.get((method, lam))
            if row and row.get("per_sample"):
                point = (row["per_sample"]["evaluations"], row["tv_rho_mean"])
                axis.plot(*point, marker, ms=8, label=method_label(method, row))
        for method, style in (("pi_ref", "k--"), ("rl_k1_rloo", "k:")):
            row = by_key.get((method, lam))
            if row:
                axis.axhline(row["tv_rho_mean"], linestyle=style[1:], color=style[0], lw=1, label=method_label(method))
        floor = next((r for r in rows if r["lam"] == lam and r.get("floor_rho")), None)
        if floor:
            mean = sum(v[0] for v in floor["floor_rho"].values()) / len(floor["floor_rho"])
            spread = sum(v[1] for v in floor["floor_rho"].values()) / len(floor["floor_rho"])
            axis.axhspan(
                mean - spread, mean + spread, color="grey", alpha=0.3, label=f"noise floor ({floor['samples']} draws)"
            )
        axis.set_xscale("symlog", linthresh=1)
        axis.set_xlim(0, 2.0 * most)
        axis.set_yscale("log")
        axis.set_ylim(3e-3, 1)
        axis.set_title(f"λ = {lam:g}")
        axis.set_xlabel("objective evaluations per response (symlog)")
    axes[0][0].set_ylabel("TV to ρ*  (mean over prompts, log)")
    handles: dict[str, Any] = {}
    for axis in axes[0]:
        for handle, name in zip(*axis.get_legend_handles_labels()):
            handles.setdefault(name, handle)
    figure.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0.16, 1, 1))
    path = folder / "duality_tv_cost.png"
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return path


def run_check(settings: DualitySettings, folder: str, docs: str, threads: int) -> list[dict[str, Any]]:
    """``nabla duality`` (:func:`nabla.worlds.enumerable.command.duality`): the rows, ``duality.json``, tables
    and plots."""
    from nabla.rl.train import quiet_lightning

    torch.set_num_threads(threads)
    quiet_lightning()
    rows = run_duality(settings, Path(folder))
    summary = duality_summary(rows, noise_floors(settings, Path(folder)))
    (Path(folder) / "duality.json").write_text(jsonio.dumps(summary, indent=2))
    docs_folder = Path(docs)
    docs_folder.mkdir(parents=True, exist_ok=True)
    costs = cost_table(rows)
    tables = duality_table(rows) + ("\nPer response (sampled methods):\n\n" + costs if costs else "")
    (docs_folder / "duality_table.md").write_text(tables)
    duality_plots(rows, docs_folder)
    print(tables)
    return rows
