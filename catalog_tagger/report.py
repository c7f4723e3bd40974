"""The HTML run report: gather one committed run (SQL over its rows in the history table, thumbnails) and write
its page."""

from __future__ import annotations

import base64
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from catalog_tagger.decode import load_rgb
from catalog_tagger.errors import UserError
from catalog_tagger.fetch import read_bounded
from catalog_tagger.kinds import KINDS
from catalog_tagger.near_duplicates import summary as near_duplicates_summary
from catalog_tagger.query import Catalog, open_catalog, run_sql, sql_ident, sql_string
from catalog_tagger.report_history import DEFAULT_HISTORY_RUNS, gather_history
from catalog_tagger.report_html import Card, Histogram, ReportData, TaskInfo, render_html
from catalog_tagger.schema import STATUS_ERROR, STATUS_OK
from catalog_tagger.storage import join, protocol_of, write_bytes_atomic
from catalog_tagger.tag import delta

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 48  # gallery cards
THUMB_PX = 128  # longest side of a gallery thumbnail
MAX_ERROR_ROWS = 1000  # error rows listed on the page (the total is always shown)
HISTOGRAM_BINS = 20  # a regression task's histogram: equal bins from the run's lowest value to its highest
_THUMB_WORKERS = 8  # thumbnails are object-store reads: I/O bound


def _tasks_metadata(cat: Catalog, manifest: dict[str, Any]) -> dict[str, Any]:
    """Task name -> its kind and full label list, as the job wrote them into a data file's schema metadata (the
    footer of one file of the run's partition; none when the files carry no such metadata)."""
    if cat.history is None or not manifest.get("run_date"):
        return {}
    ds = delta.dataset(cat.history)
    day = pc.field(delta.PARTITION) == pa.scalar(date.fromisoformat(manifest["run_date"]))
    frags = list(ds.get_fragments(filter=day))
    frags = [f for f in frags if f"part-{manifest['run_id']}-" in f.path] or frags
    if not frags:
        return {}
    try:
        raw = (frags[0].physical_schema.metadata or {}).get(b"catalog_tagger.tasks")
        return {t["name"]: t for t in json.loads(raw)["tasks"]} if raw else {}
    except (OSError, ValueError, KeyError) as err:
        log.warning("cannot read task metadata from %s: %s", frags[0].path, err)
        return {}


def _labels_sql(name: str, multi: bool) -> str:
    """SQL for a row's labels as a list, whatever the column's shape (one label, or a list of them)."""
    return sql_ident(name) if multi else f"[{sql_ident(name)}]"


def _task_infos(cat: Catalog, manifest: dict[str, Any]) -> list[TaskInfo]:
    """Tasks with kinds and full label lists, from the Parquet schema metadata (falls back to observed labels).

    The SQL follows each label column's shape in the files (a list or one value), so it holds for any kind.
    """
    meta = _tasks_metadata(cat, manifest)
    cols = {row[0]: row[1] for row in cat.con.sql("DESCRIBE run_rows").fetchall()}
    out = []
    for name in manifest.get("tasks") or []:
        if name not in cols:
            continue
        multi = cols[name].endswith("[]")
        # Files without metadata (older versions) are told apart by the column's type: a list, a number, a label.
        shape = "multilabel" if multi else "regression" if cols[name] in ("FLOAT", "DOUBLE") else "multiclass"
        kind = KINDS.get(meta.get(name, {}).get("kind"), KINDS[shape])
        if name in meta:
            out.append(TaskInfo(name, kind, [str(x) for x in meta[name]["labels"]], multi))
            continue
        if kind.numeric:
            out.append(TaskInfo(name, kind, [], multi))
            continue
        labels = f"SELECT unnest({_labels_sql(name, multi)}) AS v FROM run_rows"
        seen = run_sql(cat.con, f"SELECT DISTINCT v FROM ({labels}) WHERE v IS NOT NULL ORDER BY v")
        out.append(TaskInfo(name, kind, [str(v) for v in seen.column("v").to_pylist()], multi))
    return out


