"""Which prompt set-up lets SmolLM2-135M-Instruct finish its answers: greedy responses to 24 training problems (8
MAWPS addsub, 8 MAWPS singleop, 8 procedural one-step) under five set-ups; how many end on their own, box an
answer, are right, and their mean length (docs/reward_model.md).

Run:  HF_HUB_OFFLINE=1 python benchmarks/prompt_formats.py [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse

import torch

from nabla import Policy
from nabla.defaults import DEFAULT_DEMONSTRATIONS
from nabla.eval.grading import is_correct, last_boxed
from nabla.rewardtrain.sampling import load_source
from nabla.rewardtrain.wordproblems import one_step_problems
from nabla.sampler import SamplingConfig

SHORT = "{q} Put the final answer in \\boxed{{}}."
EVALUATION = "{q}\nPlease reason step by step, and put your final answer within \\boxed{{}}."
EXAMPLE_USER, EXAMPLE_ANSWER = DEFAULT_DEMONSTRATIONS[0]
EXAMPLE_QUESTION = EXAMPLE_USER.removesuffix(" Put the final answer in \\boxed{}.")
IN_PROMPT = f"Example: {EXAMPLE_QUESTION}\nAnswer: 7 - 3 = 4. \\boxed{{{{4}}}}\n\n{{q}}\nAnswer:"
#: label -> (prompt template, worked example as a chat turn)
SETUPS = {
    "evaluation prompt, no example": (EVALUATION, False),
    "short prompt, no example": (SHORT, False),
    "one equation, then the box": ("{q}\nWrite one equation, then the answer in \\boxed{{}}.", False),
    "the example as text in the prompt": (IN_PROMPT, False),
    "the example as a chat turn + short prompt": (SHORT, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = Policy.from_pretrained("default", demonstrations=[])
    problems = load_source("mawps", "addsub")[:8] + load_source("mawps", "singleop")[:8] + one_step_problems()[:8]
    greedy = SamplingConfig(temperature=0.0, top_p=None)
    for label, (template, with_example) in SETUPS.items():
        policy = Policy(base.model, base.tokenizer, demonstrations=DEFAULT_DEMONSTRATIONS if with_example else ())
        contexts = [policy.encode(template.format(q=p.question)) for p in problems]
        rollouts = policy.generate(contexts, greedy, [torch.Generator() for _ in contexts], args.max_new_tokens)
        texts = [policy.decode(r.token_ids) for r in rollouts]
        ended = sum(r.finish_reason != "length" for r in rollouts)
        boxed = sum(last_boxed(t) is not None for t in texts)
        right = sum(bool(is_correct(p.answer, t)) for p, t in zip(problems, texts))
        length = sum(len(r.token_ids) for r in rollouts) / len(rollouts)
        print(f"{label}: ended {ended}/24, boxed {boxed}/24, right {right}/24, mean length {length:.0f}")


if __name__ == "__main__":
    main()
