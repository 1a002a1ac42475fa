"""Held-out evaluation of a trained reward model: how it orders right above wrong answers to the same problem
(pairwise accuracy), AUC of its scores against the verifier's labels, and the
accuracy of best-of-N selection by its scores against a random sample, the greedy response and the oracle.

The adapter is reloaded exactly as it will be used (``SequenceClassifierReward.from_pretrained(backbone,
adapter=...)``, bound to the policy) and scores each held-out response through :meth:`RewardModel.score` with the
policy's token ids, so the figures describe the shipped artifact, not the training-time module. Every score is
kept in ``work_dir/heldout_scores.jsonl`` (one line per held-out problem: its id, labels and each model's scores), so
two reward models evaluated on the same samples can be compared problem by problem
(``benchmarks/reward_paired.py --work-dirs A B``) without scoring again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.classification import binary_auroc

from nabla import jsonio
from nabla.config import PolicySpec
from nabla.eval.reward_metrics import bootstrap_mean_ci, pairwise_accuracy
from nabla.progress import Counter
from nabla.reward import RewardModel
from nabla.rewardtrain.data import read_graded
from nabla.rewardtrain.sampling import SampleSettings, read_jsonl
from nabla.rewardtrain.settings import ADAPTER_FOLDER

#: Every held-out response's score, written by the evaluate stage beside ``metrics.json``.
HELDOUT_SCORES_FILE = "heldout_scores.jsonl"


def score_records(
    reward: RewardModel, records: Sequence[dict[str, Any]], name: str = "scoring", progress: bool = True
) -> list[list[float]]:
    """The reward of every response of every record (one list per problem)."""
    scores: list[list[float]] = []
    with Counter(f"{name} held-out responses", len(records), 0, progress) as bar:
        for record in records:
            responses = record["responses"]
            values = reward.score(
                [record["prompt"]] * len(responses),
                [r["text"] for r in responses],
                [r["token_ids"] for r in responses],
            )
            scores.append([float(v) for v in values])
            bar.advance()
    return scores


def write_heldout_scores(path: Path, records: Sequence[dict[str, Any]], scores: dict[str, list[list[float]]]) -> None:
    """One line per held-out problem: ``id``, ``source``, ``labels`` (is each response right) and ``scores``
    (each model's score of each response, in the same order)."""
    with path.open("w", encoding="utf-8") as handle:
        for index, record in enumerate(records):
            line = {
                "id": record["id"],
                "source": record["source"],
                "labels": [bool(r["correct"]) for r in record["responses"]],
                "scores": {name: values[index] for name, values in scores.items()},
            }
            handle.write(jsonio.dumps(line) + "\n")


def read_heldout_scores(path: Path) -> list[dict[str, Any]]:
    """The lines :func:`write_heldout_scores` wrote (read as every stage's JSONL is: a cut last line is ignored)."""
    from nabla.errors import DataError

    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"no held-out scores in {path}; run the evaluate stage there (--stages '[evaluate]')")
    return rows