def _distribution(cat: Catalog, task: TaskInfo) -> list[tuple[str, int]]:
    """(label, count) over the ok rows: every configured label in order, then any other; "(no label)" last."""
    ok = sql_string(STATUS_OK)
    labels = f"SELECT unnest({_labels_sql(task.name, task.multi)}) AS label FROM run_rows WHERE status = {ok}"
    found = run_sql(cat.con, f"SELECT label, count(*) AS n FROM ({labels}) GROUP BY 1").to_pylist()
    counts = {r["label"]: r["n"] for r in found}
    rows = [(label, int(counts.pop(label, 0))) for label in task.labels]
    rows += [(str(label), int(n)) for label, n in sorted(counts.items(), key=lambda x: str(x[0])) if label is not None]
    if task.multi:
        none = run_sql(
            cat.con, f"SELECT count(*) AS n FROM run_rows WHERE status = {ok} AND len({sql_ident(task.name)}) = 0"
        )
        rows.append(("(no label)", int(none.column("n")[0].as_py())))
    return rows


def _histogram(cat: Catalog, task: TaskInfo, bins: int = HISTOGRAM_BINS) -> Histogram:
    """A numeric task's values over the ok rows: ``bins`` equal bins from the lowest value to the highest."""
    v = sql_ident(task.name)
    where = f"status = {sql_string(STATUS_OK)} AND {v} IS NOT NULL AND isfinite({v})"
    stats = run_sql(cat.con, f"SELECT min({v}) AS lo, max({v}) AS hi, avg({v}) AS mean, count(*) AS n FROM run_rows "
                    f"WHERE {where}").to_pylist()[0]  # fmt: skip
    if not stats["n"]:
        return Histogram(lo=None, hi=None, counts=[], mean=None)
    lo, hi = float(stats["lo"]), float(stats["hi"])
    width = (hi - lo) / bins
    if width <= 0:  # every value the same: one bin
        return Histogram(lo=lo, hi=hi, counts=[int(stats["n"])], mean=float(stats["mean"]))
    found = run_sql(
        cat.con,
        f"SELECT least(CAST(floor(({v} - {lo!r}) / {width!r}) AS INTEGER), {bins - 1}) AS b, count(*) AS n "
        f"FROM run_rows WHERE {where} GROUP BY b",
    ).to_pylist()
    counts = [0] * bins
    for r in found:
        counts[int(r["b"])] += int(r["n"])
    return Histogram(lo=lo, hi=hi, counts=counts, mean=float(stats["mean"]))


