"""The report's history section as HTML with inline SVG charts (no script, nothing fetched).

Every mark (a bar, a bar segment, a point) carries its figure in data attributes: ``data-metric``, ``data-run-id``,
``data-value`` (JSON: a number, or null where a run has none), and ``data-task`` / ``data-label`` where they apply,
so a test or a script reads the exact numbers the chart was drawn from.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from catalog_tagger.figures import count, duration, hours, money, percent
from catalog_tagger.report_history import History, RunPoint, TaskHistory

WIDTH, HEIGHT = 560, 170
LEFT, RIGHT, TOP, BOTTOM = 90, 70, 10, 30  # margins: axis labels left (bars) and right (line)
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
ACCENT, BAD, LINE, MUTED = "#2f6fdb", "#c0392b", "#1f8a4c", "#5b6676"
PALETTE = ("#2f6fdb", "#e67e22", "#1f8a4c", "#8e44ad", "#c0392b", "#16a085", "#d4ac0d", "#7f8c8d", "#2c3e50",
           "#e84393", "#6c5ce7", "#00b894")  # fmt: skip


def _esc(v: Any) -> str:
    return html.escape("" if v is None else str(v), quote=True)


def _value(v: Any) -> str:
    """A figure as a data attribute: JSON (exact floats; null for none)."""
    return _esc(json.dumps(v))


def _cost(v: float | None) -> str:
    return "not priced" if v is None else money(v)


@dataclass(frozen=True)
class Series:
    """One figure per shown run, and how to draw and read it."""

    metric: str  # data-metric of its marks
    name: str  # legend
    values: list[float | None]
    show: Callable[[float | None], str]
    colour: str
    task: str | None = None


def _x(i: int, n: int) -> tuple[float, float]:
    """(left edge, width) of run ``i``'s column of ``n``."""
    step = PLOT_W / max(n, 1)
    return LEFT + step * i + step * 0.15, max(step * 0.7, 1.0)


def _y(v: float, top: float) -> float:
    return TOP + PLOT_H * (1 - v / top) if top > 0 else TOP + PLOT_H


def _mark_attrs(s: Series, run: RunPoint, v: Any, label: str | None = None) -> str:
    extra = f' data-task="{_esc(s.task)}"' if s.task is not None else ""
    extra += f' data-label="{_esc(label)}"' if label is not None else ""
    return (
        f'class="mark" data-metric="{_esc(s.metric)}" data-run-id="{_esc(run.run_id)}"{extra} data-value="{_value(v)}"'
    )


def _bars(runs: list[RunPoint], stacked: list[Series], top: float) -> list[str]:
    out = []
    for i, run in enumerate(runs):
        x, w = _x(i, len(runs))
        base = 0.0
        for s in stacked:
            v = s.values[i]
            h = 0.0 if v is None else max(v, 0.0)
            y0, y1 = _y(base + h, top), _y(base, top)
            out.append(
                f'<rect {_mark_attrs(s, run, v)} x="{x:.1f}" y="{y0:.1f}" width="{w:.1f}" height="{y1 - y0:.1f}" '
                f'fill="{s.colour}"><title>{_esc(run.run_id)}: {_esc(s.name)} {_esc(s.show(v))}</title></rect>'
            )
            base += h
    return out


def _line(runs: list[RunPoint], s: Series, top: float) -> list[str]:
    pts, out = [], []
    for i, run in enumerate(runs):
        x, w = _x(i, len(runs))
        v = s.values[i]
        cx, cy = x + w / 2, _y(v or 0.0, top)
        if v is not None:
            pts.append(f"{cx:.1f},{cy:.1f}")
        out.append(
            f'<circle {_mark_attrs(s, run, v)} cx="{cx:.1f}" cy="{cy:.1f}" r="{0 if v is None else 3}" '
            f'fill="{s.colour}"><title>{_esc(run.run_id)}: {_esc(s.name)} {_esc(s.show(v))}</title></circle>'
        )
    line = f'<polyline points="{" ".join(pts)}" fill="none" stroke="{s.colour}" stroke-width="1.5"></polyline>'
    return [line, *out]


def _top(values: list[float | None]) -> float:
    return max((v for v in values if v is not None), default=0.0)


