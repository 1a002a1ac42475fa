"""Throughput of ∇-Reasoner with continuous batching, against best-of-8 on the same engine, and the per-token cost
of each rollout engine against the memory-bandwidth floor.

    python benchmarks/throughput.py --model default --dataset svamp:test --problems 16 --max-new-tokens 96 --pool 16
    python benchmarks/throughput.py --model tiny --dataset tiny --problems 8 --max-new-tokens 16 --pool 8  # seconds
    .venv-vllm/bin/python benchmarks/throughput.py --engine vllm ...      # the same comparison with vLLM rollouts

Modes, each in its own process (so that its peak memory is its own), on the same problems with the same seeds:

- ``nabla``: ``TestTimeTrainer.fit`` one problem at a time (budget 8, the paper's DTO settings);
- ``nabla_pool``: ``TestTimeTrainer.fit_pool`` with ``--pool`` problems decoding at once (continuous batching);
- ``best_of_8``: ``Baselines.best_of_n(prompt, 8)`` one problem at a time (its 8 samples one batch);
- ``best_of_8_pool``: ``Baselines.run_pool`` with ``--pool`` problems at once (``8 x pool`` rows a batch);
- ``engines``: seconds per generated token of each engine available here (``hf`` always, ``vllm`` where it
  imports, ``openai`` with ``--openai-url``) at batch 1 and at batch ``--pool``, beside the bandwidth floor:
  the bytes of weights one decoding step reads, over the memory bandwidth measured here (a ``torch.sum`` over a
  buffer far larger than the caches).

The last lines are ``key: value``: ``nabla_over_best_of_8_wall`` (pooled ∇-Reasoner over pooled best-of-8, the
same engine and pool) and ``batched_throughput_gain`` (one at a time over pooled ∇-Reasoner) come last.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import load_prompts

from nabla.progress import Counter

MODES = ("nabla", "nabla_pool", "best_of_8", "best_of_8_pool", "engines")


# ---------------------------------------------------------------------------------------------- set-up
def engine_spec(args: argparse.Namespace, kind: str | None = None):
    from nabla.engines import EngineSpec

    kind = kind or args.engine
    if kind == "openai":
        return EngineSpec(kind="openai", url=args.openai_url)
    return EngineSpec(kind=kind, kv_cache_gib=args.kv_cache_gib if kind == "vllm" else None)


def load_policy(args: argparse.Namespace, kind: str | None = None):
    """The policy, its rollouts on engine ``kind`` (default ``--engine``)."""
    from nabla import Policy

    spec = engine_spec(args, kind)
    if args.model == "tiny":
        import torch

        from nabla.tiny import tiny_causal_lm, tiny_tokenizer

        model = tiny_causal_lm(tiny_tokenizer(), max_position_embeddings=4096)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        return Policy(model.to(args.device, dtype), tiny_tokenizer(), engine=spec.build())
    from nabla.config import PolicySpec

    return PolicySpec(name_or_path=args.model, dtype=args.dtype, device=args.device, engine=spec).load()


def load_models(args: argparse.Namespace, kind: str | None = None):
    """The policy (rollouts on engine ``kind``, default ``--engine``) and its reward model."""
    from nabla import SequenceClassifierReward

    policy = load_policy(args, kind)
    if args.model == "tiny":
        from nabla.tiny import tiny_classifier

        model = tiny_classifier(policy.tokenizer, max_position_embeddings=4096)
        reward = SequenceClassifierReward(model.to(args.device, policy.dtype), policy.tokenizer)
    else:
        from nabla.config import PolicySpec, RewardSpec
        from nabla.errors import ModelNotFoundError

        try:
            reward = RewardSpec(name_or_path=args.model, dtype=args.dtype, device=args.device).load(policy)
        except ModelNotFoundError:  # compute does not depend on whether the score head was trained
            path = PolicySpec(name_or_path=args.model).resolved_path()
            reward = SequenceClassifierReward.from_pretrained(
                path, dtype=args.dtype, device=args.device, allow_untrained_head=True
            )
    reward.bind(policy)
    return policy, reward


def trainer_and_baselines(policy, reward, args: argparse.Namespace):
    from nabla import LatentOptimizer, Sampler, TestTimeTrainer
    from nabla.baselines import Baselines

    sampler = Sampler(max_new_tokens=args.max_new_tokens, max_rollouts=8)
    trainer = TestTimeTrainer(
        policy, reward, LatentOptimizer(steps=args.steps, lr=args.lr), sampler, enable_progress_bar=False
    )
    baselines = Baselines(policy, reward, sampler.rollout, max_new_tokens=args.max_new_tokens)
    return trainer, baselines


# ---------------------------------------------------------------------------------------------- modes
def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One mode over every prompt: per-problem records (tokens and costs), the elapsed time, the peak RSS."""
    import torch

    torch.set_num_threads(args.threads)
    if mode == "engines":
        return {"mode": mode, "engines": engine_costs(args)}
    policy, reward = load_models(args)
    trainer, baselines = trainer_and_baselines(policy, reward, args)
    prompts = load_prompts(args.dataset, args.problems, args.template)
    seeds = list(range(len(prompts)))
    started = time.perf_counter()
    with Counter(f"{mode} (problems done)", len(prompts)) as counter:  # stderr: a bar, or a line every 20 s
        results = solve(mode, prompts, seeds, trainer, baselines, args.pool, counter)
    elapsed = time.perf_counter() - started
    policy.engine.close()
    records = [{"tokens": r.token_ids, "stats": r.stats} for r in results]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "elapsed_s": elapsed, "peak_mb": peak_mb, "records": records}


