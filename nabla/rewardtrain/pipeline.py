"""The ``nabla train-reward`` command: sample -> grade -> train -> evaluate -> export.

Every stage reads the previous stage's files in ``work_dir`` and writes its own, so any stage can be rerun
alone (``--stages [train,evaluate,export]`` retrains on the cached samples without resampling).

- ``sample``: ``samples.jsonl`` (+ ``greedy.jsonl`` for held-out problems), resumable.
- ``grade``: ``graded.jsonl`` (each response marked correct or not by :func:`nabla.eval.grading.is_correct`) and
  ``grading.json`` (per-sample accuracy, pass@k, greedy accuracy).
- ``train``: a LoRA adapter and score head on the backbone, with ``lightning.Trainer``, in ``work_dir/adapter``.
- ``evaluate``: the saved adapter, reloaded exactly as it will be used, scores every held-out response:
  ``metrics.json`` (AUC, best-of-N accuracy against a random sample and greedy; the self-judge's AUC beside it).
- ``export``: copies the adapter and ``metrics.json`` to ``export`` (e.g. ``nabla/defaults/reward_adapter``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from nabla import jsonio
from nabla.config import PolicySpec
from nabla.errors import ConfigurationError, DataError
from nabla.rewardtrain.sampling import SampleSettings
from nabla.rewardtrain.settings import ADAPTER_FOLDER, LoraSettings, TrainSettings

Stage = Literal["sample", "grade", "train", "evaluate", "export"]
ALL_STAGES: list[Stage] = ["sample", "grade", "train", "evaluate", "export"]
METRICS_FILE = "metrics.json"
EXPORTED_FILES = ("adapter_config.json", "adapter_model.safetensors", METRICS_FILE)


def train_reward(
    policy: PolicySpec = PolicySpec(),  # noqa: B008 - jsonargparse reads dataclass defaults
    data: SampleSettings = SampleSettings(),  # noqa: B008
    lora: LoraSettings = LoraSettings(),  # noqa: B008
    training: TrainSettings = TrainSettings(),  # noqa: B008
    backbone: str = "default",
    work_dir: str = "runs/default_reward",
    export: str | None = None,
    stages: list[Stage] = ALL_STAGES,
    compare_self_judge: bool = True,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train an outcome reward model on graded samples of the policy, evaluate it on held-out problems and export
    its LoRA adapter and score head.

    Args:
        policy: the policy whose responses are sampled (``default``: the embedded SmolLM2-135M-Instruct).
        data: training problems, samples per problem, held-out share and sampling settings.
        lora: the adapter (rank, alpha, dropout, target modules, layers).
        training: loss (pointwise BCE or pairwise Bradley-Terry), optimiser and Lightning settings.
        backbone: the reward model's base, loaded as a one-label sequence classifier (``default``: the policy's
            own backbone, so both share one vocabulary).
        work_dir: where every stage writes its files (and reads the previous stage's).
        export: copy the trained adapter and its metrics here (the embedded default lives in
            ``nabla/defaults/reward_adapter``); ``null``: keep them in ``work_dir/adapter`` only.
        stages: which stages to run, in order.
        compare_self_judge: also score the held-out responses with the policy as its own judge (AUC beside ours).
        seed: seeds problem selection, the split, sampling and training.
        threads: torch CPU threads (``null``: torch's default); 1 wastes least on a machine shared with other jobs.
        progress: show progress bars.
    """
    unknown = [s for s in stages if s not in ALL_STAGES]
    if unknown or not stages:
        raise ConfigurationError(f"unknown stages {unknown}; choose from {', '.join(ALL_STAGES)}")
    if threads is not None:
        if threads < 1:
            raise ConfigurationError(f"threads must be >= 1 or null (got {threads})")
        import torch

        torch.set_num_threads(threads)
    folder = Path(work_dir)
    outcome: dict[str, Any] = {"work_dir": str(folder)}
    if "sample" in stages:
        outcome["sampled"] = run_sampling(policy, data, folder, seed, progress)
    if "grade" in stages:
        outcome["grading"] = run_grading(folder, data, seed)
    if "train" in stages:
        outcome["training"] = run_training(folder, policy, backbone, lora, training, seed, progress)
    if "evaluate" in stages:
        outcome["metrics"] = run_evaluation(folder, policy, backbone, data, compare_self_judge, progress)
    if "export" in stages:
        if export is None:
            raise ConfigurationError("the export stage needs --export, the folder to copy the adapter to")
        outcome["exported"] = export_adapter(folder, Path(export))
    return outcome


def backbone_path(backbone: str, policy: PolicySpec) -> str:
    if backbone == "default":
        return policy.resolved_path()
    return backbone


def run_sampling(policy: PolicySpec, data: SampleSettings, folder: Path, seed: int, progress: bool) -> dict[str, int]:
    from nabla.rewardtrain.sampling import check_meta, sample_greedy, sample_problems, sampling_meta, select_problems

    problems = select_problems(data, seed)
    loaded = policy.load()
    check_meta(folder, sampling_meta(data, policy.name_or_path, seed, loaded.demonstrations))
    sampled = sample_problems(loaded, problems, data, folder, seed, progress)
    greedy = sample_greedy(loaded, problems, data, folder, seed, progress) if data.greedy_heldout else 0
    return {"problems": len(problems), "sampled_now": sampled, "greedy_now": greedy}


def run_grading(folder: Path, data: SampleSettings, seed: int) -> dict[str, Any]:
    from nabla.rewardtrain.data import grade_samples
    from nabla.rewardtrain.sampling import select_problems

    return grade_samples(folder, [problem.id for problem in select_problems(data, seed)])


def run_training(
    folder: Path,
    policy: PolicySpec,
    backbone: str,
    lora: LoraSettings,
    training: TrainSettings,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    from nabla.rewardtrain.module import train

    return train(
        folder,
        backbone_path(backbone, policy),
        lora,
        training,
        seed,
        progress,
        policy_path=policy.resolved_path(),
        base_name=backbone,
    )


def run_evaluation(
    folder: Path, policy: PolicySpec, backbone: str, data: SampleSettings, compare_self_judge: bool, progress: bool
) -> dict[str, Any]:
    from nabla.rewardtrain.evaluation import evaluate_adapter, print_metrics

    metrics = evaluate_adapter(folder, backbone_path(backbone, policy), policy, data, compare_self_judge, progress)
    (folder / METRICS_FILE).write_text(jsonio.dumps(metrics, indent=2))
    print_metrics(metrics)
    return metrics


def export_adapter(folder: Path, target: Path) -> list[str]:
    """Copy the adapter, its score head and the metrics to ``target`` (only those files: no model card)."""
    sources = {name: folder / (name if name == METRICS_FILE else f"{ADAPTER_FOLDER}/{name}") for name in EXPORTED_FILES}
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing:
        raise DataError(f"nothing to export: {', '.join(missing)} missing; run the train and evaluate stages first")
    target.mkdir(parents=True, exist_ok=True)
    for name, path in sources.items():
        shutil.copy2(path, target / name)
    return [str(target / name) for name in sources]
