"""Where ∇-Reasoner's revisions go: replay ``nabla@N`` of an arithmetic world's comparison problem by problem with
the same seeds and settings, and grade every proposal the loop made (the start rollout, each proposal, the answer).

    python benchmarks/revision_audit.py --world runs/arithmetic --limit 400

Prints, and writes to ``<world>/compare/revision_audit.json``: how often the start rollout was right, how the
answer moved (right→right, right→wrong, wrong→right, wrong→wrong), how many proposals changed the final answer,
how the reward ordered each proposal against the response it challenged when exactly one of the two was right
(the acceptance test's own pairwise accuracy), and the share of proposals accepted by their correctness. The
replay is checked against the comparison's records (``replay_equals_records``: responses identical).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", default="runs/arithmetic")
    parser.add_argument("--method", default="nabla@8", help="a ∇-Reasoner label of the comparison")
    parser.add_argument("--limit", type=int, default=400)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from nabla.eval.methods import MethodSpec, Solver, problem_seed
    from nabla.policy import Policy
    from nabla.reward import RewardModel
    from nabla.worlds.arithmetic.pipeline import QUESTION_TEMPLATE
    from nabla.worlds.arithmetic.task import is_correct, read_jsonl

    world = Path(args.world)
    manifest = json.loads((world / "compare" / "manifest.json").read_text())
    spec = manifest["methods"][args.method]
    method = MethodSpec(
        name=spec["name"],
        n=spec["n"],
        sampling=_sampling(spec["sampling"]),
        max_new_tokens=spec["max_new_tokens"],
        optimizer=_dataclass("nabla.optimizer", "LatentOptimizer", spec["optimizer"]),
        sampler=_sampler(spec["sampler"]),
        acceleration=_dataclass("nabla.acceleration", "Acceleration", spec["acceleration"]),
        label=spec["label"],
    )
    policy = Policy.from_pretrained(str(world / "policy"))
    reward = RewardModel.from_pretrained(str(world / "reward"))
    solver = Solver(method, policy, reward, prompt_template=QUESTION_TEMPLATE)
    problems = list(read_jsonl(world / "problems" / "test.jsonl"))[: args.limit]
    trainer = solver.trainer
    seen: list[tuple[list[int], list[int], bool, float | None, float | None]] = []
    accept = trainer._accept

    def recording_accept(state, proposal, revision):  # the reward rule's test, with both full responses
        accepted = accept(state, proposal, revision)
        seen.append((list(state.response), list(proposal), accepted, revision.current_reward, revision.proposal_reward))
        return accepted

    trainer._accept = recording_accept
    from nabla.eval.runner import read_records

    recorded = {r["problem_id"]: r["response"] for r in read_records(world / "compare") if r["method"] == args.method}
    same = 0
    moves: Counter[str] = Counter()
    proposals: Counter[str] = Counter()
    tested: Counter[int] = Counter()  # problems by the number of proposals the loop tested
    wrong_tested: Counter[int] = Counter()  # the same, for the problems it answered wrong
    ordered = pairs = 0
    for problem in problems:
        seen.clear()
        result = trainer.fit(problem.question, seed=problem_seed(manifest["seed"], problem.id))
        answer = problem.answer

        def right(ids: list[int], answer: int = answer) -> bool:
            return is_correct(policy.decode(ids), answer)

        start_right = right(seen[0][0]) if seen else right(result.token_ids)
        end_right = right(result.token_ids)
        same += recorded.get(problem.id) == result.text
        moves[f"{'right' if start_right else 'wrong'}→{'right' if end_right else 'wrong'}"] += 1
        tested[len(seen)] += 1
        if not end_right:
            wrong_tested[len(seen)] += 1
        for current, proposal, accepted, current_reward, proposal_reward in seen:
            before, after = right(current), right(proposal)
            kind = f"{'right' if before else 'wrong'}→{'right' if after else 'wrong'}"
            proposals[f"{kind} {'accepted' if accepted else 'rejected'}"] += 1
            if before != after and current_reward is not None and proposal_reward is not None:
                pairs += 1
                ordered += (proposal_reward > current_reward) == after
    report = {
        "method": args.method,
        "problems": len(problems),
        "replay_equals_records": same,
        "start_right": sum(v for k, v in moves.items() if k.startswith("right")) / len(problems),
        "answer_moves": dict(moves),
        "proposals": dict(proposals),
        "problems_by_proposals_tested": dict(sorted(tested.items())),
        "wrong_answers_by_proposals_tested": dict(sorted(wrong_tested.items())),
        "proposal_pairs_with_one_right": pairs,
        "proposal_pairs_ordered": ordered / pairs if pairs else None,
    }
    (world / "compare" / "revision_audit.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def _sampling(values: dict):
    from nabla.sampler import SamplingConfig

    return SamplingConfig(**values)


def _sampler(values: dict):
    from nabla.sampler import Sampler, SamplingConfig, TokenSelection

    values = dict(values)
    values["rollout"] = SamplingConfig(**values["rollout"])
    values["resample"] = SamplingConfig(**values["resample"])
    values["selection"] = TokenSelection(**values["selection"])
    return Sampler(**values)


def _dataclass(module: str, name: str, values: dict):
    from importlib import import_module

    cls = getattr(import_module(module), name)
    if "betas" in values:
        values = {**values, "betas": tuple(values["betas"])}
    return cls(**values)


if __name__ == "__main__":
    main()