def solve(mode: str, prompts: list[str], seeds: list[int], trainer, baselines, pool: int, counter) -> list:
    """Every prompt's result under ``mode``, in prompt order; ``counter`` advances as each one finishes."""
    done: dict[int, Any] = {}
    if mode in ("nabla", "best_of_8"):
        for index, (prompt, seed) in enumerate(zip(prompts, seeds)):
            if mode == "nabla":
                done[index] = trainer.fit(prompt, seed=seed)
            else:
                done[index] = baselines.best_of_n(prompt, 8, seed=seed)
            counter.advance()
    elif mode in ("nabla_pool", "best_of_8_pool"):
        finished = (
            trainer.fit_pool(prompts, seeds, pool=pool)
            if mode == "nabla_pool"
            else baselines.run_pool("best_of_n", prompts, 8, seeds, pool=pool)
        )
        for index, result in finished:
            done[index] = result
            counter.advance()
    else:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    return [done[i] for i in range(len(prompts))]


def memory_bandwidth(device: str, megabytes: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of ``repeats`` ``torch.sum`` passes over a ``megabytes`` buffer."""
    import torch

    buffer = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        buffer.sum()
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * 4 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def engine_costs(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per generated token of each engine available, at batch 1 and ``--pool``, and the floor."""
    import importlib.util

    import torch

    from nabla.engines import EngineRequest
    from nabla.sampler import SamplingConfig

    kinds = ["hf"]
    if args.model != "tiny" and importlib.util.find_spec("vllm") is not None:
        kinds.append("vllm")
    if args.openai_url:
        kinds.append("openai")
    out: dict[str, Any] = {"bandwidth_gb_s": memory_bandwidth(args.device) / 1e9, "missing": []}
    if "vllm" not in kinds:
        out["missing"].append("vllm (not importable here, or the tiny model has no folder)")
    sampling = SamplingConfig(temperature=0.6, top_p=0.95)
    for kind in kinds:
        policy = load_policy(args, kind)
        weight_bytes = policy.params * torch.finfo(policy.dtype).bits // 8
        out["weight_mb"] = weight_bytes / 1e6
        out["floor_ms"] = 1e3 * weight_bytes / (out["bandwidth_gb_s"] * 1e9)
        context = policy.encode(load_prompts(args.dataset, 1, args.template)[0]).tolist()
        engine = policy.engine
        for batch in (1, args.pool):
            requests = [EngineRequest(context, args.max_new_tokens, sampling, seed) for seed in range(batch)]
            engine.generate(requests[:1])  # warm-up (vLLM starts here)
            _sync(args.device)
            started = time.perf_counter()
            outputs = engine.generate(requests)
            _sync(args.device)
            elapsed = time.perf_counter() - started
            steps = max(len(o.token_ids) for o in outputs)
            tokens = sum(len(o.token_ids) for o in outputs)
            out[f"{kind}_b{batch}_ms_per_step"] = 1e3 * elapsed / steps
            out[f"{kind}_b{batch}_ms_per_token"] = 1e3 * elapsed / tokens
        engine.close()
    return out


# ---------------------------------------------------------------------------------------------- report
def spawn(mode: str, argv: list[str], python: str) -> dict[str, Any]:
    command = [python, str(Path(__file__)), *argv, "--child", mode]
    out = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)  # its progress goes to stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _per_problem(run: dict[str, Any], key: str) -> float:
    return sum(r["stats"][key] for r in run["records"]) / len(run["records"])