def _axes(runs: list[RunPoint], left: str, right: str | None) -> list[str]:
    bottom = TOP + PLOT_H
    parts = [
        f'<line x1="{LEFT}" y1="{bottom}" x2="{LEFT + PLOT_W}" y2="{bottom}" stroke="{MUTED}"></line>',
        f'<text x="{LEFT - 6}" y="{TOP + 10}" text-anchor="end">{_esc(left)}</text>',
        f'<text x="{LEFT - 6}" y="{bottom}" text-anchor="end">0</text>',
    ]
    if right is not None:
        parts.append(f'<text x="{LEFT + PLOT_W + 6}" y="{TOP + 10}" fill="{LINE}">{_esc(right)}</text>')
    first, last = runs[0], runs[-1]
    parts.append(f'<text x="{LEFT}" y="{bottom + 18}">{_esc(first.run_date or first.run_id)}</text>')
    if len(runs) > 1:
        parts.append(
            f'<text x="{LEFT + PLOT_W}" y="{bottom + 18}" text-anchor="end">{_esc(last.run_date or last.run_id)}</text>'
        )
    return parts


def _legend(series: list[Series]) -> str:
    items = "".join(
        f'<span style="margin-right:12px"><span style="display:inline-block;width:10px;height:10px;'
        f'background:{s.colour};margin-right:4px"></span>{_esc(s.name)}</span>'
        for s in series
    )
    return f'<div class="note">{items}</div>'


def chart(cid: str, title: str, runs: list[RunPoint], bars: list[Series], line: Series | None = None) -> str:
    """Columns per run (``bars`` stacked, left scale) and an optional line (right scale), with a legend."""
    sums = [sum(s.values[i] or 0.0 for s in bars) for i in range(len(runs))]
    top = _top(list(sums))
    parts = _bars(runs, bars, top)
    right = None
    if line is not None:
        line_top = _top(line.values)
        parts += _line(runs, line, line_top)
        right = line.show(line_top)
    shown = bars[0].show(top) if bars else ""
    svg = "".join(_axes(runs, shown, right) + parts)
    return (
        f'<div class="chart" id="{_esc(cid)}"><h3>{_esc(title)}</h3>'
        f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{_esc(title)}">{svg}</svg>'
        f"{_legend([*bars, *([line] if line else [])])}</div>"
    )


def line_chart(cid: str, title: str, runs: list[RunPoint], series: list[Series], top: float) -> str:
    """Lines on one scale from 0 to ``top``."""
    parts = [p for s in series for p in _line(runs, s, top)]
    svg = "".join(_axes(runs, series[0].show(top) if series else "", None) + parts)
    return (
        f'<div class="chart" id="{_esc(cid)}"><h3>{_esc(title)}</h3>'
        f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{_esc(title)}">{svg}</svg>'
        f"{_legend(series)}</div>"
    )


def _label_chart(th: TaskHistory, runs: list[RunPoint], index: int) -> str:
    """Each run's labels as shares of its label assignments, stacked to 100%; the marks carry the counts."""
    parts = []
    for i, run in enumerate(runs):
        counts = th.counts.get(run.run_id)
        if counts is None:
            continue
        x, w = _x(i, len(runs))
        total = sum(counts.values()) or 1
        base = 0.0
        for j, label in enumerate(th.labels):
            n = counts.get(label, 0)
            share = n / total
            y0, y1 = _y(base + share, 1.0), _y(base, 1.0)
            s = Series("label_count", label, [], percent, PALETTE[j % len(PALETTE)], th.name)
            parts.append(
                f'<rect {_mark_attrs(s, run, n, label)} x="{x:.1f}" y="{y0:.1f}" width="{w:.1f}" '
                f'height="{y1 - y0:.1f}" fill="{s.colour}"><title>{_esc(run.run_id)}: {_esc(label)} {n:,} '
                f"({share:.1%})</title></rect>"
            )
            base += share
    legend = [Series("", label, [], percent, PALETTE[j % len(PALETTE)]) for j, label in enumerate(th.labels)]
    svg = "".join(_axes(runs, "100%", None) + parts)
    title = f"{th.name} ({th.kind}): labels per run"
    return (
        f'<div class="chart" id="history-labels-{index}" data-task="{_esc(th.name)}"><h3>{_esc(title)}</h3>'
        f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{_esc(title)}">{svg}</svg>'
        f"{_legend(legend)}</div>"
    )


