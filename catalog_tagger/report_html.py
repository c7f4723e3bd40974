"""The run report's page: what it shows (``ReportData``) rendered into one self-contained, escaped HTML file."""

from __future__ import annotations

import html
import importlib.resources
import json
import posixpath
import string
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from catalog_tagger.figures import VIEWS_NOTE, count, savings_notes, savings_rows, timing_rows
from catalog_tagger.kinds import Kind
from catalog_tagger.near_duplicates import NearDupSummary, near_duplicates_section
from catalog_tagger.report_history import History
from catalog_tagger.report_history_svg import history_section


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: Kind
    labels: list[str]
    multi: bool  # the label column holds a list (zero or more labels per image), not one label


@dataclass(frozen=True)
class Histogram:
    """A numeric (regression) task's values in a run: equal bins from ``lo`` to ``hi``."""

    lo: float | None  # the lowest value (None: no values)
    hi: float | None  # the highest
    counts: list[int]  # values per bin, lowest bin first
    mean: float | None


@dataclass
class Card:
    uri: str
    tags: dict[str, list[str]]  # task -> its labels on this image (exactly one for a multiclass task)
    scores: dict[str, float] = field(default_factory=dict)  # task -> the score of its one label, where it has one
    thumb: tuple[str, int, int] | None = None  # (data URI, width, height)


@dataclass
class ReportData:
    """Everything the page shows, gathered before any HTML is written."""

    manifest: dict[str, Any]
    tasks: list[TaskInfo]
    ok: int
    distributions: dict[str, list[tuple[str, int]]]  # task -> (label, count), config order; "(no label)" last
    errors: list[tuple[str, str]]  # (uri, reason), the first ones by uri
    error_total: int
    error_kinds: list[tuple[str, int]]  # ("decode", n), ("read", n)
    cards: list[Card]
    history: History | None = None  # the output's committed runs up to this one (report_history)
    near_duplicates: NearDupSummary | None = None  # pairs at the default threshold (near_duplicates.summary)
    histograms: dict[str, Histogram] = field(default_factory=dict)  # numeric (regression) task -> its values


def esc(v: Any) -> str:
    """HTML-escape any value for text and for quoted attributes."""
    return html.escape("" if v is None else str(v), quote=True)


def _kv_table(rows: list[tuple[str, str, str, Any]], attr: str) -> str:
    """(key, label, shown, raw) rows; each value cell carries its key and raw JSON value for scripts and tests."""
    out = [f'<table class="kv" id="{attr}">']
    for key, label, shown, raw in rows:
        out.append(
            f'<tr><th scope="row">{esc(label)}</th><td class="num" data-{attr}-key="{esc(key)}" '
            f'data-value="{esc(json.dumps(raw))}">{esc(shown)}</td></tr>'
        )
    out.append("</table>")
    return "".join(out)


def _savings_section(m: dict[str, Any]) -> str:
    s = m.get("savings") or {}
    if not s:
        return '<section id="savings"><h2>Savings</h2><p>This run has no savings report.</p></section>'
    multi, single = s.get("multi_head_accel_s") or 0.0, s.get("single_task_accel_s") or 0.0
    top = max(multi, single) or 1.0
    bars = (
        '<svg class="compare" width="420" height="56" role="img" aria-label="accelerator time compared">'
        f'<rect x="175" y="4" width="{235 * single / top:.1f}" height="20" fill="#b9c6da"></rect>'
        f'<text x="0" y="19">{len(m.get("tasks") or [])} single-task models</text>'
        f'<rect x="175" y="32" width="{235 * multi / top:.1f}" height="20" fill="#2f6fdb"></rect>'
        '<text x="0" y="47">one multi-head model</text></svg>'
    )
    frac = s.get("fraction_saved")
    headline = (
        "no single-task figures (not calibrated)" if frac is None else f"{frac:.0%} of the busy accelerator time saved"
    )
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in savings_notes(m))
    return (
        '<section id="savings"><h2>Savings vs one single-task model per task</h2><div class="cols">'
        f"{_kv_table(savings_rows(s), 'savings')}"
        f'<div><p class="hl">{esc(headline)}</p>{bars}'
        f'<p class="note">{esc(VIEWS_NOTE)}</p>'
        f"{notes}</div></div></section>"
    )


