"""The ``near-duplicates`` command: pairs of near-identical images (by the shared embedding) with their labels.
Registered on the ``catalog-tagger`` app by ``cli.py``."""

from __future__ import annotations

import sys
from typing import Annotated

import pyarrow as pa
import typer
from rich.console import Console
from rich.table import Table

from catalog_tagger.errors import UserError
from catalog_tagger.render import print_tsv

out_console = Console()

FORMATS = ("table", "csv", "json")


def render_pairs(table: pa.Table, console: Console) -> None:
    """The pairs, one line each; piped or redirected, tab-separated (a table would be cut)."""
    if table.num_rows == 0:
        console.print("no near-duplicates", markup=False)
        return
    rows = [
        [f"{v:.4f}" if name == "similarity" else ("yes" if v else "no") if isinstance(v, bool) else v for name, v in r]
        for r in (row.items() for row in table.to_pylist())
    ]
    if not console.is_terminal:
        print_tsv(console, table.column_names, rows)
        return
    view = Table(show_edge=False, pad_edge=False)
    for name in table.column_names:
        view.add_column(name.replace("_", " "), justify="right" if name == "similarity" else "left", overflow="fold")
    for values in rows:
        view.add_row(*(", ".join(map(str, v)) if isinstance(v, list) else str(v) for v in values))
    console.print(view)


def near_duplicates(
    output: Annotated[str, typer.Option("--output", help="Output root (path or fsspec URL).")],
    threshold: Annotated[
        float, typer.Option("--threshold", help="Least cosine similarity of a pair, in (0, 1].")
    ] = 0.98,
    model_version: Annotated[
        str | None, typer.Option("--model-version", help="Model version searched (default: the latest run's).")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Neighbours per image looked at when the ANN index is used.")] = 10,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | csv | json (JSON Lines)")] = "table",
) -> None:
    """Pairs of near-identical images (cosine of the embeddings >= --threshold) among the latest rows of one model
    version, most similar first, with a group number (images connected by pairs), each side's labels and whether
    they disagree. Exact up to 100,000 rows; above, the rows stream through the index of `catalog-tagger index`."""
    from catalog_tagger import query as q
    from catalog_tagger.near_duplicates import near_duplicates as find

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    table = find(output, threshold=threshold, model_version=model_version, k=k)
    if fmt == "table":
        render_pairs(table, out_console)
        return
    sys.stdout.buffer.write(q.to_csv(table) if fmt == "csv" else q.to_json_lines(table))
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Add the command to the ``catalog-tagger`` app."""
    app.command("near-duplicates")(near_duplicates)
