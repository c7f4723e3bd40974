"""The ``catalog-tagger`` command line: argument parsing, progress and tables; all work is in the library."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from catalog_tagger import cli_compare, cli_index, cli_model, cli_neardup, cli_output, cli_runs, cli_train
from catalog_tagger.errors import UserError
from catalog_tagger.interrupts import EXIT_INTERRUPTED, EXIT_TRANSIENT, resumable_on_interrupt

app = typer.Typer(
    name="catalog-tagger",
    help="Tag large image catalogs with one multi-head model: train it, run it on Ray, query the Parquet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: flags without typer's "<bool>" type column
    context_settings={"max_content_width": 120},  # as wide as the terminal, up to 120 columns
)
console = Console(stderr=True)
out_console = Console()
M = TypeVar("M")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            shown = version("catalog-tagger")
        except PackageNotFoundError:  # run from a source tree that was never installed
            shown = "unknown (not installed)"
        sys.stdout.write(f"catalog-tagger {shown}\n")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    _version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print the version and exit.")
    ] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )
    for noisy in ("botocore", "s3fs", "aiobotocore", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------- tag
@app.command()
def tag(
    model: Annotated[str, typer.Option("--model", help="Model artifact directory (path or fsspec URL).")],
    source: Annotated[
        str, typer.Option("--source", help="Image prefix (dir, s3://, any fsspec URL) or a .csv/.parquet manifest.")
    ],
    output: Annotated[str, typer.Option("--output", help="Output root (path or fsspec URL).")],
    run_id: Annotated[str | None, typer.Option("--run-id", help="Run id; reuse one to resume a crashed run.")] = None,
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="local (default) | auto | ray://host:10001")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 64,
    actors: Annotated[
        int | None, typer.Option("--actors", min=1, help="Predictor actors (default: 1 per GPU, else 1).")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    full: Annotated[bool, typer.Option("--full", help="Re-tag everything, not only new or changed images.")] = False,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Tag at most N images.")] = None,
    price_per_hour: Annotated[
        float | None, typer.Option("--price-per-hour", help="USD per GPU-hour for the savings report (2.50).")
    ] = None,
    price_per_cpu_hour: Annotated[
        float | None,
        typer.Option("--price-per-cpu-hour", help="USD per CPU core-hour: prices CPU runs (default: not priced)."),
    ] = None,
    decode_on: Annotated[
        str,
        typer.Option(
            "--decode-on", help="Where JPEGs are decoded: auto (the GPU when there is one) | cpu | accelerator."
        ),
    ] = "auto",
    recalibrate: Annotated[
        bool, typer.Option("--recalibrate", help="Measure the single-task calibration again, even if one is stored.")
    ] = False,
    allowed_root: Annotated[
        str | None, typer.Option("--allowed-root", help="Refuse the run if any image uri resolves outside this folder.")
    ] = None,
    rows_per_shard: Annotated[
        int | None, typer.Option("--rows-per-shard", min=1, help="Rows per part file at most (a unit of resume).")
    ] = None,
    shard_seconds: Annotated[
        float | None,
        typer.Option(
            "--shard-seconds",
            help="Also stage a part file at least every N seconds (default 60): the most an interrupt loses.",
        ),
    ] = None,
    max_image_bytes: Annotated[
        int | None, typer.Option("--max-image-bytes", min=1, help="Larger images are error rows (default 64 MiB).")
    ] = None,
    read_timeout_s: Annotated[
        float | None, typer.Option("--read-timeout-s", min=0.001, help="HTTP(S) connect/read timeout (default 30).")
    ] = None,
    read_deadline_s: Annotated[
        float | None,
        typer.Option("--read-deadline-s", min=0.001, help="Seconds one image's read may take, retries too (120)."),
    ] = None,
    max_image_pixels: Annotated[
        int | None, typer.Option("--max-image-pixels", min=1, help="Larger images are error rows (default 89.5 M).")
    ] = None,
    executor: Annotated[
        str, typer.Option("--executor", help="auto (default: in-process for small local runs) | ray | local")
    ] = "auto",
    baseline: Annotated[
        list[str] | None,
        typer.Option("--baseline", help="Your own single-task model artifact to compare against (repeat per task)."),
    ] = None,
    plan_only: Annotated[
        bool, typer.Option("--plan-only", help="Print listed / new / changed / unchanged and write nothing.")
    ] = False,
    allow_task_change: Annotated[
        bool, typer.Option("--allow-task-change", help="Tag an output whose tables hold other tasks (adds columns).")
    ] = False,
    write_tasks: Annotated[
        int | None, typer.Option("--write-tasks", min=1, help="Ray: data files written at once.")
    ] = None,
    max_error_fraction: Annotated[
        float | None,
        typer.Option(
            "--max-error-fraction", min=0, max=1, help="Error budget (0.05): over it, exit 3 after the commit."
        ),
    ] = None,
) -> None:
    """Tag a catalog with the multi-head model on Ray Data and commit predictions + embeddings to Parquet.

    Exit codes: 0 done; 2 refused (bad input, nothing written); 3 committed, but more images failed than
    --max-error-fraction allows; 75 a transient store or network failure (rerun); 130 interrupted (resumable).
    """
    from catalog_tagger.render import render_run_summary, tag_progress
    from catalog_tagger.tag.job import TagJobConfig, new_run_id, run

    given: dict[str, Any] = dict(
        model=model, source=source, output=output, run_id=run_id, ray_address=ray_address, batch_size=batch_size,
        actors=actors, device=device, full=full, limit=limit, executor=executor, price_per_hour=price_per_hour,
        allowed_root=allowed_root, rows_per_shard=rows_per_shard, shard_seconds=shard_seconds,
        max_image_bytes=max_image_bytes, read_timeout_s=read_timeout_s, read_deadline_s=read_deadline_s,
        max_image_pixels=max_image_pixels, allow_task_change=allow_task_change or None, write_tasks=write_tasks,
        baseline=list(baseline) if baseline else None, price_per_cpu_hour=price_per_cpu_hour,
        recalibrate=recalibrate or None, decode_on=decode_on, max_error_fraction=max_error_fraction,
    )  # fmt: skip
    params = {k: v for k, v in given.items() if v is not None}  # an option not given keeps the config's default
    params.setdefault("run_id", new_run_id())  # chosen here, so that an interrupted run can say how to resume
    cfg = _validated(TagJobConfig, params)
    if plan_only:
        from catalog_tagger.render import render_plan
        from catalog_tagger.tag.plan import preview

        render_plan(preview(cfg), out_console)
        return
    with resumable_on_interrupt(cfg.run_id or "", console), tag_progress(console) as progress:
        result = run(cfg, progress=progress)
    render_run_summary(result, out_console)
    cli_runs.health_verdict(result.manifest, console)


def _validated(model_cls: Callable[..., M], params: dict[str, Any]) -> M:
    """Build a pydantic parameter model; a validation error is a user error (exit 2) with the field named."""
    from pydantic import ValidationError

    try:
        return model_cls(**params)
    except ValidationError as err:
        msgs = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
        raise UserError(f"invalid parameters: {msgs}") from None


# --------------------------------------------------------------------------------------------- query / similar / report
_QUERY_FORMATS = ("table", "csv", "json", "parquet")


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL (DuckDB) over the views predictions, latest and runs.")],
    output: Annotated[str, typer.Option("--output", help="Output root (path or fsspec URL).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="table | csv | json (JSON Lines) | parquet")] = "table",
    out: Annotated[str | None, typer.Option("--out", help="Write the result to FILE (path or URL).")] = None,
    unsafe_sql: Annotated[
        bool,
        typer.Option(
            "--unsafe-sql", help="Unrestricted DuckDB: SQL may read any file and write files (only SQL you wrote)."
        ),
    ] = False,
) -> None:
    """Query the committed predictions with SQL (see docs/queries.md for ready-made queries).

    The SQL reads the views and nothing else: no other file is read or written unless --unsafe-sql.
    """
    from catalog_tagger import query as q
    from catalog_tagger.render import render_query_result
    from catalog_tagger.storage import write_bytes_atomic

    if fmt not in _QUERY_FORMATS:
        raise UserError(f"--format must be one of {', '.join(_QUERY_FORMATS)}, not {fmt!r}")
    if fmt == "parquet" and out is None:
        raise UserError("--format parquet needs --out FILE")
    if fmt == "table" and out is not None:
        raise UserError("--format table prints to the terminal; use --format csv, json or parquet with --out")
    table = q.query(output, sql, unsafe_sql=unsafe_sql)
    if fmt == "table":
        render_query_result(table, out_console, console)
        return
    data = {"csv": q.to_csv, "json": q.to_json_lines, "parquet": q.to_parquet}[fmt](table)
    if out is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        write_bytes_atomic(out, data)
        console.print(f"wrote {table.num_rows:,} row(s) to {out}", markup=False, highlight=False)


@app.command()
def similar(
    output: Annotated[str, typer.Option("--output", help="Output root (path or fsspec URL).")],
    uri: Annotated[str | None, typer.Option("--uri", help="An image of the catalog (as tagged).")] = None,
    image: Annotated[str | None, typer.Option("--image", help="Any image file (embedded by the run's model).")] = None,
    k: Annotated[int, typer.Option("-k", min=1, help="How many images to return.")] = 10,
    model: Annotated[str | None, typer.Option("--model", help="Artifact to embed --image with.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines on stdout.")] = False,
) -> None:
    """The k images nearest by cosine similarity of their embeddings (latest ok rows, one model version)."""
    from catalog_tagger.query import to_json_lines
    from catalog_tagger.render import render_similar
    from catalog_tagger.similar import similar as find_similar

    results = find_similar(output, uri=uri, image=image, k=k, model=model)
    if as_json:
        import pyarrow as pa

        sys.stdout.buffer.write(to_json_lines(pa.Table.from_pylist(results)) if results else b"")
        sys.stdout.flush()
        return
    render_similar(results, out_console)


@app.command()
def report(
    output: Annotated[str, typer.Option("--output", help="Output root (path or fsspec URL).")],
    run_id: Annotated[str | None, typer.Option("--run-id", help="Committed run (default: the latest).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="HTML file (default OUT/reports/RUN_ID.html).")] = None,
    sample: Annotated[int, typer.Option("--sample", min=0, help="Gallery images.")] = 48,
) -> None:
    """Write one self-contained HTML page for a run: savings, throughput, labels, errors, a filterable gallery."""
    from catalog_tagger.report import write_report

    where = write_report(output, run_id, out=out, sample=sample)  # logs where it went; stdout gets the bare path
    sys.stdout.write(where + "\n")


# --------------------------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Working directory for the demo.")] = Path("demo-out"),
    images: Annotated[int, typer.Option(help="Synthetic images to make.")] = 600,
) -> None:
    """Run the whole product on a synthetic catalog, locally."""
    from flows.demo import run_demo

    run_demo(out, images=images, console=console)


cli_train.register(app)  # train
cli_model.register(app)  # synth, init-model, backbones, predict
cli_output.register(app)  # maintain, migrate
cli_runs.register(app)  # runs
cli_index.register(app)  # index
cli_neardup.register(app)  # near-duplicates
cli_compare.register(app)  # compare


# typer 0.29 (pinned in pyproject) vendors click: its usage errors are typer.TyperException subclasses with show()
# and exit_code 2, never click's own classes (so click's are not caught: a main() that did missed them all).


def main() -> None:
    """Console-script entry point: user errors exit 2 with a one-line message, no traceback."""
    try:
        rv = app(standalone_mode=False)
    except UserError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True, markup=True, highlight=False)
        sys.exit(2)
    except typer.TyperException as err:  # usage errors (bad, missing or unknown option or command): usage, exit 2
        show = getattr(err, "show", None)
        show() if show is not None else console.print(f"error: {err.format_message()}", markup=False)
        sys.exit(err.exit_code)
    except typer.Abort:
        console.print("aborted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as err:  # a store, network or cluster failure worth a later retry: one line, exit 75
        from catalog_tagger.storage import is_transient

        if not is_transient(err):
            raise  # a bug: the traceback is the useful output
        logging.getLogger(__name__).debug("transient failure", exc_info=err)  # the traceback, with -v
        message = escape(" ".join(f"{type(err).__name__}: {err}".split()))
        hint = "a transient failure: check the endpoint or the network, then rerun"
        console.print(f"[bold red]error:[/] {message} ({hint})", soft_wrap=True, highlight=False)
        sys.exit(EXIT_TRANSIENT)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
