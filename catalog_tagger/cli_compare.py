"""The ``compare`` command: what model B would change against model A on a sample of a catalog, before anyone pays
for a full re-tag. Registered on the ``catalog-tagger`` app by ``cli.py``.

Everything shown comes from one JSON document (``compare_run.comparison_json``): the terminal tables, ``--format
json|csv``, ``--json-out``, the page (``--html``) and ``--from-json`` (which renders a saved comparison again
without running any model).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from catalog_tagger.errors import UserError
from catalog_tagger.figures import count, num, percent
from catalog_tagger.render import print_tsv
from catalog_tagger.storage import redact

out_console = Console()
err_console = Console(stderr=True)

FORMATS = ("table", "json", "csv")
SUMMARY_COLUMNS = ("task", "kind", "n", "agreement", "changed", "mean_jaccard", "mae", "max_abs_diff", "rmse")
_HEADERS = ("task", "kind", "images", "agreement", "changed", "mean Jaccard", "MAE", "max abs diff", "RMSE")


# --------------------------------------------------------------------------------------------- rendering
def _show(console: Console, title: str, headers: Sequence[str], rows: list[list[Any]]) -> None:
    """A table on a terminal; piped or redirected, a ``# title`` line and tab-separated values (nothing cut)."""
    if not console.is_terminal:
        console.file.write(f"# {title}\n")
        print_tsv(console, headers, rows)
        return
    view = Table(*headers, title=title, title_justify="left", show_edge=False, pad_edge=False)
    for row in rows:
        view.add_row(*("" if v is None else str(v) for v in row))
    console.print(view)


def summary_rows(doc: dict[str, Any]) -> list[list[Any]]:
    """One row per compared task, raw values in ``SUMMARY_COLUMNS`` order."""
    return [[t.get(c) for c in SUMMARY_COLUMNS] for t in doc["tasks"]]


def confusion_rows(conf: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """(headers, rows) of a confusion matrix with only the labels either model gave (A's down, B's across)."""
    counts = conf["counts"]
    rows = [i for i, r in enumerate(counts) if any(r)]
    cols = [j for j in range(len(conf["labels_b"])) if any(r[j] for r in counts)]
    headers = ["A / B", *(conf["labels_b"][j] for j in cols)]
    return headers, [[conf["labels_a"][i], *(counts[i][j] for j in cols)] for i in rows]


def _shown_summary(doc: dict[str, Any]) -> list[list[Any]]:
    def n3(v: float | None) -> str:
        return "" if v is None else num(v, 3)

    return [
        [t["task"], t["kind"], count(t["n"]), "" if t.get("agreement") is None else percent(t["agreement"]),
         count(t.get("changed")), n3(t.get("mean_jaccard")), n3(t.get("mae")), n3(t.get("max_abs_diff")),
         n3(t.get("rmse"))]
        for t in doc["tasks"]
    ]  # fmt: skip


def render_comparison(doc: dict[str, Any], console: Console) -> None:
    """The whole comparison for people: the task summary, each multiclass confusion, each multilabel task's labels,
    then the sentences."""
    _show(console, "agreement per task (A vs B)", _HEADERS, _shown_summary(doc))
    for t in doc["tasks"]:
        if t.get("confusion"):
            headers, rows = confusion_rows(t["confusion"])
            _show(console, f"{t['task']}: images by A's label (rows) and B's label (columns)", headers, rows)
        if t.get("per_label"):
            rows = [[p["label"], percent(p["agreement"]), count(p["images_a"]), count(p["images_b"])]
                    for p in t["per_label"]]  # fmt: skip
            _show(console, f"{t['task']}: agreement per label", ["label", "agreement", "images A", "images B"], rows)
    from catalog_tagger.report_compare import text_lines

    for line in text_lines(doc):
        console.print(line, markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------- writing
def write_rows(rows: str, doc: dict[str, Any], changes: Any, confusion: Any) -> list[str]:
    """``--out ROWS``: a ``.parquet`` name gets the changed rows; any other name is a folder that gets
    ``changes.parquet``, ``confusion.parquet`` and ``comparison.json``. Returns what was written."""
    from catalog_tagger.query import to_parquet  # deltalake before pyarrow.parquet (see DESIGN: import order)
    from catalog_tagger.storage import join, write_bytes_atomic

    if rows.lower().endswith(".parquet"):
        write_bytes_atomic(rows, to_parquet(changes))
        return [rows]
    files = {"changes.parquet": to_parquet(changes), "confusion.parquet": to_parquet(confusion),
             "comparison.json": dump_json(doc)}  # fmt: skip
    written = []
    for name, data in files.items():
        write_bytes_atomic(join(rows, name), data)
        written.append(join(rows, name))
    return written


def dump_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False).encode() + b"\n"


def load_json(uri: str) -> dict[str, Any]:
    """A saved comparison (``--from-json``); anything else is a one-line user error."""
    from catalog_tagger.compare_run import COMPARISON_VERSION
    from catalog_tagger.storage import read_bytes

    try:
        doc = json.loads(read_bytes(uri))
    except FileNotFoundError:
        raise UserError(f"{uri}: no such comparison file") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{uri}: not a comparison JSON ({err})") from None
    if not isinstance(doc, dict) or doc.get("comparison_version") != COMPARISON_VERSION:
        raise UserError(f"{uri}: not a comparison JSON of version {COMPARISON_VERSION} (written by compare)")
    return doc


def _emit(doc: dict[str, Any], fmt: str) -> None:
    if fmt == "table":
        render_comparison(doc, out_console)
    elif fmt == "json":
        sys.stdout.buffer.write(dump_json(doc))
    else:
        import pyarrow as pa

        from catalog_tagger.query import to_csv

        rows = summary_rows(doc)
        table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(SUMMARY_COLUMNS)})
        sys.stdout.buffer.write(to_csv(table))
    sys.stdout.flush()


