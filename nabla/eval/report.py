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
from typing import Any

from rich.console import Console
from rich.table import Table

from nabla.eval.metrics import MethodSummary

HEADER = ("method", "acc % [95% CI]", "pass@n", "maj@n", "reward", "calls", "tokens", "FLOPs", "wall s", "rej %")
LEGEND = (
    "acc = accuracy over the graded problems with its 95% Wilson interval; pass@n / maj@n = over the method's own n "
    "samples (%); reward = mean reward of the returned responses; costs are means per problem: calls = model calls "
    "as in the paper (one per generated token, prefill, reward pass and DTO forward/backward pass), tokens = "
    "generated tokens, wall s = seconds; rej = share of ∇-Reasoner's proposals rejected."
)
#: the widest terminal the console table is laid out for
TABLE_WIDTH = 100


def _percent(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _interval(summary: MethodSummary) -> str:
    low, high = (
        f"{100 * v:.0f}" if v is not None and not math.isnan(v) else "–" for v in (summary.ci_low, summary.ci_high)
    )
    return f"{_percent(summary.accuracy)} [{low}–{high}]"


def _row(summary: MethodSummary) -> list[str]:
    largest = max(summary.pass_at) if summary.pass_at else None
    cost = summary.mean_cost
    proposals = summary.total_cost.get("proposals", 0.0)
    return [
        summary.method,
        _interval(summary),
        _percent(summary.pass_at[largest]) if largest else "–",
        _percent(summary.maj_at[largest]) if largest else "–",
        "–" if summary.mean_reward is None else f"{summary.mean_reward:.2f}",
        f"{cost.get('model_calls', 0.0):.0f}",
        f"{cost.get('generated_tokens', 0.0):.0f}",
        f"{cost.get('flops', 0.0):.2g}",
        f"{cost.get('wall_time_s', 0.0):.3g}",
        _percent(summary.rejection_rate) if proposals else "–",
    ]


def unsolved_note(summaries: Sequence[MethodSummary]) -> str | None:
    """Which methods left problems ungraded (skipped: unparsable gold or question; failed: a non-finite reward)."""
    parts = []
    for summary in summaries:
        counts = [
            f"{count} {what}" for count, what in ((summary.skipped, "skipped"), (summary.failed, "failed")) if count
        ]
        if counts:
            parts.append(f"{summary.method}: {', '.join(counts)}")
    return "not graded: " + "; ".join(parts) if parts else None


def summary_rows(summaries: Sequence[MethodSummary]) -> tuple[tuple[str, ...], list[list[str]]]:
    """Header and rows; costs are means per problem."""
    return HEADER, [_row(s) for s in summaries]


def summary_table(summaries: Sequence[MethodSummary], title: str | None = None) -> Table:
    """The rich table: short headers, numbers that never wrap, the legend as its caption (fits 100 columns)."""
    from rich import box

    header, rows = summary_rows(summaries)
    note = unsolved_note(summaries)
    caption = LEGEND + (f" {note}." if note else "")
    table = Table(
        title=title,
        caption=caption,
        box=box.SIMPLE_HEAD,
        caption_justify="left",
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right", no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    return table


def print_summaries(
    summaries: Sequence[MethodSummary], title: str | None = None, console: Console | None = None
) -> None:
    console = console or Console()
    table = summary_table(summaries, title)
    table.width = None
    console.print(table, width=min(console.width, TABLE_WIDTH))


def write_markdown(summaries: Sequence[MethodSummary], path: str | Path, title: str | None = None) -> Path:
    header, rows = summary_rows(summaries)
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    note = unsolved_note(summaries)
    lines += ["", LEGEND + (f" {note}." if note else "")]
    shapes = [
        f"{s.method} {s.cut_off_rate:.0%} / {s.boxed_rate:.0%}"
        for s in summaries
        if s.cut_off_rate is not None and s.boxed_rate is not None
    ]
    if shapes:
        lines += ["", "Final responses cut off by the length limit / with a boxed answer: " + ", ".join(shapes) + "."]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def plot_comparison(summaries: Sequence[MethodSummary], path: str | Path, title: str | None = None) -> Path:
    """Accuracy against mean model calls per problem, one curve per method family; written as a PNG."""
    figure = draw_comparison(summaries, title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def draw_comparison(summaries: Sequence[MethodSummary], title: str | None = None) -> Any:
    """The plot as a matplotlib ``Figure`` (Agg canvas): one errorbar curve per method family, each point labelled
    where its label overlaps no other label, marker or error bar; markers at 0% drawn whole; the x axis in log
    scale with labelled ticks at 1-2-5 steps; the legend beside the axes, covering nothing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    figure = Figure(figsize=(8, 4.8), dpi=120, layout="constrained")
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    families: dict[str, list[MethodSummary]] = {}
    for summary in summaries:
        families.setdefault(_family(summary), []).append(summary)
    lines: list[tuple[list[float], list[float]]] = []
    points: list[tuple[str, float, float, float, float, str]] = []  # label, calls, accuracy, CI low, high, colour
    for family, members in families.items():
        members = sorted(members, key=lambda s: (s.n, s.mean_cost.get("model_calls", 0.0)))
        calls = [max(s.mean_cost.get("model_calls", 0.0), 1.0) for s in members]
        accuracy = [100 * s.accuracy for s in members]
        errors = [
            [max(0.0, 100 * (s.accuracy - s.ci_low)) for s in members],
            [max(0.0, 100 * (s.ci_high - s.accuracy)) for s in members],
        ]
        line = axes.errorbar(
            calls,
            accuracy,
            yerr=errors,
            marker="o",
            markersize=6,
            capsize=3,
            label=family,
            linestyle="-",
            clip_on=False,
        )
        colour = line[0].get_color()
        lines.append((calls, accuracy))
        points += [
            (s.method, x, y, y - low, y + high, colour) for s, x, y, low, high in zip(members, calls, accuracy, *errors)
        ]
    xs = [point[1] for point in points] or [1.0]
    highs = [100 * s.ci_high for s in summaries if not math.isnan(s.ci_high)] or [100.0]
    axes.set_xscale("log")
    axes.set_xlim(min(xs) / 1.6, max(xs) * 1.6)
    axes.set_ylim(-3, min(105, max(highs) + 8))  # room below 0 so that a marker at 0% is drawn whole
    axes.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("model calls per problem (mean, log scale)")
    axes.set_ylabel("accuracy (%), 95% Wilson interval")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, title="method")
    if title:
        axes.set_title(title, fontsize=10)
    canvas.draw()  # lay the figure out before measuring where labels go
    _place_labels(axes, points, lines, canvas.get_renderer())
    return figure


def _family(summary: MethodSummary) -> str:
    """The curve a point belongs to: its method for the default labels (``best_of_n@4``), else its own label (an
    ablation is a curve of its own, not a zigzag through its method's curve)."""
    name, label = summary.method_name, summary.method
    return name if label in (name, f"{name}@{summary.n}") else label


#: where labels are tried, in turn: (anchor, dx, dy) in points from the marker ("point") or from the error bar's
#: lower or upper end; next to the marker first, then beyond the error bar, then further out with a leader line
_DIRECTIONS = [(1, 0.4), (1, -0.9), (-1, 0.4), (-1, -0.9), (0, 1), (0, -1.3), (1, 1), (-1, 1), (1, -1.5), (-1, -1.5)]
_OFFSETS = [("point", round(7 * dx), round(7 * dy)) for dx, dy in _DIRECTIONS]
_OFFSETS += [("low", 0, -3), ("high", 0, 3), ("low", 6, -3), ("low", -6, -3), ("high", 6, 3), ("high", -6, 3)]
_OFFSETS += [("point", round(r * dx), round(r * dy)) for r in (16, 26, 38) for dx, dy in _DIRECTIONS]


def _place_labels(
    axes: Any,
    points: list[tuple[str, float, float, float, float, str]],
    lines: list[tuple[list[float], list[float]]],
    renderer: Any,
) -> None:
    """Label each point at the first offset whose text box, inside the axes, overlaps no placed label, marker,
    error bar or curve; labels away from their marker get a thin leader line. A point with no free spot gets its
    label at the last offset tried."""
    taken = [_marker_box(axes, x, y) for _, x, y, _, _, _ in points]
    taken += [_bar_box(axes, x, low, high) for _, x, _, low, high, _ in points]
    taken += [box for xs, ys in lines for box in _curve_boxes(axes, xs, ys)]
    frame = axes.get_window_extent(renderer)
    for label, x, y, low, high, colour in points:
        text = None
        for anchor, dx, dy in _OFFSETS:
            if text is not None:
                text.remove()
            text = axes.annotate(
                label,
                (x, {"point": y, "low": low, "high": high}[anchor]),
                textcoords="offset points",
                xytext=(dx, dy),
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                va="bottom" if dy > 0 else "top" if dy < 0 else "center",
                fontsize=8,
                color=colour,
                arrowprops=None if anchor != "point" or max(abs(dx), abs(dy)) <= 8 else _LEADER | {"color": colour},
            )
            box = text.get_window_extent(renderer).expanded(1.04, 1.1)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(other) for other in taken):
                break
        assert text is not None
        taken.append(text.get_window_extent(renderer))


_LEADER = {"arrowstyle": "-", "lw": 0.5, "alpha": 0.6, "shrinkA": 1, "shrinkB": 4}


def _curve_boxes(axes: Any, xs: list[float], ys: list[float], step: float = 6.0) -> list[Any]:
    """Small boxes along a curve's segments (display units), so that no label is drawn across a curve."""
    from matplotlib.transforms import Bbox

    corners = [axes.transData.transform((x, y)) for x, y in zip(xs, ys)]
    boxes = []
    for (x0, y0), (x1, y1) in zip(corners, corners[1:]):
        count = max(1, int(math.hypot(x1 - x0, y1 - y0) / step))
        for i in range(count + 1):
            cx, cy = x0 + (x1 - x0) * i / count, y0 + (y1 - y0) * i / count
            boxes.append(Bbox([[cx - 1.5, cy - 1.5], [cx + 1.5, cy + 1.5]]))
    return boxes


def _bar_box(axes: Any, x: float, low: float, high: float, half_width: float = 4.0) -> Any:
    """The error bar with its caps, in display units."""
    from matplotlib.transforms import Bbox

    cx, bottom = axes.transData.transform((x, low))
    _, top = axes.transData.transform((x, high))
    return Bbox([[cx - half_width, bottom], [cx + half_width, top]])


def _marker_box(axes: Any, x: float, y: float, radius: float = 5.0) -> Any:
    from matplotlib.transforms import Bbox

    cx, cy = axes.transData.transform((x, y))
    return Bbox([[cx - radius, cy - radius], [cx + radius, cy + radius]])
