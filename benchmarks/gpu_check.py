"""A prepared GPU check: one command for a CUDA machine, short enough for one call.

    python benchmarks/gpu_check.py                       # CUDA: SmolLM2 in bf16, every engine installed
    python benchmarks/gpu_check.py --dry-run             # anywhere: the same steps on CPU with the tiny models

It runs the default policy and reward model in bfloat16 (DTO's variables, the rollout logits and hidden states
stay float32) and checks the guarantees that hold on a GPU, failing loudly when one does not:

- ``fp32_variables``: rollout logits / hidden states (DTO's variables) are float32 with bf16 weights;
- ``hf_rerun_identical``: the HF loop decodes the same tokens twice with the same seeds and the same batch
  (deterministic algorithms on);
- ``vllm_rerun_identical``: so does vLLM with the same per-request seeds, where it is installed.

It reports, without failing on them (they hold on CPU in float32, not in general on a GPU in bf16):
``pool_agreement`` (pooled ∇-Reasoner's tokens against one at a time), ``vllm_hf_greedy_agreement`` (vLLM's
greedy tokens against the HF loop's) and ``recovered_argmax_agreement`` (the argmax of the logits the policy
recovers for vLLM's greedy tokens against those tokens). Then it prints the ratios of
``benchmarks/throughput.py`` (``nabla_over_best_of_8_wall``, ``batched_throughput_gain``, per-token cost of each
engine against the bandwidth floor, measured on the device). The last lines are ``key: value``; ``checks: ok`` or
``checks: FAILED (...)`` is the last. ``--budget-s`` bounds the whole run: later steps are skipped, and said, when
the time is spent.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput  # the benchmark next to this file


def options(dry_run: bool, argv: list[str]) -> argparse.Namespace:
    """The throughput benchmark's options for this check (device, dtype, sizes), overridable on the command line."""
    if dry_run:
        base = ["--model", "tiny", "--dataset", "tiny", "--problems", "4", "--max-new-tokens", "12", "--pool", "4"]
        base += ["--steps", "3", "--device", "cpu", "--dtype", "bfloat16", "--threads", "1"]
    else:
        base = ["--model", "default", "--dataset", "svamp:test", "--problems", "16", "--max-new-tokens", "96"]
        base += ["--pool", "16", "--device", "cuda", "--dtype", "bfloat16", "--kv-cache-gib", "8"]
    return throughput.parser().parse_args(base + argv)


def decode_twice(policy, prompts: list[str], max_new_tokens: int, greedy: bool = False) -> tuple[list, list]:
    import torch

    from nabla.sampler import SamplingConfig

    sampling = SamplingConfig(temperature=0.0, top_p=None) if greedy else SamplingConfig(temperature=0.6, top_p=0.95)
    contexts = [policy.encode(p) for p in prompts]
    runs = []
    for _ in range(2):
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        runs.append(policy.generate(contexts, sampling, generators, max_new_tokens, record_logits=True))
    return runs[0], runs[1]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    dry_run = "--dry-run" in argv
    budget = 600.0
    if "--budget-s" in argv:
        at = argv.index("--budget-s")
        budget = float(argv[at + 1])
        del argv[at : at + 2]
    argv = [a for a in argv if a != "--dry-run"]
    args = options(dry_run, argv)
    started = time.perf_counter()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts

    import torch

    if not dry_run and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry-run for the CPU rehearsal", file=sys.stderr)
        raise SystemExit(2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(args.threads)
    checks: dict[str, bool] = {}
    values: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if not dry_run else "cpu (dry run)"}
    skipped: list[str] = []

    def time_left() -> float:
        return budget - (time.perf_counter() - started)

    prompts = throughput.load_prompts(args.dataset, args.problems, args.template)
    policy, reward = throughput.load_models(args, "hf")
    first, second = decode_twice(policy, prompts[: args.pool], args.max_new_tokens)
    checks["fp32_variables"] = policy.dtype == torch.bfloat16 and all(r.logits.dtype == torch.float32 for r in first)
    checks["hf_rerun_identical"] = [r.token_ids for r in first] == [r.token_ids for r in second]

    trainer, _ = throughput.trainer_and_baselines(policy, reward, args)
    probe = prompts[: min(4, len(prompts))]
    pooled = dict(trainer.fit_pool(probe, list(range(len(probe))), pool=len(probe)))
    alone = [trainer.fit(p, seed=i) for i, p in enumerate(probe)]
    values["pool_agreement"] = f"{sum(pooled[i].token_ids == a.token_ids for i, a in enumerate(alone))}/{len(probe)}"
    hf_greedy, _ = decode_twice(policy, prompts[: args.pool], args.max_new_tokens, greedy=True)
    policy.engine.close()
    del policy, reward, trainer

    if importlib.util.find_spec("vllm") is not None and args.model != "tiny":
        vllm_policy = throughput.load_policy(args, "vllm")
        first, second = decode_twice(vllm_policy, prompts[: args.pool], args.max_new_tokens)
        checks["vllm_rerun_identical"] = [r.token_ids for r in first] == [r.token_ids for r in second]
        greedy, _ = decode_twice(vllm_policy, prompts[: args.pool], args.max_new_tokens, greedy=True)
        same = sum(a.token_ids == b.token_ids for a, b in zip(greedy, hf_greedy))
        values["vllm_hf_greedy_agreement"] = f"{same}/{len(greedy)}"
        agree = [float((r.logits.argmax(-1).cpu() == torch.tensor(r.token_ids)).float().mean()) for r in greedy]
        values["recovered_argmax_agreement"] = sum(agree) / len(agree)
        vllm_policy.engine.close()
        del vllm_policy
    else:
        skipped.append("vllm (not installed here)" if args.model != "tiny" else "vllm (the tiny model has no folder)")

    runs: dict[str, Any] = {}
    for mode in ("engines", "best_of_8_pool", "nabla_pool", "best_of_8", "nabla"):
        if time_left() < 60:
            skipped.append(f"{mode} (out of the {budget:.0f} s budget)")
            continue
        runs[mode] = throughput.run_mode(mode, args)
    result = throughput.report(runs, args)
    for name in skipped:
        print(f"skipped: {name}")
    for key, value in values.items():
        print(f"{key}: {value if isinstance(value, str) else f'{value:.3g}'}")
    for key, ok in checks.items():
        print(f"{key}: {ok}")
    print(f"elapsed_s: {time.perf_counter() - started:.0f}")
    failed = [key for key, ok in checks.items() if not ok]
    print("checks: ok" if not failed else f"checks: FAILED ({', '.join(failed)})")
    return {"checks": checks, "values": values, "skipped": skipped, **result}


if __name__ == "__main__":  # the guard vLLM's engine processes need
    outcome = main()
    raise SystemExit(0 if all(outcome["checks"].values()) else 1)
