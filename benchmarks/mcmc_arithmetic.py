"""The DMALA sampler (:class:`nabla.MCMCSampler`) on an arithmetic world's dev problems: how many of its proposals it
accepts and whether its answers move, for several step sizes α, with and without a top-k proposal support.

    python benchmarks/mcmc_arithmetic.py --world runs/arithmetic --problems 40 --steps 16 --step-sizes 1.0,0.3,0.1

One line per setting: accuracy of the chains' final responses, accuracy of their start rollouts, accepted / tested
proposals. Dev problems only (tuning never reads the test split).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="runs/arithmetic")
    parser.add_argument("--problems", type=int, default=40)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--step-sizes", default="1.0,0.3,0.1")
    parser.add_argument("--top-k", type=int, default=4, help="the restricted support tried beside the full vocabulary")
    args = parser.parse_args()
    torch.set_num_threads(1)

    from nabla.mcmc import MCMCSampler, MCMCSettings
    from nabla.policy import Policy
    from nabla.reward import RewardModel
    from nabla.sampler import SamplingConfig
    from nabla.worlds.arithmetic.task import is_correct, read_jsonl

    root = args.world
    manifest = json.loads(Path(f"{root}/compare/manifest.json").read_text())
    budget = manifest["methods"]["greedy"]["max_new_tokens"]  # the world's response budget
    policy = Policy.from_pretrained(f"{root}/policy")
    reward = RewardModel.from_pretrained(f"{root}/reward")
    problems = read_jsonl(f"{root}/problems/dev.jsonl")[: args.problems]
    for alpha in (float(a) for a in args.step_sizes.split(",")):
        for top_k in (None, args.top_k):
            settings = MCMCSettings(
                lam=args.lam,
                steps=args.steps,
                step_size=alpha,
                top_k=top_k,
                max_new_tokens=budget,
                init=SamplingConfig(temperature=0.6, top_p=0.95),  # the comparison's rollouts
                batch_size=len(problems),
            )
            results = MCMCSampler(policy, reward, settings).sample_batch(
                [p.question for p in problems], list(range(len(problems)))
            )
            final = sum(is_correct(r.text, p.answer) for r, p in zip(results, problems)) / len(problems)
            start = sum(is_correct(policy.decode(r.start), p.answer) for r, p in zip(results, problems)) / len(problems)
            accepted = sum(r.stats.get("acceptances", 0) for r in results)
            tested = sum(r.stats.get("proposals", 0) for r in results)
            counts = f"accepted {accepted:.0f}/{tested:.0f}"
            print(f"alpha {alpha} top_k {top_k}: accuracy {final:.3f} (start {start:.3f}), {counts}")


if __name__ == "__main__":
    main()
