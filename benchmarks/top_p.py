"""Top-p sampling: the nucleus from the top candidates against a sort of the whole vocabulary, at SmolLM2's
49,152-token vocabulary, one torch thread, in one run (CPU time, paired). Both keep the same tokens (tested in
tests/test_baselines.py); the shortcut only skips sorting the tail.

Run:  python benchmarks/top_p.py [--rows 64] [--vocab 49152] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from nabla.sampler import nucleus


def full_sort(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = torch.sort(probs, dim=-1, descending=True)
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, ordered.cumsum(-1) - ordered < top_p)


def cpu_seconds(function, repeats: int) -> float:
    started = time.process_time()
    for _ in range(repeats):
        function()
    return (time.process_time() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--top-p", type=float, default=0.95)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    # logits shaped like a language model's: a few likely tokens over a long tail (temperature 0.6)
    logits = torch.randn(args.rows, args.vocab, generator=generator, dtype=torch.float64) * 2.5 / 0.6
    probs = torch.softmax(logits, -1)
    assert torch.equal(nucleus(probs, args.top_p), full_sort(probs, args.top_p))
    sort_s = cpu_seconds(lambda: full_sort(probs, args.top_p), args.repeats)
    shortcut_s = cpu_seconds(lambda: nucleus(probs, args.top_p), args.repeats)
    kept = nucleus(probs, args.top_p).sum(-1).float().mean().item()
    print(f"rows {args.rows} x vocab {args.vocab}, top-p {args.top_p}: mean nucleus {kept:.0f} tokens")
    print(f"full_sort_cpu_ms: {sort_s * 1e3:.1f}")
    print(f"nucleus_cpu_ms: {shortcut_s * 1e3:.1f}")
    print(f"full_sort_over_nucleus: {sort_s / shortcut_s:.1f}")


if __name__ == "__main__":
    main()
