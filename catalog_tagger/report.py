"""One self-contained HTML page per run: savings, throughput, label charts, errors and a filterable gallery."""

from __future__ import annotations

import base64
import html
import importlib.resources
import io
import json
import logging
import posixpath
import string
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow.parquet as pq

from catalog_tagger.decode import _to_rgb
from catalog_tagger.errors import UserError
from catalog_tagger.query import Catalog, open_catalog, read_parquet_sql, run_sql, sql_ident, sql_string
from catalog_tagger.schema import STATUS_ERROR, STATUS_OK
from catalog_tagger.storage import filesystem, join, protocol_of, read_bytes, strip, write_bytes_atomic

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 48  # gallery cards
THUMB_PX = 128  # longest side of a gallery thumbnail
MAX_ERROR_ROWS = 1000  # error rows listed on the page (the total is always shown)
_THUMB_WORKERS = 8  # thumbnails are object-store reads: I/O bound


@dataclass(frozen=True)
class TaskInfo:
    name: str
    kind: str  # multiclass | multilabel
    labels: list[str]


@dataclass
class Card:
    uri: str
    tags: dict[str, list[str]]  # task -> labels (one for multiclass)
    scores: dict[str, float | None] = field(default_factory=dict)  # multiclass score per task
    thumb: tuple[str, int, int] | None = None  # (data URI, width, height)


@dataclass
class ReportData:
    """Everything the page shows, gathered before any HTML is written."""

    manifest: dict[str, Any]
    tasks: list[TaskInfo]
    ok: int
    distributions: dict[str, list[tuple[str, int]]]  # task -> (label, count), config order; "(no label)" last
    errors: list[tuple[str, str]]  # (uri, reason), first MAX_ERROR_ROWS by uri
    error_total: int
    error_kinds: list[tuple[str, int]]  # ("decode", n), ("read", n)
    cards: list[Card]


# --------------------------------------------------------------------------------------------- gather
def _task_infos(cat: Catalog, manifest: dict[str, Any], files: list[str]) -> list[TaskInfo]:
    """Tasks with kinds and full label lists, from the Parquet schema metadata (falls back to observed labels)."""
    names = list(manifest.get("tasks") or [])
    meta: dict[str, Any] = {}
    if files:
        fs = filesystem(files[0], cat.layout.storage_options)
        try:
            with fs.open(strip(files[0]), "rb") as fh:
                raw = (pq.read_schema(fh).metadata or {}).get(b"catalog_tagger.tasks")
            if raw:
                meta = {t["name"]: t for t in json.loads(raw)["tasks"]}
        except (OSError, ValueError, KeyError) as err:
            log.warning("cannot read task metadata from %s: %s", files[0], err)
    cols = {row[0]: row[1] for row in cat.con.sql("DESCRIBE run_rows").fetchall()}
    out = []
    for name in names:
        if name not in cols:
            continue
        if name in meta:
            out.append(TaskInfo(name, meta[name]["kind"], [str(x) for x in meta[name]["labels"]]))
            continue
        kind = "multilabel" if cols[name].endswith("[]") else "multiclass"
        expr = f"unnest({sql_ident(name)})" if kind == "multilabel" else sql_ident(name)
        seen = run_sql(
            cat.con, f"SELECT DISTINCT v FROM (SELECT {expr} AS v FROM run_rows) WHERE v IS NOT NULL ORDER BY v"
        )
        out.append(TaskInfo(name, kind, [str(v) for v in seen.column("v").to_pylist()]))
    return out


