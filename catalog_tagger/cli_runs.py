"""The ``runs`` command (one line per committed run, from the run manifests) and the ``tag`` command's health
verdict (drift warnings, exit 3 over the error budget). Registered on the ``catalog-tagger`` app by ``cli.py``.

The terminal table shows human units (``figures``); ``--format csv`` and ``--json`` (JSON Lines) give the raw
manifest values, one object or line per run, oldest first.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any

import pyarrow as pa
import typer
from rich.console import Console
from rich.table import Table

from catalog_tagger import figures
from catalog_tagger.errors import UserError
from catalog_tagger.render import print_tsv
from catalog_tagger.tag.health import EXIT_OVER_BUDGET, STATUS_OK, over_budget

out_console = Console()

FORMATS = ("table", "csv", "json")
# (column, manifest path, Arrow type, terminal format)
RUN_COLUMNS: tuple[tuple[str, tuple[str, ...], pa.DataType, Any], ...] = (
    ("run_date", ("run_date",), pa.string(), figures.text),
    ("run_id", ("run_id",), pa.string(), figures.text),
    ("model_version", ("model_version",), pa.string(), figures.text),
    ("listed", ("counts", "listed"), pa.int64(), figures.count),
    ("ok", ("counts", "ok"), pa.int64(), figures.count),
    ("errors", ("counts", "error"), pa.int64(), figures.count),
    ("wall_s", ("timings", "wall_s"), pa.float64(), figures.duration),
    ("accel_hours_saved", ("savings", "accel_hours_saved"), pa.float64(), figures.hours),
    ("cost_saved", ("savings", "cost_saved"), pa.float64(), lambda v: "not priced" if v is None else figures.money(v)),
    ("status", ("health", "status"), pa.string(), figures.text),
)
_HEADERS = {
    "ok": "tagged",
    "wall_s": "wall time",
    "accel_hours_saved": "accel-hours saved",
    "cost_saved": "cost saved",
    "model_version": "model",
}


def _dig(manifest: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = manifest
    for key in path:
        cur = cur.get(key) if isinstance(cur, dict) else None
    return cur


def run_rows(manifests: list[dict[str, Any]]) -> pa.Table:
    """One row per run (``RUN_COLUMNS``), raw values; a manifest without health (before version 5) is ``ok``."""
    cols: dict[str, list[Any]] = {name: [] for name, *_ in RUN_COLUMNS}
    for m in manifests:
        for name, path, _, _ in RUN_COLUMNS:
            v = _dig(m, path)
            cols[name].append(STATUS_OK if name == "status" and v is None else v)
    return pa.table(cols, schema=pa.schema([(name, typ) for name, _, typ, _ in RUN_COLUMNS]))


def render_runs(table: pa.Table, console: Console) -> None:
    """The runs in human units, one line each; piped or redirected, tab-separated (a table would be cut)."""
    if table.num_rows == 0:
        console.print("no committed runs", markup=False)
        return
    headers = [_HEADERS.get(name, name.replace("_", " ")) for name, *_ in RUN_COLUMNS]
    shown = [[fmt(row[name]) for name, _, _, fmt in RUN_COLUMNS] for row in table.to_pylist()]
    if not console.is_terminal:
        print_tsv(console, headers, shown)
        return
    view = Table(show_edge=False, pad_edge=False)
    for (name, *_), header in zip(RUN_COLUMNS, headers, strict=True):
        view.add_column(header, justify="left" if name in _TEXT else "right", overflow="fold")
    for values in shown:
        view.add_row(*values)
    console.print(view)


_TEXT = {"run_date", "run_id", "model_version", "status"}


def runs(
    output: Annotated[str, typer.Option("--output", help="Output root (path or fsspec URL).")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines, raw values (same as --format json).")] = False,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | csv | json (JSON Lines)")] = "table",
) -> None:
    """List the committed runs, oldest first: date, id, model, listed / tagged / errors, wall time, accelerator-hours
    and cost saved, health status (ok | warning | failed)."""
    from catalog_tagger import query as q

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    fmt = "json" if as_json else fmt
    table = run_rows(q.run_manifests(output))
    if fmt == "table":
        render_runs(table, out_console)
        return
    sys.stdout.buffer.write(q.to_csv(table) if fmt == "csv" else q.to_json_lines(table))
    sys.stdout.flush()


def health_verdict(manifest: dict[str, Any] | None, console: Console) -> None:
    """After ``tag``'s summary: the run's health warnings, then exit 3 when it is over its error budget."""
    health = (manifest or {}).get("health") or {}
    over = over_budget(manifest)
    for line in health.get("warnings") or []:
        if line != over:
            console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)
    if over is not None:
        console.print(
            f"error budget: {over}; the rows are committed (exit {EXIT_OVER_BUDGET})",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_OVER_BUDGET)


def register(app: typer.Typer) -> None:
    """Add the commands to the ``catalog-tagger`` app."""
    app.command("runs")(runs)
