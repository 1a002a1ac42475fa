"""Exact acceleration of ∇-Reasoner, measured: the accelerated loop against the reference mode (everything
recomputed), batched against sequential decoding, and ∇-Reasoner against best-of-8, on the same problems with the
same seeds. Each mode runs in its own process so that its peak memory (max RSS) is its own.

    python benchmarks/acceleration.py --model default --problems 8          # SmolLM2-135M-Instruct, MAWPS
    python benchmarks/acceleration.py --model runs/arithmetic/policy --reward runs/arithmetic/reward \\
        --dataset jsonl:runs/arithmetic/problems/test.jsonl --template '{question}' --max-new-tokens 61 --problems 32
    python benchmarks/acceleration.py --model tiny --problems 6             # seconds, for a smoke test

Printed: per-problem model calls outside rollouts (DTO, selection, prefixes, rewards), all model calls, FLOPs and
wall time of each mode; the ratios; whether the decoded tokens are identical; batched throughput; peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import load_prompts
from rich.console import Console
from rich.table import Table

OUTSIDE_ROLLOUTS = ("lm_forward", "lm_backward", "rm_forward", "rm_backward", "selector", "prefill")
MODES = ("accelerated", "reference", "batched", "best_of_8")


def build(args: argparse.Namespace):
    from common import load_models

    from nabla import LatentOptimizer, Sampler, TestTimeTrainer, TokenSelection

    policy, reward = load_models(args.model) if args.reward is None else _load_pair(args.model, args.reward)
    selection = TokenSelection(min_grad_norm=args.min_grad_norm)
    optimizer = LatentOptimizer(steps=args.steps, lr=args.lr)
    sampler = Sampler(max_new_tokens=args.max_new_tokens, max_rollouts=8, selection=selection)
    return policy, reward, TestTimeTrainer(policy, reward, optimizer, sampler)


def _load_pair(model: str, reward_path: str):
    from nabla import Policy, SequenceClassifierReward

    policy = Policy.from_pretrained(model)
    reward = SequenceClassifierReward.from_pretrained(reward_path)
    reward.bind(policy)
    return policy, reward


def run_child(args: argparse.Namespace) -> None:
    """One mode over every prompt; prints one JSON line with per-problem records and the peak RSS."""
    torch.set_num_threads(args.threads)
    policy, reward, trainer = build(args)
    prompts = load_prompts(args.dataset, args.problems, args.template)
    seeds = list(range(len(prompts)))
    started = time.perf_counter()
    if args.child == "accelerated":
        results = [trainer.fit(p, seed=s) for p, s in zip(prompts, seeds)]
    elif args.child == "reference":
        reference = trainer.reference()
        results = [reference.fit(p, seed=s) for p, s in zip(prompts, seeds)]
    elif args.child == "batched":
        results = []
        for start in range(0, len(prompts), args.batch_size):
            chunk = slice(start, start + args.batch_size)
            results += trainer.fit_batch(prompts[chunk], seeds=seeds[chunk])
    else:
        from nabla.baselines import Baselines

        baselines = Baselines(policy, reward, trainer.sampler.rollout, max_new_tokens=args.max_new_tokens)
        results = [baselines.best_of_n(p, 8, seed=s) for p, s in zip(prompts, seeds)]
    elapsed = time.perf_counter() - started
    records = [{"tokens": r.token_ids, "stats": r.stats} for r in results]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"mode": args.child, "elapsed_s": elapsed, "peak_mb": peak_mb, "records": records}))


def spawn(mode: str, argv: list[str]) -> dict:
    command = [sys.executable, str(Path(__file__)), *argv, "--child", mode]
    out = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def total(records: list[dict], keys: tuple[str, ...]) -> float:
    return sum(r["stats"][k] for r in records for k in keys)


def report(runs: dict[str, dict], args: argparse.Namespace) -> dict:
    console = Console()
    count = len(runs["accelerated"]["records"])
    table = Table(title=f"per problem, mean over {count} problems (model={args.model}, dataset={args.dataset})")
    for column in ("mode", "passes outside rollouts", "model calls", "FLOPs", "wall s", "peak MB"):
        table.add_column(column, justify="right")
    summary: dict = {}
    for mode, run in runs.items():
        records = run["records"]
        row = {
            "outside": total(records, OUTSIDE_ROLLOUTS) / count,
            "calls": total(records, ("model_calls",)) / count,
            "flops": total(records, ("flops",)) / count,
            "wall_s": run["elapsed_s"] / count,
            "peak_mb": run["peak_mb"],
        }
        summary[mode] = row
        table.add_row(
            mode,
            f"{row['outside']:.1f}",
            f"{row['calls']:.1f}",
            f"{row['flops']:.3g}",
            f"{row['wall_s']:.2f}",
            f"{row['peak_mb']:.0f}",
        )
    console.print(table)
    fast = runs["accelerated"]["records"]
    ratios: dict = {}
    if "reference" in runs:
        same = [a["tokens"] == b["tokens"] for a, b in zip(fast, runs["reference"]["records"])]
        ratios = {
            "identical_tokens_reference": f"{sum(same)}/{len(same)}",
            "passes_outside_rollouts_reduction": summary["reference"]["outside"] / summary["accelerated"]["outside"],
            "model_calls_reduction": summary["reference"]["calls"] / summary["accelerated"]["calls"],
            "flops_reduction": summary["reference"]["flops"] / summary["accelerated"]["flops"],
            "wall_time_speedup": summary["reference"]["wall_s"] / summary["accelerated"]["wall_s"],
        }
    if "batched" in runs:
        batched = runs["batched"]["records"]
        ratios["identical_tokens_batched"] = f"{sum(a['tokens'] == b['tokens'] for a, b in zip(fast, batched))}/{count}"
        ratios["batched_throughput_gain"] = summary["accelerated"]["wall_s"] / summary["batched"]["wall_s"]
    if "best_of_8" in runs:
        ratios["nabla_over_best_of_8_wall"] = summary["accelerated"]["wall_s"] / summary["best_of_8"]["wall_s"]
        ratios["nabla_over_best_of_8_calls"] = summary["accelerated"]["calls"] / summary["best_of_8"]["calls"]
        if "batched" in runs:  # best-of-8 batches its 8 samples; batched ∇-Reasoner batches across prompts
            ratios["batched_nabla_over_best_of_8_wall"] = summary["batched"]["wall_s"] / summary["best_of_8"]["wall_s"]
    for key, value in ratios.items():
        console.print(f"{key}: {value if isinstance(value, str) else f'{value:.2f}'}")
    return {"summary": summary, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--reward", default=None, help="a reward-model folder (default: the model's default reward)")
    parser.add_argument("--dataset", default="mawps:singleop", help="name:split, jsonl:PATH, or tiny")
    parser.add_argument("--template", default=None, help="prompt template with {question} (default: the \\boxed{} one)")
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--min-grad-norm", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--json", default=None, help="write the summary and ratios here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    argv = [a for a in sys.argv[1:]]
    runs = {}
    for mode in args.modes.split(","):
        Console(stderr=True).print(f"running {mode} ...")
        runs[mode] = spawn(mode, argv)
    result = report(runs, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