def _distribution(cat: Catalog, task: TaskInfo) -> list[tuple[str, int]]:
    col = sql_ident(task.name)
    ok = sql_string(STATUS_OK)
    if task.kind == "multiclass":
        sql = f"SELECT {col} AS label, count(*) AS n FROM run_rows WHERE status = {ok} GROUP BY 1"
    else:
        labels = f"SELECT unnest({col}) AS label FROM run_rows WHERE status = {ok}"
        sql = f"SELECT label, count(*) AS n FROM ({labels}) GROUP BY 1"
    counts = {r["label"]: r["n"] for r in run_sql(cat.con, sql).to_pylist()}
    rows = [(label, int(counts.pop(label, 0))) for label in task.labels]
    rows += [(str(label), int(n)) for label, n in sorted(counts.items(), key=lambda x: str(x[0])) if label is not None]
    if task.kind == "multilabel":
        none = run_sql(cat.con, f"SELECT count(*) AS n FROM run_rows WHERE status = {ok} AND len({col}) = 0")
        rows.append(("(no label)", int(none.column("n")[0].as_py())))
    return rows


def thumbnail(
    uri: str, storage_options: dict[str, Any] | None = None, px: int = THUMB_PX
) -> tuple[str, int, int] | None:
    """A JPEG data URI of the image at ``uri``, longest side ``px``; None when it cannot be read any more."""
    from PIL import Image, ImageOps

    try:
        data = read_bytes(uri, storage_options)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
                img.draft("RGB", (px * 2, px * 2))  # libjpeg DCT scaling: much faster for large photos
            img = _to_rgb(ImageOps.exif_transpose(img))
            img.thumbnail((px, px), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=80)
    except Exception as err:  # noqa: BLE001 - a vanished or unreadable image must not stop the report
        log.warning("report: no thumbnail for %s: %s", uri, err)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.width, img.height


def _cards(cat: Catalog, tasks: list[TaskInfo], sample: int, storage_options: dict[str, Any] | None) -> list[Card]:
    cols = ["uri"]
    for t in tasks:
        cols.append(sql_ident(t.name))
        if t.kind == "multiclass":
            cols.append(f"{sql_ident(t.name + '_score')} AS {sql_ident('_score_' + t.name)}")
    # md5 of the uri: a deterministic sample that does not favour any folder or name prefix.
    rows = run_sql(
        cat.con,
        f"SELECT {', '.join(cols)} FROM run_rows WHERE status = ? ORDER BY md5(uri), uri LIMIT {int(sample)}",
        [STATUS_OK],
    ).to_pylist()
    cards = []
    for r in rows:
        tags: dict[str, list[str]] = {}
        scores: dict[str, float | None] = {}
        for t in tasks:
            v = r.get(t.name)
            tags[t.name] = (
                [str(x) for x in (v or [])] if t.kind == "multilabel" else ([str(v)] if v is not None else [])
            )
            if t.kind == "multiclass":
                scores[t.name] = r.get("_score_" + t.name)
        cards.append(Card(uri=r["uri"], tags=tags, scores=scores))
    with ThreadPoolExecutor(max_workers=_THUMB_WORKERS) as pool:
        for card, thumb in zip(cards, pool.map(lambda c: thumbnail(c.uri, storage_options), cards), strict=True):
            card.thumb = thumb
    return cards


def gather(
    output: str,
    run_id: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    sample: int = DEFAULT_SAMPLE,
) -> ReportData:
    """Read one committed run (the latest when ``run_id`` is None) into what the page shows."""
    cat = open_catalog(output, storage_options)
    try:
        manifest = cat.manifest(run_id)
        files = cat.files(manifest)
        if not files:
            raise UserError(f"run {manifest['run_id']} committed no files: nothing to report")
        cat.con.execute(f"CREATE TEMP VIEW run_rows AS SELECT * FROM {read_parquet_sql(files)}")
        tasks = _task_infos(cat, manifest, files)
        counts = run_sql(
            cat.con, "SELECT count(*) FILTER (status = ?) AS ok, count(*) FILTER (status = ?) AS err FROM run_rows",
            [STATUS_OK, STATUS_ERROR],
        ).to_pylist()[0]  # fmt: skip
        errors = run_sql(
            cat.con,
            f"SELECT uri, error FROM run_rows WHERE status = ? ORDER BY uri LIMIT {MAX_ERROR_ROWS}",
            [STATUS_ERROR],
        ).to_pylist()
        kinds = run_sql(
            cat.con,
            "SELECT split_part(coalesce(error, 'unknown'), ':', 1) AS kind, count(*) AS n FROM run_rows "
            "WHERE status = ? GROUP BY 1 ORDER BY 2 DESC, 1",
            [STATUS_ERROR],
        ).to_pylist()
        return ReportData(
            manifest=manifest,
            tasks=tasks,
            ok=int(counts["ok"]),
            distributions={t.name: _distribution(cat, t) for t in tasks},
            errors=[(r["uri"], r["error"] or "") for r in errors],
            error_total=int(counts["err"]),
            error_kinds=[(r["kind"], int(r["n"])) for r in kinds],
            cards=_cards(cat, tasks, sample, storage_options),
        )
    finally:
        cat.con.close()