def _run_charts(h: History) -> list[str]:
    runs = h.runs

    def series(metric: str, name: str, get: Callable[[RunPoint], Any], show: Callable[..., str], colour: str) -> Series:
        return Series(metric, name, [get(r) for r in runs], show, colour)

    return [
        chart("history-images", "Images per run", runs, [
            series("ok", "tagged ok", lambda r: r.ok, count, ACCENT),
            series("error", "errors", lambda r: r.error, count, BAD),
        ]),
        line_chart("history-error-rate", "Error rate per run", runs,
                   [series("error_rate", "errors / rows", lambda r: r.error_rate, percent, BAD)],
                   max(_top([r.error_rate for r in runs]), 0.01)),
        chart("history-wall", "Wall time per run", runs,
              [series("wall_s", "wall time", lambda r: r.wall_s, duration, ACCENT)]),
        chart("history-hours", "Accelerator-hours saved (busy view)", runs,
              [series("accel_hours_saved", "per run", lambda r: r.accel_hours_saved, hours, ACCENT)],
              series("cum_accel_hours_saved", "cumulated", lambda r: r.cum_accel_hours_saved, hours, LINE)),
        chart("history-cost", "Cost saved (busy view)", runs,
              [series("cost_saved", "per run", lambda r: r.cost_saved, _cost, ACCENT)],
              series("cum_cost_saved", "cumulated", lambda r: r.cum_cost_saved, _cost, LINE)),
    ]  # fmt: skip


def _low_chart(h: History) -> str:
    series = [
        Series("low_confidence_share", th.name, [th.low_share.get(r.run_id) for r in h.runs], percent,
               PALETTE[i % len(PALETTE)], th.name)
        for i, th in enumerate(h.tasks)
    ]  # fmt: skip
    top = max([_top(s.values) for s in series] + [0.01])
    return line_chart("history-low-confidence", f"Share of low-confidence predictions (< {h.low_confidence:g})",
                      h.runs, series, top)  # fmt: skip


def _table(h: History) -> str:
    head = ("run date", "run id", "tagged ok", "errors", "error rate", "wall time", "accelerator-hours saved",
            "cost saved", "hours saved, cumulated", "cost saved, cumulated")  # fmt: skip
    rows = [
        (r.run_date, r.run_id, count(r.ok), count(r.error), percent(r.error_rate), duration(r.wall_s),
         hours(r.accel_hours_saved), _cost(r.cost_saved), hours(r.cum_accel_hours_saved), _cost(r.cum_cost_saved))
        for r in reversed(h.runs)
    ]  # fmt: skip
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>" for row in rows)
    th = "".join(f"<th>{_esc(c)}</th>" for c in head)
    return (
        f'<details><summary>Runs (newest first)</summary><table class="history">'
        f"<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></details>"
    )


def history_section(h: History | None) -> str:
    """The section: run charts, label shares per task, low-confidence share, a table; "" without a history."""
    if h is None or not h.runs:
        return ""
    charts = _run_charts(h) + ([_low_chart(h)] if h.tasks else [])
    charts += [_label_chart(th, h.runs, i) for i, th in enumerate(h.tasks)]
    sources = sorted({s for th in h.tasks for s in th.source.values()})
    from_rows = (
        " Runs without a profile in their manifest were read from their committed rows." if "rows" in sources else ""
    )
    note = (
        f"The last {len(h.runs)} of {h.committed} committed runs up to this one, oldest first (at most "
        f"{h.limit} are shown). Savings are the busy view; cumulated over every committed run up to each one, "
        f"unpriced runs counted as nothing. Labels: shares of each run's label assignments over its ok rows "
        f"(hover for counts).{from_rows}"
    )
    return (
        f'<section id="history" data-runs="{len(h.runs)}" data-committed="{h.committed}" data-limit="{h.limit}">'
        f'<h2>History</h2><p class="note">{_esc(note)}</p><div class="charts">{"".join(charts)}</div>'
        f"{_table(h)}</section>"
    )
