"""Human-readable reports of a fit: the answer, its revisions and its costs."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from nabla.cost import CALL_KINDS
from nabla.policy import Policy
from nabla.trainer import FitResult


def revisions_table(result: FitResult) -> Table:
    table = Table(title="token revisions (DTO changed the token; a proposal was rolled out)")
    for column in ("position", "original", "proposed", "r(current)", "r(proposal)", "outcome"):
        table.add_column(column)
    for revision in result.revisions:
        table.add_row(
            str(revision.position),
            repr(revision.original_text),
            repr(revision.proposed_text),
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


def print_fit_result(result: FitResult, policy: Policy, console: Console | None = None) -> None:
    console = console or Console()
    console.rule("answer")
    console.print(result.text, markup=False, highlight=False)
    console.rule()
    reward = "n/a" if result.reward is None else f"{result.reward:.4f}"
    console.print(f"reward: {reward}   finish: {result.finish_reason}   tokens: {len(result.token_ids)}")
    if result.revisions:
        console.print(revisions_table(result))
    else:
        console.print("no token was revised")
    console.print(cost_table(result.stats))


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
