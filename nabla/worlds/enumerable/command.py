"""``nabla duality``: its settings and entry point, importable without torch (the command line builds its parser
from them; the check itself is :mod:`nabla.worlds.enumerable.duality`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nabla.errors import ConfigurationError, require_finite
from nabla.mcmc import MCMCSettings


@dataclass
class LangevinDTO:
    """Settings of Langevin DTO.

    Args:
        lam: λ of ``L = -λ r - log π``.
        steps: Langevin steps.
        step_size: η; the noise standard deviation per step is ``√(2η)``.
        noise: add the Gaussian term (``False``: plain straight-through gradient descent, for ablation).
        drift: take the gradient step (``False``: noise alone and the argmax read-out, no objective evaluation;
            the ablation that shows how much of the chain's output the gradient decides).
        temperature: τ of the straight-through softmax.
    """

    lam: float = 4.0
    steps: int = 50
    step_size: float = 0.01
    noise: bool = True
    temperature: float = 1.0
    drift: bool = True

    def __post_init__(self) -> None:
        require_finite(self)
        if self.lam < 0 or self.steps < 1 or not self.step_size > 0 or not self.temperature > 0:
            raise ConfigurationError("LangevinDTO needs lam >= 0, steps >= 1, step_size > 0 and temperature > 0")


LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RL_METHODS = {
    "rl_k1_rloo": ("reward", "rloo"),
    "rl_k1_grpo": ("reward", "grpo"),
    "rl_k3_rloo": ("loss", "rloo"),
    "rl_k3_grpo": ("loss", "grpo"),
}
#: The ``mcmc`` row's step count: the fewest of those measured with TV within 1.5x of the noise floor at every λ
#: (docs/duality.md, "Results": 20 steps is not enough at λ = 16).
RECOMMENDED_STEPS = 60
NABLA_METHODS = ("nabla", "nabla_no_rejection", "nabla_metropolis")
METHODS = (
    "pi_ref",
    "rl_exact",
    *RL_METHODS,
    *NABLA_METHODS,
    "langevin",
    "langevin_noise_only",
    "dula",
    "mcmc",
    "nabla_exact",
    "nabla_no_rejection_exact",
    "nabla_metropolis_exact",
)
#: the extra step-count rows of the sampler: ``mcmc@<steps>``
MCMC_PREFIX = "mcmc@"
#: exact output laws of ∇-Reasoner's loop (by enumeration, nabla/worlds/enumerable/loop.py): method -> acceptance rule;
#: ``nabla_metropolis_exact@<sweeps>`` is the law after that many sweeps of the Metropolis loop
EXACT_LOOP = {"nabla_exact": "reward", "nabla_no_rejection_exact": "always", "nabla_metropolis_exact": "metropolis"}
SWEEPS_PREFIX = "nabla_metropolis_exact@"


def count_suffix(method: str, prefix: str) -> int | None:
    rest = method[len(prefix) :] if method.startswith(prefix) else ""
    return int(rest) if rest.isdigit() else None


def mcmc_steps(method: str, settings: DualitySettings) -> int | None:
    """The step count of an MCMC row (``mcmc``: the settings' own, ``mcmc@N``: N); ``None`` for other methods."""
    if method in ("mcmc", "dula"):
        return settings.mcmc.steps
    return count_suffix(method, MCMC_PREFIX)


def loop_sweeps(method: str) -> tuple[str, int] | None:
    """The acceptance rule and number of sweeps of an exact-loop row; ``None`` for other methods."""
    if method in EXACT_LOOP:
        return EXACT_LOOP[method], 1
    sweeps = count_suffix(method, SWEEPS_PREFIX)
    return ("metropolis", sweeps) if sweeps else None


def known_method(method: str) -> bool:
    return method in METHODS or count_suffix(method, MCMC_PREFIX) is not None or loop_sweeps(method) is not None


@dataclass
class DualitySettings:
    """What the duality check runs.

    Args:
        lams: the λ values (``ρ* ∝ π_ref · exp(λ r)``; the RL runs use β = 1/λ, DTO ``reward_weight = λ``,
            ``likelihood_weight = 1``).
        samples: seeds per prompt for the empirical methods (∇-Reasoner, Langevin) and the noise floor.
        world_seed, prompts, max_new_tokens: the world.
        methods: which of :data:`METHODS` to run.
        rl_steps, rl_group_size, rl_lr: the sampled RL runs (both prompts in every batch).
        lora_rank, lora_targets: the adapter. The output head is adapted too: behind a frozen final RMSNorm and
            a frozen head the logits are bounded, and a peaked ρ* (large λ) is out of reach.
        exact_steps, exact_lr: Adam on the exact objective (cosine decay to 1% of exact_lr).
        dto_steps, dto_lr: ∇-Reasoner's DTO (paper defaults: 20 steps, lr 0.01).
        max_rollouts: ∇-Reasoner's rollout budget.
        langevin: Langevin-DTO settings (its λ is set per row).
        mcmc: the DMALA sampler's settings (λ and ``max_new_tokens`` are set per row; ``steps`` is the ``mcmc``
            row's, the recommended count; ``mcmc@N`` rows run N steps).
        noise_repeats: draws of the noise floor averaged.
        world_folder: a world saved by an earlier run (its ``world_seed<k>`` folder) to reuse as it is; default:
            ``<folder>/world_seed<world_seed>``, built on first use.
    """

    lams: list[float] = field(default_factory=lambda: [1.0, 4.0, 16.0])
    samples: int = 1000
    world_seed: int = 0
    prompts: list[str] = field(default_factory=lambda: ["a", "b"])
    max_new_tokens: int = 3
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    rl_steps: int = 1000
    rl_group_size: int = 16
    rl_lr: float = 3e-3
    lora_rank: int = 8
    lora_targets: list[str] = field(default_factory=lambda: [*LLAMA_LINEAR, "lm_head"])
    exact_steps: int = 3000
    exact_lr: float = 3e-3
    dto_steps: int = 20
    dto_lr: float = 0.01
    max_rollouts: int = 8
    langevin: LangevinDTO = field(default_factory=LangevinDTO)
    mcmc: MCMCSettings = field(default_factory=lambda: MCMCSettings(steps=RECOMMENDED_STEPS, batch_size=500))
    noise_repeats: int = 20
    world_folder: str | None = None

    def __post_init__(self) -> None:
        require_finite(self)
        unknown = sorted(m for m in self.methods if not known_method(m))
        if unknown:
            raise ConfigurationError(
                f"unknown methods {unknown}; choose from {', '.join(METHODS)}, mcmc@<steps> or {SWEEPS_PREFIX}<sweeps>"
            )


def duality(
    settings: DualitySettings = DualitySettings(),  # noqa: B008 - jsonargparse reads dataclass defaults
    folder: str = "runs/duality",
    docs: str = "docs/results",
    threads: int = 1,
) -> list[dict[str, Any]]:
    """Measure how close RL fine-tuning, ∇-Reasoner, Langevin DTO and the DMALA sampler get to ρ* on the
    enumerable world.

    Args:
        settings: λ values, sample counts, the world, RL, DTO and sampler settings.
        folder: where rows (``duality.jsonl``, resumable), ``duality.json`` (``tv[method][λ]``,
            ``noise_floor[λ]``, ...) and the saved world go.
        docs: where ``duality_table.md`` (TV and E[r]; acceptance, evaluations and calls per response),
            ``duality_tv.png``, ``duality_rl_curves.png`` and ``duality_tv_cost.png`` are written.
        threads: torch CPU threads (tiny models run fastest on one).
    """
    from nabla.worlds.enumerable.duality import run_check

    return run_check(settings, folder, docs, threads)