# --------------------------------------------------------------------------------------------- render
def esc(v: Any) -> str:
    """HTML-escape any value for text and for quoted attributes."""
    return html.escape("" if v is None else str(v), quote=True)


def _num(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}" if v == 0 or abs(v) >= 0.1 else f"{v:.3g}"


def _money(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"${v:,.2f}" if v == 0 or abs(v) >= 0.01 else f"${v:.3g}"


def savings_items(s: dict[str, Any]) -> list[tuple[str, str, str, Any]]:
    """(manifest key, label, shown text, raw manifest value) for every savings field."""
    method = s.get("method") or "none"
    single_label = {
        "calibrated": "single-task accelerator-hours (calibrated: a timed single-task pass on the same device, "
        "scaled to this run; not a real single-task run)",
        "baseline-artifacts": "single-task accelerator-hours (measured with the user's single-task artifacts)",
    }.get(method, f"single-task accelerator-hours ({method}: not measured)")
    price = s.get("price_per_hour")
    decode_saved = s.get("decode_cpu_s_saved")
    frac = s.get("fraction_saved")
    return [
        ("images", "images (ok)", f"{s.get('images', 0):,}", s.get("images")),
        ("tasks", "tasks", str(s.get("tasks")), s.get("tasks")),
        ("device", "device", str(s.get("device")), s.get("device")),
        ("multi_head_accel_hours", "multi-head accelerator-hours (measured)", _num(s.get("multi_head_accel_hours")),
         s.get("multi_head_accel_hours")),
        ("single_task_accel_hours", single_label, _num(s.get("single_task_accel_hours")),
         s.get("single_task_accel_hours")),
        ("accel_hours_saved", "accelerator-hours saved", _num(s.get("accel_hours_saved")), s.get("accel_hours_saved")),
        ("fraction_saved", "fraction saved", "n/a" if frac is None else f"{frac:.1%}", frac),
        ("cost_saved", f"cost saved at {_money(price)} per accelerator-hour", _money(s.get("cost_saved")),
         s.get("cost_saved")),
        ("decode_cpu_s_saved", "decode CPU-hours saved (n pipelines decode n times)",
         _num(None if decode_saved is None else decode_saved / 3600.0), decode_saved),
        ("method", "method", method, s.get("method")),
    ]  # fmt: skip


def _kv_table(rows: list[tuple[str, str, str, Any]], attr: str) -> str:
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
    multi, single = s.get("multi_head_accel_hours") or 0.0, s.get("single_task_accel_hours") or 0.0
    top = max(multi, single) or 1.0
    bars = (
        '<svg class="compare" width="420" height="56" role="img" aria-label="accelerator-hours compared">'
        f'<rect x="175" y="4" width="{235 * single / top:.1f}" height="20" fill="#b9c6da"></rect>'
        f'<text x="0" y="19">{len(m.get("tasks") or [])} single-task models</text>'
        f'<rect x="175" y="32" width="{235 * multi / top:.1f}" height="20" fill="#2f6fdb"></rect>'
        '<text x="0" y="47">one multi-head model</text></svg>'
    )
    frac = s.get("fraction_saved") or 0.0
    return (
        '<section id="savings"><h2>Savings vs one single-task model per task</h2><div class="cols">'
        f"{_kv_table(savings_items(s), 'savings')}"
        f'<div><p class="hl">{frac:.0%} of the accelerator time saved</p>{bars}'
        '<p class="note">Accelerator-hours are busy time of the model (synchronised on GPU), not wall time.</p>'
        "</div></div></section>"
    )


def _throughput_section(m: dict[str, Any]) -> str:
    c, t = m.get("counts") or {}, m.get("timings") or {}
    ips = t.get("images_per_s")
    rows = [
        ("images_per_s", "images/s (tagged ok / pipeline time)", "n/a" if ips is None else f"{ips:,.1f}", ips),
        ("wall_s", "wall time, s (incl. listing and start-up)", _num(t.get("wall_s"), 1), t.get("wall_s")),
        ("pipeline_s", "pipeline time, s", _num(t.get("pipeline_s"), 1), t.get("pipeline_s")),
        ("listed", "images listed", f"{c.get('listed', 0):,}", c.get("listed")),
        ("unchanged", "unchanged (skipped, incremental)", f"{c.get('unchanged', 0):,}", c.get("unchanged")),
        ("ok", "tagged ok", f"{c.get('ok', 0):,}", c.get("ok")),
        ("error", "errors", f"{c.get('error', 0):,}", c.get("error")),
    ]
    return f'<section id="throughput"><h2>Throughput</h2>{_kv_table(rows, "throughput")}</section>'


def _chart(task: TaskInfo, dist: list[tuple[str, int]]) -> str:
    total = sum(n for _, n in dist) or 1
    top = max((n for _, n in dist), default=0) or 1
    row_h, label_w, bar_w = 22, 130, 240
    parts = [
        f'<div class="chart" data-task="{esc(task.name)}"><h3>{esc(task.name)} <small>({esc(task.kind)})</small></h3>',
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


def _labels_section(data: ReportData) -> str:
    charts = "".join(_chart(t, data.distributions[t.name]) for t in data.tasks)
    note = "Counts over the ok rows of this run; a multilabel image counts once per label."
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
        text = ", ".join(labels) if labels else "\u2014"
        score = card.scores.get(t.name)
        extra = f" <small>{score:.2f}</small>" if score is not None else ""
        items.append(f"<li><b>{esc(t.name)}</b>: {esc(text)}{extra}</li>")
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
    m = data.manifest
    body = "".join(
        [
            _header(m),
            "<main>",
            _savings_section(m),
            _throughput_section(m),
            _labels_section(data),
            _gallery_section(data),
            _errors_section(data),
            f'<p class="note">Generated {esc(datetime.now(UTC).isoformat(timespec="seconds"))} by catalog-tagger '
            f"from runs/{esc(m.get('run_id'))}.json; only files listed in that manifest were read.</p>",
            "</main>",
        ]
    )
    page = importlib.resources.files("catalog_tagger").joinpath("templates/report.html").read_text("utf-8")
    payload = {
        "run_id": m.get("run_id"),
        "tasks": [{"name": t.name, "kind": t.kind, "labels": t.labels} for t in data.tasks],
    }
    return string.Template(page).substitute(
        title=esc(f"catalog-tagger run {m.get('run_id')}"), body=body, data=_script_json(payload)
    )


def render_report(
    output: str,
    run_id: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    sample: int = DEFAULT_SAMPLE,
) -> str:
    """The HTML page of one committed run (the latest when ``run_id`` is None): one file, no network needed."""
    return render_html(gather(output, run_id, storage_options=storage_options, sample=sample))


def write_report(
    output: str,
    run_id: str | None = None,
    *,
    out: str | None = None,
    storage_options: dict[str, Any] | None = None,
    sample: int = DEFAULT_SAMPLE,
) -> str:
    """Render and write the page atomically; default ``OUT/reports/<run_id>.html``. Returns where it went."""
    data = gather(output, run_id, storage_options=storage_options, sample=sample)
    target = out or join(output, "reports", f"{data.manifest['run_id']}.html")
    opts = storage_options if protocol_of(target) == protocol_of(output) else None
    write_bytes_atomic(target, render_html(data).encode("utf-8"), opts)
    log.info("report for run %s written to %s", data.manifest["run_id"], target)
    return target
