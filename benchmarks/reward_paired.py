"""Two reward models, paired: best-of-N with each on the same held-out samples.

    python benchmarks/reward_paired.py --worlds runs/arithmetic runs/arithmetic_deeper
    python benchmarks/reward_paired.py --work-dirs runs/default_reward runs/default_reward_512

``--work-dirs``: two ``nabla train-reward`` work folders whose evaluate stage scored the same policy samples; their
``heldout_scores.jsonl`` are read (no model is loaded), paired on the held-out problems both hold, and each one's
within-problem pairwise accuracy on those problems is printed beside.

``--worlds``:
Both worlds must hold the same policy samples of the test split (the same policy and seed: ``judge_samples.jsonl``,
written by the reward stage). Each reward model is loaded from ``<world>/reward`` and scores every sample with its
own step aggregation, as decoding does; best-of-N takes the highest score per problem as the library's
best-of-N does (``nabla.baselines.best_index``: ties go to the first sample).
Prints each one's best-of-N accuracy and the paired difference (second minus first) with its bootstrap 95% CI and
the exact McNemar p-value, from :func:`nabla.eval.paired.paired_comparison`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def best_of_n_picks(world: Path, samples: list[dict], policy) -> dict[str, bool]:
    """Per problem, whether the highest-scored sample of ``world``'s reward model is right."""
    from nabla.baselines import best_index
    from nabla.prm import StepReward, aggregate_step_logits
    from nabla.reward import RewardModel

    reward = RewardModel.from_pretrained(str(world / "reward"))
    reward.bind(policy)
    reward.batch_size = 256
    inputs = ([s["prompt"] for s in samples], [s["response"] for s in samples], [s["token_ids"] for s in samples])
    if isinstance(reward, StepReward):
        scores = [float(aggregate_step_logits(steps, reward.aggregation)) for steps in reward.step_scores(*inputs)]
    else:
        scores = [float(score) for score in reward.score(*inputs)]
    by_problem: dict[str, tuple[list[float], list[bool]]] = {}
    for sample, score in zip(samples, scores):
        problem_scores, labels = by_problem.setdefault(sample["problem_id"], ([], []))
        problem_scores.append(score)
        labels.append(bool(sample["correct"]))
    return {problem: labels[best_index(values)] for problem, (values, labels) in by_problem.items()}


def test_samples(world: Path) -> list[dict]:
    lines = (world / "judge_samples.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["split"] == "test"]


def work_dir_picks(folders: list[Path]) -> dict[Path, dict[str, bool]]:
    """Per shared held-out problem, whether each work folder's reward model picks a right response (best-of-N)."""
    from nabla.baselines import best_index
    from nabla.eval.reward_metrics import pairwise_accuracy
    from nabla.rewardtrain.evaluation import HELDOUT_SCORES_FILE, read_heldout_scores

    rows = {folder: {row["id"]: row for row in read_heldout_scores(folder / HELDOUT_SCORES_FILE)} for folder in folders}
    shared = sorted(set.intersection(*(set(by_id) for by_id in rows.values())))
    if not shared:
        raise SystemExit("the two work folders share no held-out problem")
    if len({tuple(tuple(rows[f][p]["labels"]) for p in shared) for f in folders}) != 1:
        raise SystemExit("the two work folders graded different samples: evaluate both on the same policy samples")
    picks = {}
    for folder in folders:
        scores = [rows[folder][p]["scores"]["reward_model"] for p in shared]
        labels = [rows[folder][p]["labels"] for p in shared]
        pairwise, pairs = pairwise_accuracy(scores, labels)
        print(f"{folder}: same-problem pairs ordered {pairwise:.3f} ({pairs} pairs on {len(shared)} problems)")
        picks[folder] = {p: labels[i][best_index(scores[i])] for i, p in enumerate(shared)}
    return picks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--worlds", nargs=2, type=Path, metavar=("FIRST", "SECOND"))
    which.add_argument("--work-dirs", nargs=2, type=Path, metavar=("FIRST", "SECOND"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.work_dirs:
        first, second = args.work_dirs
        report(work_dir_picks([first, second]), first, second)
        return
    from nabla.policy import Policy

    first, second = args.worlds
    samples = test_samples(first)
    if [(s["problem_id"], s["token_ids"]) for s in samples] != [
        (s["problem_id"], s["token_ids"]) for s in test_samples(second)
    ]:
        raise SystemExit("the two worlds hold different test samples: train both reward models on the same policy")
    policy = Policy.from_pretrained(str(first / "policy"))
    picks = {world: best_of_n_picks(world, samples, policy) for world in (first, second)}
    report(picks, first, second)


def report(picks: dict[Path, dict[str, bool]], first: Path, second: Path) -> None:
    """Each one's best-of-N accuracy and the paired difference, second minus first (last lines ``key: value``)."""
    from nabla.eval.paired import paired_comparison

    for world, chosen in picks.items():
        print(f"{world}: best-of-N {100 * sum(chosen.values()) / len(chosen):.2f}% on {len(chosen)} problems")
    result = paired_comparison(picks[second], picks[first], (str(second), str(first)))
    low, high = result.difference_ci95
    print(f"difference_points: {100 * result.difference:+.2f}")
    print(f"difference_ci95: [{100 * low:+.2f}, {100 * high:+.2f}]")
    print(f"only_second_right: {result.only_a}")
    print(f"only_first_right: {result.only_b}")
    print(f"mcnemar_p: {result.mcnemar_p:.2g}")


if __name__ == "__main__":
    main()