def _throughput_section(m: dict[str, Any]) -> str:
    c = m.get("counts") or {}
    rows = timing_rows(m.get("timings") or {})
    rows += [
        ("listed", "images listed", count(c.get("listed", 0)), c.get("listed")),
        ("unchanged", "unchanged (skipped, incremental)", count(c.get("unchanged", 0)), c.get("unchanged")),
        ("resumed", "resumed (staged by an earlier attempt)", count(c.get("resumed", 0)), c.get("resumed")),
        ("ok", "tagged ok", count(c.get("ok", 0)), c.get("ok")),
        ("error", "errors", count(c.get("error", 0)), c.get("error")),
    ]
    return f'<section id="throughput"><h2>Throughput</h2>{_kv_table(rows, "throughput")}</section>'


def _chart(task: TaskInfo, dist: list[tuple[str, int]]) -> str:
    total = sum(n for _, n in dist) or 1
    top = max((n for _, n in dist), default=0) or 1
    row_h, label_w, bar_w = 22, 130, 240
    parts = [
        f'<div class="chart" data-task="{esc(task.name)}"><h3>{esc(task.name)} '
        f"<small>({esc(task.kind.name)})</small></h3>",
        f'<svg width="{label_w + bar_w + 90}" height="{row_h * len(dist) + 4}" role="img" '
        f'aria-label="{esc(task.name)} label counts">',
    ]
    for i, (label, n) in enumerate(dist):
        y = i * row_h + 2
        shown = label if len(label) <= 18 else label[:17] + "\u2026"
        parts.append(
            f'<g class="bar-row" data-label="{esc(label)}" data-count="{n}"><title>{esc(label)}: {n:,} '
            f"({n / total:.1%})</title>"
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{esc(shown)}</text>'
            f'<rect class="track" x="{label_w}" y="{y + 2}" width="{bar_w}" height="{row_h - 6}"></rect>'
            f'<rect class="bar" x="{label_w}" y="{y + 2}" width="{bar_w * n / top:.1f}" height="{row_h - 6}"></rect>'
            f'<text class="count" x="{label_w + bar_w + 6}" y="{y + 14}">{n:,}</text></g>'
        )
    parts.append("</svg></div>")
    return "".join(parts)


def _histogram(task: TaskInfo, h: Histogram | None) -> str:
    """A numeric task's histogram: one vertical bar per bin, the range and the mean under it (inline SVG)."""
    head = (
        f'<div class="chart histogram" data-task="{esc(task.name)}"><h3>{esc(task.name)} '
        f"<small>({esc(task.kind.name)})</small></h3>"
    )
    if h is None or h.lo is None or h.hi is None or not h.counts:
        return head + "<p>No values in this run.</p></div>"
    plot_w, plot_h, pad = 360, 120, 4
    top = max(h.counts) or 1
    bar = plot_w / len(h.counts)
    step = (h.hi - h.lo) / len(h.counts)
    parts = [
        head,
        f'<svg width="{plot_w + 2 * pad}" height="{plot_h + 36}" role="img" aria-label="{esc(task.name)} histogram">',
    ]
    for i, n in enumerate(h.counts):
        a, b = h.lo + i * step, h.lo + (i + 1) * step
        height = plot_h * n / top
        parts.append(
            f'<g class="bin" data-bin="{i}" data-lo="{a!r}" data-hi="{b!r}" data-count="{n}">'
            f"<title>[{a:.4g}, {b:.4g}]: {n:,}</title>"
            f'<rect class="bar" x="{pad + i * bar + 1:.1f}" y="{pad + plot_h - height:.1f}" '
            f'width="{max(bar - 2, 1):.1f}" height="{height:.1f}"></rect></g>'
        )
    y = plot_h + pad + 16
    mean = "" if h.mean is None else f"mean {h.mean:.4g}"
    parts.append(
        f'<text x="{pad}" y="{y}">{h.lo:.4g}</text>'
        f'<text x="{pad + plot_w}" y="{y}" text-anchor="end">{h.hi:.4g}</text>'
        f'<text class="count" x="{pad + plot_w / 2:.1f}" y="{y + 14}" text-anchor="middle">{esc(mean)} '
        f"(n={sum(h.counts):,})</text></svg></div>"
    )
    return "".join(parts)


def _labels_section(data: ReportData) -> str:
    charts = "".join(
        _histogram(t, data.histograms.get(t.name)) if t.kind.numeric else _chart(t, data.distributions[t.name])
        for t in data.tasks
    )
    note = (
        "Counts over the ok rows of this run; a multilabel image counts once per label; a regression task shows the "
        "histogram of its values."
    )
    return (
        f'<section id="labels"><h2>Labels per task</h2><div class="charts">{charts}</div>'
        f'<p class="note">{note}</p></section>'
    )


