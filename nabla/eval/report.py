"""Reports of evaluation runs: a rich table on the terminal, a markdown table and an accuracy-vs-cost plot.

Public functions:

- ``summary_rows(summaries) -> (header, rows)``: the table's cells as text (shared by both tables).
- ``print_summaries(summaries, title=None, console=None)``: the rich table.
- ``write_markdown(summaries, path, title=None)``: the same table as markdown.
- ``plot_comparison(summaries, path, title=None)``: accuracy (with its 95% Wilson interval) against mean model
  calls per problem (log scale), one curve per method family (``greedy``, ``best_of_n``, ...), its points sorted
  by ``n`` and labelled; drawn with matplotlib's Agg canvas, no display needed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nabla.eval.metrics import MethodSummary

HEADER = (
    "method",
    "problems",
    "accuracy [95% CI]",
    "pass@n",
    "maj@n",
    "reward",
    "calls",
    "tokens",
    "FLOPs",
    "wall s",
    "rejected",
)
LEGEND = (
    "Costs are means per problem: calls = model calls as in the paper (one per generated token, prefill, reward "
    "pass, and DTO forward/backward pass), tokens = generated tokens, wall s = seconds. pass@n / maj@n over the "
    "method's own n samples; reward = mean reward of the returned responses; rejected = share of ∇-Reasoner's "
    "proposals rejected."
)


def _percent(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _row(summary: MethodSummary) -> list[str]:
    largest = max(summary.pass_at) if summary.pass_at else None
    skipped = f" ({summary.skipped} skipped)" if summary.skipped else ""
    cost = summary.mean_cost
    proposals = summary.total_cost.get("proposals", 0.0)
    return [
        summary.method,
        f"{summary.graded}{skipped}",
        f"{_percent(summary.accuracy)} [{_percent(summary.ci_low)}, {_percent(summary.ci_high)}]",
        f"{_percent(summary.pass_at[largest])} (k={largest})" if largest else "–",
        f"{_percent(summary.maj_at[largest])} (k={largest})" if largest else "–",
        "–" if summary.mean_reward is None else f"{summary.mean_reward:.3f}",
        f"{cost.get('model_calls', 0.0):.0f}",
        f"{cost.get('generated_tokens', 0.0):.0f}",
        f"{cost.get('flops', 0.0):.3g}",
        f"{cost.get('wall_time_s', 0.0):.3g}",
        _percent(summary.rejection_rate) if proposals else "–",
    ]


def summary_rows(summaries: Sequence[MethodSummary]) -> tuple[tuple[str, ...], list[list[str]]]:
    """Header and rows; costs are means per problem."""
    return HEADER, [_row(s) for s in summaries]


def print_summaries(
    summaries: Sequence[MethodSummary], title: str | None = None, console: Console | None = None
) -> None:
    header, rows = summary_rows(summaries)
    table = Table(title=title, caption=LEGEND)
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right", no_wrap=index == 0)
    for row in rows:
        table.add_row(*row)
    (console or Console()).print(table)


def write_markdown(summaries: Sequence[MethodSummary], path: str | Path, title: str | None = None) -> Path:
    header, rows = summary_rows(summaries)
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", LEGEND]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_comparison(summaries: Sequence[MethodSummary], path: str | Path, title: str | None = None) -> Path:
    """Accuracy against mean model calls per problem, one curve per method family."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    families: dict[str, list[MethodSummary]] = {}
    placed: list[tuple[float, float]] = []
    for summary in summaries:
        families.setdefault(summary.method_name, []).append(summary)
    for family, members in families.items():
        members = sorted(members, key=lambda s: (s.n, s.mean_cost.get("model_calls", 0.0)))
        calls = [max(s.mean_cost.get("model_calls", 0.0), 1.0) for s in members]
        accuracy = [100 * s.accuracy for s in members]
        errors = [
            [max(0.0, 100 * (s.accuracy - s.ci_low)) for s in members],
            [max(0.0, 100 * (s.ci_high - s.accuracy)) for s in members],
        ]
        line = axes.errorbar(calls, accuracy, yerr=errors, marker="o", capsize=3, label=family, linestyle="-")
        for summary, x, y in zip(members, calls, accuracy):
            stacked = placed.count((round(x, 3), round(y, 3)))  # labels of coinciding points go one above another
            placed.append((round(x, 3), round(y, 3)))
            axes.annotate(summary.method, (x, y), textcoords="offset points", xytext=(5, 5 + 10 * stacked),
                          fontsize=8, color=line[0].get_color())  # fmt: skip
    axes.set_xscale("log")
    axes.set_xlabel("model calls per problem (mean, log scale)")
    axes.set_ylabel("accuracy (%), 95% Wilson interval")
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
