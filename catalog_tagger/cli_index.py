"""The ``index`` command: build or refresh the ANN index of one model version's embeddings beside the output
(``ann.refresh``: incremental when an index of that version exists; ``--rebuild``: ``ann.build``).
Registered on the ``catalog-tagger`` app by ``cli.py`` (``register``); errors are ``UserError`` (one line, exit 2)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

out_console = Console()


def index(
    output: Annotated[str, typer.Option("--output", help="Output root (path or fsspec URL).")],
    model_version: Annotated[
        str | None, typer.Option("--model-version", help="Model version to index (default: the latest run's).")
    ] = None,
    batch_rows: Annotated[int, typer.Option("--batch-rows", min=1, help="Rows read per batch.")] = 20_000,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Build anew even when an index of this version exists.")
    ] = False,
) -> None:
    """Build the nearest-neighbour index of one model version's embeddings (used by `similar` and
    `near-duplicates`), or bring an existing one up to the committed runs (adds their rows)."""
    from catalog_tagger.ann import build, index_root, refresh
    from catalog_tagger.storage import redact

    if rebuild:
        record = build(output, model_version=model_version, batch_rows=batch_rows)
    else:
        found = refresh(output, model_version=model_version, batch_rows=batch_rows, create=True)
        assert found is not None  # create=True: built when missing
        record = found
    where = redact(index_root(output, record["model_version"]))
    out_console.print(
        f"indexed {record['count']:,} vector(s) of model {record['model_version']}: {record['kind']}, "
        f"{record['seconds']:.1f} s, stored under {where}",
        markup=False,
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    """Add the command to the ``catalog-tagger`` app."""
    app.command("index")(index)