def _card_html(card: Card, tasks: list[TaskInfo]) -> str:
    name = posixpath.basename(card.uri.rstrip("/")) or card.uri
    if card.thumb is None:
        thumb = '<div class="missing">image unavailable</div>'
    else:
        src, w, h = card.thumb
        thumb = f'<img src="{src}" width="{w}" height="{h}" alt="{esc(name)}" loading="eager">'
    items = []
    for t in tasks:
        labels = card.tags.get(t.name) or []
        shown = ", ".join(labels) if labels else "\u2014"
        score = card.scores.get(t.name)
        extra = f" <small>{score:.2f}</small>" if score is not None else ""
        items.append(f"<li><b>{esc(t.name)}</b>: {esc(shown)}{extra}</li>")
    return (
        f'<figure class="card" data-uri="{esc(card.uri)}" data-tags="{esc(json.dumps(card.tags, ensure_ascii=False))}">'
        f'<div class="thumb">{thumb}</div><figcaption><div class="name" title="{esc(card.uri)}">{esc(name)}</div>'
        f"<ul>{''.join(items)}</ul></figcaption></figure>"
    )


def _gallery_section(data: ReportData) -> str:
    cards = "".join(_card_html(c, data.tasks) for c in data.cards)
    return (
        '<section id="gallery"><h2>Sample images</h2>'
        '<div class="filters"><label>task <select id="filter-task"><option value="">any task</option></select></label>'
        '<label>label <select id="filter-label"></select></label><output id="filter-count"></output></div>'
        f'<div class="gallery">{cards}</div>'
        f'<p class="note">A deterministic sample of {len(data.cards)} of the {data.ok:,} ok rows (ordered by a hash of '
        "the uri), read from the original images.</p></section>"
    )


def _errors_section(data: ReportData) -> str:
    if not data.error_total:
        return '<section id="errors"><h2>Errors</h2><p>No errors: every image was tagged.</p></section>'
    kinds = ", ".join(f"{esc(k)}: {n:,}" for k, n in data.error_kinds)
    rows = "".join(f'<tr><td class="uri">{esc(u)}</td><td class="reason">{esc(r)}</td></tr>' for u, r in data.errors)
    more = (
        f'<p class="note">Showing {len(data.errors):,} of {data.error_total:,}; query the rest with '
        "<code>catalog-tagger query</code>.</p>"
        if data.error_total > len(data.errors)
        else ""
    )
    return (
        f'<section id="errors"><h2>Errors ({data.error_total:,})</h2><p>{kinds}</p>'
        f'<table class="errors"><thead><tr><th>uri</th><th>reason</th></tr></thead><tbody>{rows}</tbody></table>'
        f"{more}</section>"
    )


def _header(m: dict[str, Any]) -> str:
    items = [
        ("model version", m.get("model_version")),
        ("run date", m.get("run_date")),
        ("started", m.get("started_at")),
        ("finished", m.get("finished_at")),
        ("source", m.get("source")),
        ("model", m.get("model")),
        ("mode", "incremental" if m.get("incremental") else "full"),
    ]
    dl = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in items)
    return f'<header><h1>catalog-tagger run <code id="run-id">{esc(m.get("run_id"))}</code></h1><dl>{dl}</dl></header>'


def _script_json(obj: Any) -> str:
    # Inside <script>: no "</script>" or "<!--" can appear once "<", ">" and "&" are unicode escapes.
    return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_html(data: ReportData) -> str:
    """The page: header, savings, throughput, the output's history, label charts, gallery (filtered by the page's
    script) and errors."""
    m = data.manifest
    body = "".join(
        [
            _header(m),
            "<main>",
            _savings_section(m),
            _throughput_section(m),
            history_section(data.history),
            _labels_section(data),
            _gallery_section(data),
            near_duplicates_section(data.near_duplicates),
            _errors_section(data),
            f'<p class="note">Generated {esc(datetime.now(UTC).isoformat(timespec="seconds"))} by catalog-tagger '
            f"from the Delta commit of run {esc(m.get('run_id'))}; only rows that commit added were read.</p>",
            "</main>",
        ]
    )
    page = importlib.resources.files("catalog_tagger").joinpath("templates/report.html").read_text("utf-8")
    payload = {
        "run_id": m.get("run_id"),
        # the gallery filters by label: numeric (regression) tasks have none to filter by
        "tasks": [{"name": t.name, "kind": t.kind.name, "labels": t.labels} for t in data.tasks if not t.kind.numeric],
    }
    return string.Template(page).substitute(
        title=esc(f"catalog-tagger run {m.get('run_id')}"), body=body, data=_script_json(payload)
    )
