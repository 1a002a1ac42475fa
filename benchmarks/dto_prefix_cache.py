"""One DTO run with the prefix's key/value cache reused at every step, against re-encoding the prefix at every
step (the authors' release), on the same model and inputs, at a few prefix / look-ahead lengths.

    python benchmarks/dto_prefix_cache.py                      # SmolLM2-135M-Instruct (default policy)
    python benchmarks/dto_prefix_cache.py --model tiny --steps 5

Every step is a full step (gradient caching off), so both sides make the same number of model calls and only
the prefix handling differs. The printed ratio is re-encoding time / cached time.
"""

from __future__ import annotations

import argparse
import json

import torch
from common import load_models, threads, timer
from rich.console import Console
from rich.table import Table

from nabla import LatentOptimizer
from nabla.optimizer import DTOObjective
from nabla.policy import LMPrefix

FILLER = (
    "A farmer keeps careful records of the apples and pears he sells at the market every week of the year, "
    "and he writes each sale down together with its price. "
)


def build_inputs(policy, prefix_tokens: int, lookahead: int, seed: int) -> tuple[str, torch.Tensor, torch.Tensor]:
    """A prompt of exactly ``prefix_tokens`` tokens after formatting, and a look-ahead sampled from the policy."""
    text = FILLER
    while len(policy.encode(text)) < prefix_tokens:
        text += FILLER
    words = text.split()
    while len(policy.encode(" ".join(words))) > prefix_tokens:
        words.pop()
    prompt = " ".join(words)
    generator = torch.Generator().manual_seed(seed)
    lookahead_ids = torch.randint(0, policy.vocab_size, (lookahead,), generator=generator)
    return prompt, policy.encode(prompt), lookahead_ids


def time_run(policy, reward, prompt, prompt_ids, anchors, steps: int, cached: bool) -> tuple[float, torch.Tensor]:
    cache = policy.prefix_cache(prompt_ids) if cached else None
    context = reward.context(prompt, [], use_cache=cached)
    objective = DTOObjective(
        policy, reward, LMPrefix(prompt_ids, cache), context, reward_weight=1.0, likelihood_weight=1e-3
    )
    logits = torch.zeros(1, policy.vocab_size)
    optimizer = LatentOptimizer(steps=steps, gradient_caching=False)
    with timer() as elapsed:
        result = optimizer.run(objective.evaluate, logits, anchors)
    return elapsed(), result.logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="'default', 'tiny', or a model folder")
    parser.add_argument("--lengths", default="100x64,400x128,800x128", help="prefix x look-ahead pairs")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    threads(args.threads)
    policy, reward = load_models(args.model)
    table = Table(title=f"one DTO run, {args.steps} full steps, model={args.model}, threads={torch.get_num_threads()}")
    for column in ("prefix", "look-ahead", "re-encode s", "cached s", "speed-up", "same logits"):
        table.add_column(column, justify="right")
    rows = []
    for pair in args.lengths.split(","):
        prefix_tokens, lookahead = (int(x) for x in pair.split("x"))
        prompt, prompt_ids, anchors = build_inputs(policy, prefix_tokens, lookahead, args.seed)
        time_run(policy, reward, prompt, prompt_ids, anchors, 1, True)  # warm-up
        slow, slow_logits = time_run(policy, reward, prompt, prompt_ids, anchors, args.steps, cached=False)
        fast, fast_logits = time_run(policy, reward, prompt, prompt_ids, anchors, args.steps, cached=True)
        same = bool(torch.allclose(slow_logits, fast_logits, atol=1e-4))
        rows.append(
            {
                "prefix": len(prompt_ids),
                "lookahead": lookahead,
                "reencode_s": slow,
                "cached_s": fast,
                "speedup": slow / fast,
                "same_logits": same,
            }
        )
        table.add_row(
            str(len(prompt_ids)), str(lookahead), f"{slow:.2f}", f"{fast:.2f}", f"{slow / fast:.2f}x", str(same)
        )
    Console().print(table)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