def thumbnail(
    uri: str, storage_options: dict[str, Any] | None = None, px: int = THUMB_PX
) -> tuple[str, int, int] | None:
    """A JPEG data URI of the image at ``uri``, longest side ``px``; None when it cannot be read any more.

    The read and the decode are the tagging run's own bounded ones (``fetch.read_bounded``, ``decode.load_rgb``):
    a report over huge or hostile images stays within the same per-image memory and time.
    """
    from PIL import Image

    try:
        img, _, _ = load_rgb(read_bounded(uri, storage_options), px * 2)
        img.thumbnail((px, px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
    except Exception as err:  # noqa: BLE001 - a vanished or unreadable image must not stop the report
        log.warning("report: no thumbnail for %s: %s", uri, err)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.width, img.height


def _tags(task: TaskInfo, value: Any) -> list[str]:
    """One row's label cell as a list (empty for none); a number as its text."""
    if task.kind.numeric:
        return [] if value is None else [f"{value:.4g}"]
    if task.multi:
        return [str(x) for x in value or []]
    return [] if value is None else [str(value)]


def _cards(cat: Catalog, tasks: list[TaskInfo], sample: int, storage_options: dict[str, Any] | None) -> list[Card]:
    cols = ["uri"]
    for t in tasks:
        cols.append(sql_ident(t.name))
        if t.kind.score_column:  # a numeric task (regression) has no score column
            cols.append(f"{sql_ident(t.name + t.kind.score_column)} AS {sql_ident('_score_' + t.name)}")
    # md5 of the uri: a deterministic sample that does not favour any folder or name prefix.
    rows = run_sql(
        cat.con,
        f"SELECT {', '.join(cols)} FROM run_rows WHERE status = ? ORDER BY md5(uri), uri LIMIT {int(sample)}",
        [STATUS_OK],
    ).to_pylist()
    cards = []
    for r in rows:
        tags = {t.name: _tags(t, r.get(t.name)) for t in tasks}
        # A card shows the score of a task's one label; a task with a score per label (a list) shows none.
        scores = {t.name: s for t in tasks if isinstance(s := r.get("_score_" + t.name), float)}
        cards.append(Card(uri=r["uri"], tags=tags, scores=scores))
    with ThreadPoolExecutor(max_workers=_THUMB_WORKERS) as pool:
        for card, thumb in zip(cards, pool.map(lambda c: thumbnail(c.uri, storage_options), cards), strict=True):
            card.thumb = thumb
    return cards


def _run_rows(cat: Catalog, manifest: dict[str, Any]) -> None:
    """The temporary view ``run_rows``: the run's rows of the history, its partition the only one read."""
    where = f"run_id = {sql_string(manifest['run_id'])}"
    if manifest.get("run_date"):
        where = f"{delta.PARTITION} = DATE {sql_string(manifest['run_date'])} AND {where}"
    cat.con.execute(f"CREATE TEMP VIEW run_rows AS SELECT * FROM predictions WHERE {where}")
    if not run_sql(cat.con, "SELECT count(*) AS n FROM run_rows").column("n")[0].as_py():
        raise UserError(f"run {manifest['run_id']} committed no rows: nothing to report")


def gather(
    output: str,
    run_id: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    sample: int = DEFAULT_SAMPLE,
    history_runs: int = DEFAULT_HISTORY_RUNS,
) -> ReportData:
    """Read one committed run (the latest when ``run_id`` is None) into what the page shows, with the history of
    the committed runs up to it (the last ``history_runs``; 0: no history section)."""
    cat = open_catalog(output, storage_options)
    try:
        manifest = cat.manifest(run_id)
        _run_rows(cat, manifest)
        tasks = _task_infos(cat, manifest)
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
            distributions={t.name: _distribution(cat, t) for t in tasks if not t.kind.numeric},
            histograms={t.name: _histogram(cat, t) for t in tasks if t.kind.numeric},
            errors=[(r["uri"], r["error"] or "") for r in errors],
            error_total=int(counts["err"]),
            error_kinds=[(r["kind"], int(r["n"])) for r in kinds],
            cards=_cards(cat, tasks, sample, storage_options),
            history=gather_history(cat, manifest["run_id"], tasks, limit=history_runs) if history_runs else None,
            near_duplicates=near_duplicates_summary(output, storage_options, str(manifest.get("model_version"))),
        )
    finally:
        cat.con.close()


def render_report(
    output: str,
    run_id: str | None = None,
    *,
    storage_options: dict[str, Any] | None = None,
    sample: int = DEFAULT_SAMPLE,
    history_runs: int = DEFAULT_HISTORY_RUNS,
) -> str:
    """The HTML page of one committed run (the latest when ``run_id`` is None): one file, no network needed."""
    return render_html(
        gather(output, run_id, storage_options=storage_options, sample=sample, history_runs=history_runs)
    )


def write_report(
    output: str,
    run_id: str | None = None,
    *,
    out: str | None = None,
    storage_options: dict[str, Any] | None = None,
    sample: int = DEFAULT_SAMPLE,
    history_runs: int = DEFAULT_HISTORY_RUNS,
) -> str:
    """Render and write the page atomically; default ``OUT/reports/<run_id>.html``. Returns where it went."""
    data = gather(output, run_id, storage_options=storage_options, sample=sample, history_runs=history_runs)
    target = out or join(output, "reports", f"{data.manifest['run_id']}.html")
    opts = storage_options if protocol_of(target) == protocol_of(output) else None
    write_bytes_atomic(target, render_html(data).encode("utf-8"), opts)
    log.info("report for run %s written to %s", data.manifest["run_id"], target)
    return target
