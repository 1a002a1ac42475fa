"""Human-readable reports of a fit: the answer, its revisions and its costs."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.table import Table

from nabla.cost import CALL_KINDS
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
    table = Table(title="cost")
    table.add_column("what")
    table.add_column("count", justify="right")
    for kind in CALL_KINDS:
        table.add_row(f"model calls: {kind}", f"{stats[kind]:.0f}")
    table.add_row("model calls: total", f"{stats['model_calls']:.0f}")
    for kind in ("rollouts", "proposals", "rejections", "dto_runs", "grad_steps", "cached_steps"):
        table.add_row(kind, f"{stats[kind]:.0f}")
    table.add_row("rejection rate", f"{stats['rejection_rate']:.1%}")
    table.add_row("FLOPs", f"{stats['flops']:.3g}")
    table.add_row("wall time (s)", f"{stats['wall_time_s']:.1f}")
    return table


def dto_summary(result: FitResult) -> str:
    """How the DTO runs ended: the token was kept, or a proposal was accepted or rejected."""
    outcomes = Counter(run.outcome for run in result.dto_runs)
    parts = ", ".join(f"{outcomes.get(name, 0)} {name}" for name in ("kept", "accepted", "rejected"))
    return f"DTO runs: {len(result.dto_runs)} ({parts})"


def print_fit_result(
    result: FitResult,
    policy: Policy,
    console: Console | None = None,
    load_time_s: float | None = None,
    reward_name: str | None = None,
) -> None:
    from nabla.eval.grading import extract_answer

    console = console or Console()
    console.rule("answer")
    console.print(result.text, markup=False, highlight=False)
    console.rule()
    reward = "n/a" if result.reward is None else f"{result.reward:.4f}"
    final = extract_answer(result.text)
    console.print(f"final answer: {final if final is not None else '(none found)'}", markup=False, highlight=False)
    source = f" ({reward_name})" if reward_name else ""
    console.print(f"reward: {reward}{source}   finish: {result.finish_reason}   tokens: {len(result.token_ids)}")
    console.print(dto_summary(result))
    if result.revisions:
        console.print(revisions_table(result, policy))
    else:
        console.print("no token was revised (every DTO run resampled the token it started from)")
    console.print(cost_table(result.stats))
    if load_time_s is not None:
        console.print(f"models loaded in {load_time_s:.1f} s; decoding took {result.stats['wall_time_s']:.1f} s")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