def _wrote(where: str) -> None:
    err_console.print(f"wrote {where}", markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------- the command
def compare(
    model: Annotated[
        list[str] | None, typer.Option("--model", help="Model artifact: give it twice, A (current) then B (new).")
    ] = None,
    source: Annotated[
        str | None, typer.Option("--source", help="Image prefix or .csv/.parquet manifest (as tag --source).")
    ] = None,
    sample: Annotated[int, typer.Option("--sample", min=1, help="Images compared at most (a seeded sample).")] = 2000,
    seed: Annotated[int, typer.Option("--seed", min=0, help="Names the sample: the same seed, the same images.")] = 0,
    out: Annotated[
        str | None, typer.Option("--out", help="ROWS: folder (or .parquet file) for the changed rows, queryable.")
    ] = None,
    output: Annotated[
        str | None, typer.Option("--output", help="A tagged output: estimate a full re-tag of it with B.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | json | csv (the per-task summary)")] = "table",
    json_out: Annotated[str | None, typer.Option("--json-out", help="Write the comparison JSON to FILE.")] = None,
    html: Annotated[str | None, typer.Option("--html", help="Write the comparison as one HTML page to FILE.")] = None,
    from_json: Annotated[
        str | None, typer.Option("--from-json", help="Render a saved comparison JSON (no model is run).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass and timing.")] = 32,
    price_per_hour: Annotated[
        float | None, typer.Option("--price-per-hour", min=0, help="USD per device-hour (default: the recorded).")
    ] = None,
) -> None:
    """What model B changes against model A on a sample of a catalog: agreement per task, the confusion between
    their labels (the error between regression outputs), the images whose labels change, and the cost of a full
    re-tag with B. Each image is read and decoded once for both models."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if from_json is not None:
        if model or source or out or output:
            raise UserError("--from-json renders a saved comparison: leave out --model, --source, --out and --output")
        doc = load_json(from_json)
    else:
        doc = _run(model or [], source, sample=sample, seed=seed, out=out, output=output, device=device,
                   batch_size=batch_size, price_per_hour=price_per_hour)  # fmt: skip
    if json_out is not None:
        from catalog_tagger.storage import write_bytes_atomic

        write_bytes_atomic(json_out, dump_json(doc))
        _wrote(json_out)
    if html is not None:
        from catalog_tagger.report_compare import write_compare_html

        _wrote(write_compare_html(doc, html))
    _emit(doc, fmt)


def _run(models: list[str], source: str | None, **kw: Any) -> dict[str, Any]:
    """Measure, estimate, write the rows; the comparison JSON."""
    from catalog_tagger.compare_cost import estimate, read_recorded
    from catalog_tagger.compare_run import CompareConfig, comparison_json, measure

    if len(models) != 2:
        raise UserError(f"compare needs --model twice (A, then B), got {len(models)}")
    if source is None:
        raise UserError("compare needs --source (an image prefix or a .csv/.parquet manifest)")
    cfg = CompareConfig(model_a=models[0], model_b=models[1], source=source, sample=kw["sample"], seed=kw["seed"],
                        batch_size=kw["batch_size"], device=kw["device"])  # fmt: skip
    recorded = read_recorded(kw["output"]) if kw["output"] is not None else None  # a bad output fails before work
    m = measure(cfg)
    if m.sample["compared"] == 0:
        s = m.sample
        raise UserError(
            f"nothing to compare: {s['listed_rows']:,} image(s) listed under {redact(source)}, {s['sampled']:,} "
            f"sampled, {s['errors']:,} unreadable or undecodable, {s['non_finite']:,} with a non-finite output"
        )
    cost = estimate(recorded, m.timing, version_a=m.a["version"], version_b=m.b["version"],
                    price_per_hour=kw["price_per_hour"])  # fmt: skip
    doc = comparison_json(m, source, cost)
    if kw["out"] is not None:
        for where in write_rows(kw["out"], doc, m.compared.changes, m.compared.confusion):
            _wrote(where)
    return doc


def register(app: typer.Typer) -> None:
    """Add the command to the ``catalog-tagger`` app."""
    app.command("compare")(compare)