def selection_metrics(
    scores: Sequence[Sequence[float]],
    labels: Sequence[Sequence[bool]],
    greedy: Sequence[bool | None] | None = None,
    bootstrap: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Within-problem pairwise accuracy (:func:`nabla.eval.reward_metrics.pairwise_accuracy`), AUC (pooled over
    responses, and the mean within problems), best-of-N accuracy against a random single
    sample (its expectation: the mean per-problem fraction correct), greedy and pass@N, with a bootstrap
    95% interval (over problems) of the lift over a random sample."""
    flat_scores = torch.tensor([s for row in scores for s in row], dtype=torch.float32)
    flat_labels = torch.tensor([int(x) for row in labels for x in row])
    mixed = [i for i, row in enumerate(labels) if any(row) and not all(row)]
    within = [float(binary_auroc(torch.tensor(scores[i]), torch.tensor([int(x) for x in labels[i]]))) for i in mixed]
    best = [bool(row_labels[max(range(len(row)), key=row.__getitem__)]) for row, row_labels in zip(scores, labels)]
    single = [sum(row) / len(row) for row in labels]
    n = len(labels)
    pairwise, pairs = pairwise_accuracy(scores, labels)
    metrics: dict[str, Any] = {
        "problems": n,
        "pairwise_accuracy": pairwise,
        "pairs": pairs,
        "responses": len(flat_labels),
        "correct_responses": int(flat_labels.sum()),
        "auc": float(binary_auroc(flat_scores, flat_labels)) if 0 < flat_labels.sum() < len(flat_labels) else None,
        "auc_within_problem_mean": sum(within) / len(within) if within else None,
        "problems_with_both_labels": len(mixed),
        "best_of_n_accuracy": sum(best) / n,
        "random_sample_accuracy": sum(single) / n,
        "pass_at_n": sum(any(row) for row in labels) / n,
        "samples_per_problem": max(len(row) for row in labels),
    }
    metrics["lift_over_random"] = metrics["best_of_n_accuracy"] - metrics["random_sample_accuracy"]
    metrics["lift_over_random_ci95"] = bootstrap_mean_ci([b - s for b, s in zip(best, single)], bootstrap, seed)
    known = [g for g in (greedy or []) if g is not None]
    if greedy is not None and len(known) == n:
        metrics["greedy_accuracy"] = sum(known) / n
        metrics["lift_over_greedy"] = metrics["best_of_n_accuracy"] - metrics["greedy_accuracy"]
    return metrics


def evaluate_adapter(
    folder: Path,
    backbone: str,
    policy: PolicySpec,
    data: SampleSettings,
    compare_self_judge: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Metrics of the adapter in ``folder/adapter`` (and of the self-judge) on the held-out problems."""
    from nabla.errors import DataError
    from nabla.reward import SequenceClassifierReward

    records = [r for r in read_graded(folder) if r["heldout"]]
    if not records:
        raise DataError(f"no held-out problems in {folder}; raise data.heldout_fraction or sample more problems")
    labels = [[r["correct"] for r in record["responses"]] for record in records]
    greedy = [record["greedy"]["correct"] if "greedy" in record else None for record in records]
    loaded_policy = policy.load()
    reward = SequenceClassifierReward.from_pretrained(backbone, adapter=str(folder / ADAPTER_FOLDER))
    reward.bind(loaded_policy)
    scores = {"reward_model": score_records(reward, records, "scoring", progress)}
    if compare_self_judge:
        from nabla.judge import SelfJudgeReward

        judge = SelfJudgeReward.from_policy(loaded_policy)
        judge.bind(loaded_policy)
        scores["self_judge"] = score_records(judge, records, "self-judging", progress)
    write_heldout_scores(folder / HELDOUT_SCORES_FILE, records, scores)
    metrics: dict[str, Any] = {name: selection_metrics(values, labels, greedy) for name, values in scores.items()}
    sources = sorted({record["source"] for record in records})
    metrics["by_source"] = {}
    for source in sources:
        rows = [i for i, record in enumerate(records) if record["source"] == source]
        subset = [labels[i] for i in rows]
        if not any(any(row) for row in subset):
            metrics["by_source"][source] = {"problems": len(rows), "note": "no correct response: AUC undefined"}
            continue
        metrics["by_source"][source] = {
            name: selection_metrics([values[i] for i in rows], subset, [greedy[i] for i in rows])
            for name, values in scores.items()
        }
    return metrics


def print_metrics(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="held-out evaluation (by problem)")
    table.add_column("metric")
    models = [name for name in ("reward_model", "self_judge") if name in metrics]
    for name in models:
        table.add_column(name.replace("_", " "), justify="right")
    rows = [
        ("pairwise_accuracy", "same-problem pairs ordered"),
        ("auc", "AUC (pooled)"),
        ("auc_within_problem_mean", "AUC within a problem (mean)"),
        ("best_of_n_accuracy", "best-of-N accuracy"),
        ("random_sample_accuracy", "random sample accuracy"),
        ("greedy_accuracy", "greedy accuracy"),
        ("pass_at_n", "pass@N (oracle)"),
        ("lift_over_random", "lift over random sample"),
        ("lift_over_greedy", "lift over greedy"),
    ]
    for key, label in rows:
        table.add_row(label, *[_fmt(metrics[m].get(key)) for m in models])
    first = metrics[models[0]]
    table.caption = (
        f"{first['problems']} held-out problems, {first['responses']} responses "
        f"({first['correct_responses']} correct); lift over random 95% CI {_fmt(first['lift_over_random_ci95'][0])}"
        f" .. {_fmt(first['lift_over_random_ci95'][1])}"
    )
    Console().print(table)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"
