"""Human-readable reports of a fit: the answer, its revisions and its costs."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from nabla.cost import CALL_KINDS

if TYPE_CHECKING:
    from nabla.baselines import BaselineResult
    from nabla.policy import Policy
    from nabla.trainer import FitResult


def revisions_table(result: FitResult, policy: Policy | None = None, context_chars: int = 16) -> Table:
    """One row per proposal: the response position, the text just before it (committed tokens never change
    afterwards, so the final response's prefix is what the loop saw), the token change, both rewards, the
    outcome. Sized to fit an 80-column terminal."""
    table = Table(title="token revisions (DTO drew a new token; a rollout from it was scored)")
    table.add_column("pos", justify="right", no_wrap=True)
    table.add_column("after", max_width=context_chars + 2, overflow="ellipsis", no_wrap=True)
    table.add_column("token change", min_width=16, overflow="fold")
    table.add_column("r(current)", justify="right", no_wrap=True)
    table.add_column("r(new)", justify="right", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    for revision in result.revisions:
        before = policy.decode(result.token_ids[: revision.position]) if policy is not None else ""
        shown = before[-context_chars:]
        table.add_row(
            str(revision.position),
            ("…" if len(before) > len(shown) else "") + shown.replace("\n", "⏎"),
            f"{revision.original_text!r} → {revision.proposed_text!r}",
            _number(revision.current_reward),
            _number(revision.proposal_reward),
            "accepted" if revision.accepted else "rejected",
        )
    return table


def cost_table(stats: dict[str, float]) -> Table:
    table = Table(title="cost of ∇-Reasoner")
    table.add_column("what")
    table.add_column("count", justify="right")
    for kind in CALL_KINDS:
        table.add_row(f"model calls: {kind}", f"{stats[kind]:.0f}")
    table.add_row("model calls: total", f"{stats['model_calls']:.0f}")
    for kind in ("rollouts", "proposals", "rejections", "dto_runs", "grad_steps", "cached_steps"):
        table.add_row(kind, f"{stats[kind]:.0f}")
    if "gradient_passes" in stats:  # full gradient passes, by purpose
        passes = f"{stats['gradient_passes']} ({stats['selector_passes']} selection, {stats['dto_passes']} DTO)"
        table.add_row("gradient passes", passes)
    table.add_row("rejection rate", f"{stats['rejection_rate']:.1%}")
    table.add_row("FLOPs", f"{stats['flops']:.3g}")
    table.add_row("wall time (s)", f"{stats['wall_time_s']:.1f}")
    return table


def dto_summary(result: FitResult) -> str:
    """How the DTO runs ended: the token was kept, or a proposal was accepted or rejected."""
    outcomes = Counter(run.outcome for run in result.dto_runs)
    parts = ", ".join(f"{outcomes.get(name, 0)} {name}" for name in ("kept", "accepted", "rejected"))
    return f"DTO runs: {len(result.dto_runs)} ({parts})"


def against_greedy_table(result: FitResult, greedy: BaselineResult, reward_name: str | None = None) -> Table:
    """∇-Reasoner's answer beside the policy's own greedy one: final answer, reward, length, and each one's cost
    (the greedy rollout is not part of ∇-Reasoner's cost)."""
    from nabla.eval.grading import extract_answer

    table = Table(title="∇-Reasoner against the policy's greedy answer")
    table.add_column("")
    table.add_column("∇-Reasoner", overflow="fold")
    table.add_column("greedy (policy alone)", overflow="fold")
    rows = [
        ("final answer", _answer(extract_answer(result.text)), _answer(greedy.answer)),
        ("reward" + (f" ({reward_name})" if reward_name else ""), _number(result.reward), _number(greedy.reward)),
        ("tokens · finish", f"{len(result.token_ids)} · {result.finish_reason}",
         f"{len(greedy.token_ids)} · {greedy.finish_reason}"),
        ("model calls", f"{result.stats['model_calls']:.0f}", f"{greedy.stats['model_calls']:.0f}"),
        ("wall time (s)", f"{result.stats['wall_time_s']:.1f}", f"{greedy.stats['wall_time_s']:.1f}"),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    return table


def print_fit_result(
    result: FitResult,
    policy: Policy,
    console: Console | None = None,
    load_time_s: float | None = None,
    reward_name: str | None = None,
    greedy: BaselineResult | None = None,
) -> None:
    """The answer, its reward, the DTO runs and token revisions, the cost table and, with ``greedy``, the policy's
    own greedy answer beside it."""
    from nabla.eval.grading import extract_answer

    console = console or Console()
    console.rule("answer (∇-Reasoner)")
    console.print(result.text, markup=False, highlight=False)
    if greedy is not None:
        console.rule("greedy answer (the policy alone, for comparison)")
        same = greedy.token_ids == result.token_ids
        console.print("(the same response)" if same else greedy.text, markup=False, highlight=False)
    console.rule()
    reward = "n/a" if result.reward is None else f"{result.reward:.4f}"
    final = extract_answer(result.text)
    console.print(f"final answer: {_answer(final)}", markup=False, highlight=False)
    source = f" ({reward_name})" if reward_name else ""
    console.print(f"reward: {reward}{source}   finish: {result.finish_reason}   tokens: {len(result.token_ids)}")
    if greedy is not None:
        console.print(against_greedy_table(result, greedy))
    console.print(dto_summary(result))
    if result.revisions:
        console.print(revisions_table(result, policy))
    else:
        console.print("no token was revised (every DTO run resampled the token it started from)")
    console.print(cost_table(result.stats))
    if load_time_s is not None:
        timing = f"models loaded in {load_time_s:.1f} s; ∇-Reasoner took {result.stats['wall_time_s']:.1f} s"
        if greedy is not None:
            timing += f", the greedy rollout {greedy.stats['wall_time_s']:.1f} s (not in the cost table)"
        console.print(timing)


def _answer(answer: str | None) -> str:
    return answer if answer is not None else "(none found)"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