def report(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Print the table and the ratios (``key: value``, the two headline ratios last); return them."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    solved = {mode: run for mode, run in runs.items() if mode != "engines"}
    summary: dict[str, dict[str, float]] = {}
    if solved:
        count = len(next(iter(solved.values()))["records"])
        title = f"per problem, mean over {count} (model={args.model}, engine={args.engine}, pool={args.pool})"
        table = Table(title=title)
        for column in ("mode", "model calls", "FLOPs", "wall s", "tokens", "peak MB"):
            table.add_column(column, justify="right")
        for mode, run in solved.items():
            row = {
                "calls": _per_problem(run, "model_calls"),
                "flops": _per_problem(run, "flops"),
                "wall_s": run["elapsed_s"] / count,
                "tokens": sum(len(r["tokens"]) for r in run["records"]) / count,
                "peak_mb": run["peak_mb"],
            }
            summary[mode] = row
            cells = (f"{row['calls']:.1f}", f"{row['flops']:.3g}", f"{row['wall_s']:.2f}", f"{row['tokens']:.1f}")
            table.add_row(mode, *cells, f"{row['peak_mb']:.0f}")
        console.print(table)
    ratios: dict[str, Any] = {}
    if "engines" in runs:
        costs = runs["engines"]["engines"]
        for key in ("weight_mb", "bandwidth_gb_s", "floor_ms"):
            ratios[key] = costs[key]
        for kind in ("hf", "vllm", "openai"):
            for batch in (1, args.pool):
                key = f"{kind}_b{batch}_ms_per_token"
                if key in costs:
                    ratios[key] = costs[key]
                    ratios[f"{kind}_b{batch}_ms_per_step"] = costs[f"{kind}_b{batch}_ms_per_step"]
                    ratios[f"{kind}_b{batch}_token_over_floor"] = costs[key] / costs["floor_ms"]
        for missing in costs["missing"]:
            console.print(f"[dim]not measured: {missing}[/dim]")

    def same(a: str, b: str) -> str:
        pairs = list(zip(runs[a]["records"], runs[b]["records"]))
        return f"{sum(x['tokens'] == y['tokens'] for x, y in pairs)}/{len(pairs)}"

    if {"nabla", "nabla_pool"} <= set(summary):
        ratios["identical_tokens_pool"] = same("nabla", "nabla_pool")
    if {"best_of_8", "best_of_8_pool"} <= set(summary):
        ratios["identical_tokens_best_of_8_pool"] = same("best_of_8", "best_of_8_pool")
        ratios["best_of_8_pool_gain"] = summary["best_of_8"]["wall_s"] / summary["best_of_8_pool"]["wall_s"]
    if {"nabla_pool", "best_of_8"} <= set(summary):
        ratios["nabla_over_unpooled_best_of_8_wall"] = summary["nabla_pool"]["wall_s"] / summary["best_of_8"]["wall_s"]
    if {"nabla", "best_of_8"} <= set(summary):
        ratios["sequential_nabla_over_best_of_8_wall"] = summary["nabla"]["wall_s"] / summary["best_of_8"]["wall_s"]
    if {"nabla_pool", "best_of_8_pool"} <= set(summary):
        pooled = summary["nabla_pool"], summary["best_of_8_pool"]
        ratios["nabla_over_best_of_8_calls"] = pooled[0]["calls"] / pooled[1]["calls"]
        ratios["nabla_over_best_of_8_wall"] = pooled[0]["wall_s"] / pooled[1]["wall_s"]
    if {"nabla", "nabla_pool"} <= set(summary):
        ratios["batched_throughput_gain"] = summary["nabla"]["wall_s"] / summary["nabla_pool"]["wall_s"]
    for key, value in ratios.items():
        console.print(f"{key}: {value if isinstance(value, str) else f'{value:.3g}'}", highlight=False)
    return {"summary": summary, "ratios": ratios}


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), 'tiny', or a folder")
    parser.add_argument("--dataset", default="svamp:test", help="name:split, jsonl:PATH, or tiny")
    parser.add_argument("--template", default=None, help="prompt template with {question} (default: the \\boxed{} one)")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--pool", type=int, default=16, help="problems decoded at once (continuous batching)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--engine", default="hf", choices=("hf", "vllm", "openai"), help="rollouts of every mode")
    parser.add_argument("--openai-url", default=None, help="a completions server for the openai engine")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="vLLM's key/value cache")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each mode")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--in-process", action="store_true", help="run the modes here, one after another")
    parser.add_argument("--json", default=None, help="write the summary and ratios here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.child:
        print(json.dumps(run_mode(args.child, args)))
        return {}
    from rich.console import Console

    runs = {}
    for mode in args.modes.split(","):
        Console(stderr=True).print(f"running {mode} ...")
        runs[mode] = run_mode(mode, args) if args.in_process else spawn(mode, argv, sys.executable)
    result = report(runs, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":  # the guard vLLM's engine processes need
    main()
