"""How results are shown on the console: tables, progress, a run's summary (its figures come from ``figures.py``,
the one place that formats them for the console, the HTML report and the Prefect artifacts alike). The library
itself only logs; the CLI and the demo print through the functions here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from catalog_tagger.figures import savings_notes, savings_rows, timing_rows
from catalog_tagger.kinds import KINDS

if TYPE_CHECKING:
    import pyarrow as pa

    from catalog_tagger.tag.job import RunResult
    from catalog_tagger.tag.plan import PlanPreview
    from catalog_tagger.train.pipeline import TrainResult

TABLE_MAX_ROWS = 200  # rows a terminal table of query results shows; csv/json/parquet write them all
# The test metrics shown after training: the headline metrics of every kind, in order.
TRAIN_METRICS = tuple(dict.fromkeys(key for kind in KINDS.values() for key in kind.headline))


# --------------------------------------------------------------------------------------------- console tables
def cell(value: object, width: int = 60) -> Text:
    """A rich Text cell (never markup: uris may contain '['); long values (embeddings) are cut."""
    if value is None:
        return Text("NULL", style="dim")
    if isinstance(value, float):
        shown = f"{value:.6g}"
    elif isinstance(value, list | dict):
        shown = json.dumps(value, default=str, ensure_ascii=False)
    else:
        shown = str(value)
    return Text(shown if len(shown) <= width else shown[: width - 1] + "\u2026")


# counts.skipped_by_reason (schema.SKIP_REASONS) as the run summary names them
SKIP_LABELS = {
    "unreadable_folder": "sub-folders not readable (skipped)",
    "fifo": "FIFOs (skipped)",
    "socket": "sockets (skipped)",
    "device": "device files (skipped)",
    "broken_symlink": "broken symlinks (skipped)",
    "symlink_inside": "symlinks inside (target tagged)",
    "symlink_outside": "symlinks leading out (not followed)",
    "other": "other entries that are not files (skipped)",
}


def _skip_rows(counts: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, count) for each kind of entry a listing left out, the ones that happened only."""
    rows = [("non-image files (skipped)", counts.get("skipped_non_image") or 0)]
    rows += [(SKIP_LABELS.get(r, r), n) for r, n in (counts.get("skipped_by_reason") or {}).items()]
    return [(label, f"{n:,}") for label, n in rows if n]


def render_plan(plan: PlanPreview, console: Console) -> None:
    """``tag --plan-only``: what a run would do, one count per line, then its notes."""
    for name in ("listed", "new", "changed", "unchanged", "resumed"):
        console.print(f"{name:<10} {getattr(plan, name):>12,}")
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False)


def render_run_summary(result: RunResult, console: Console) -> None:
    """A tagging run's counts, throughput and savings, then its notes and where the output went."""
    table = Table(title=f"run {result.run_id}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("images listed", f"{result.listed:,}")
    table.add_row("unchanged (skipped)", f"{result.unchanged:,}")
    table.add_row("tagged ok", f"{result.ok:,}")
    table.add_row("errors", f"{result.error:,}")
    m = result.manifest
    for label, shown in _skip_rows(m.get("counts", {}) if m else {}):
        table.add_row(label, shown)
    if m:
        for _, label, shown, _ in timing_rows(m.get("timings") or {}):
            table.add_row(label, shown)
    if m and "savings" in m:
        for _, label, shown, _ in savings_rows(m["savings"]):
            table.add_row(label, shown)
    console.print(table)
    for note in [*result.notes, *savings_notes(m)]:
        console.print(f"- {note}")
    if m:
        console.print(f"output: {result.output} (manifest runs/{result.run_id}.json)")


@contextmanager
def tag_progress(console: Console) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar for a tagging run; yields the ``progress(done, total)`` callback to give it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("tagging"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    # Not a terminal (a log file, CI): no bar, and none of the blank line a stopped live display leaves behind.
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task_id = bar.add_task("tag", total=None)
        yield lambda done, total: bar.update(task_id, completed=done, total=total)


def render_backbones(console: Console) -> None:
    """The backbone registry: embedding size, default input size and parameter count of each."""
    from catalog_tagger.model.backbones import backbone_names, get_backbone
    from catalog_tagger.model.multihead import count_parameters

    table = Table("backbone", "embedding dim", "default px", "parameters")
    for name in backbone_names():
        spec = get_backbone(name)
        table.add_row(
            name, str(spec.embedding_dim), str(spec.default_image_size), f"{count_parameters(spec.build()):,}"
        )
    console.print(table)


def render_predictions(results: Iterable[dict[str, Any]], console: Console) -> None:
    """One table per image: each task's label(s) and score(s) (a multilabel task's named, label by label), or the
    image's error."""
    for r in results:
        table = Table(title=Text(r["uri"]), show_header=True)
        table.add_column("task")
        table.add_column("prediction")
        table.add_column("score")
        if r["status"] != "ok":
            table.add_row("-", Text.assemble(("error", "red"), f": {r['error']}"), "")
        for task, pred in r.get("predictions", {}).items():
            if "value" in pred:  # a regression task: a number, no score
                table.add_row(task, f"{pred['value']:.4g}", "")
            elif isinstance(pred["label"], list):
                scores = "  ".join(f"{name} {s:.2f}" for name, s in zip(pred["labels"], pred["scores"], strict=True))
                table.add_row(task, Text(", ".join(pred["label"]) or "(none)"), Text(scores))
            else:
                table.add_row(task, Text(pred["label"]), f"{pred['score']:.3f}")
        console.print(table)


def render_training(res: TrainResult, comparison_rows: Iterable[tuple[str, ...]], console: Console) -> None:
    """Test metrics of a trained model and, with ``--single-task``, the multi-head vs single-task comparison."""
    n_test = res.card.training["split"]["counts"]["test"]
    table = Table("task", "metric", "test", title=f"test metrics ({n_test} images)")
    for name, m in res.metrics.items():
        for key in TRAIN_METRICS:
            if m.get(key) is not None:
                table.add_row(name, key, f"{m[key]:.3f}")
    console.print(table)
    c = res.comparison
    if c is None:
        return
    cmp = Table(
        "task",
        "metric",
        "multi-head",
        "single-task",
        "single params",
        "single ms/img",
        title="multi-head vs single-task",
    )
    for row in comparison_rows:
        cmp.add_row(*row)
    cmp.add_row(
        "[bold]total[/]", "", f"{c['multi_head']['ms_per_image']:.3f} ms/img",
        f"{c['single_task_total']['ms_per_image']:.3f} ms/img", f"{c['single_task_total']['parameters']:,}", "",
    )  # fmt: skip
    console.print(cmp)
    console.print(
        f"multi-head parameters {c['multi_head']['parameters']:,} vs {c['single_task_total']['parameters']:,} "
        f"for {c['n_tasks']} single-task models; measured cost ratio [bold]{c['cost_ratio']:.2f}x[/] "
        f"(n = {c['n_tasks']}) on {c['device']}"
    )


def _tsv_field(value: object) -> str:
    """One value of a tab-separated line: nothing for NULL, JSON for lists, tabs and newlines escaped."""
    if value is None:
        return ""
    shown = json.dumps(value, default=str, ensure_ascii=False) if isinstance(value, list | dict) else str(value)
    return shown.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def print_tsv(console: Console, header: Iterable[str], rows: Iterable[Iterable[object]]) -> None:
    """Tab-separated values, header first, nothing cut: what a table becomes when stdout is not a terminal (a
    pipe or a file), where a table would be cut to 80 columns."""
    for values in (header, *rows):
        console.file.write("\t".join(_tsv_field(v) for v in values) + "\n")
    console.file.flush()


def render_query_result(table: pa.Table, console: Console, notes: Console) -> None:
    """A query result as a terminal table, at most ``TABLE_MAX_ROWS`` rows (``notes`` says when cut); piped or
    redirected, every row as tab-separated values."""
    if not console.is_terminal:
        print_tsv(console, table.column_names, (row.values() for row in table.to_pylist()))
        return
    view = Table(title=f"{table.num_rows:,} row(s)")
    for name in table.column_names:
        view.add_column(name, overflow="fold")
    for row in table.slice(0, TABLE_MAX_ROWS).to_pylist():
        view.add_row(*(cell(v) for v in row.values()))
    console.print(view)
    if table.num_rows > TABLE_MAX_ROWS:
        notes.print(f"showing {TABLE_MAX_ROWS} of {table.num_rows:,} rows; --format csv/json/parquet has all")


def render_similar(results: list[dict[str, Any]], console: Console) -> None:
    """Nearest images, most similar first: rank, similarity, uri and each task's label(s); tab-separated values
    when stdout is not a terminal."""
    tasks = [c for c in (results[0] if results else {}) if c not in ("uri", "similarity")]
    if not console.is_terminal:
        rows = ([i, f"{r['similarity']:.4f}", r["uri"], *(r[t] for t in tasks)] for i, r in enumerate(results, 1))
        print_tsv(console, ["#", "similarity", "uri", *tasks], rows)
        return
    view = Table("#", "similarity", Column("uri", overflow="fold"), *tasks)  # a long uri wraps, never cut
    for i, r in enumerate(results, 1):
        labels = [", ".join(r[t]) if isinstance(r[t], list) else r[t] for t in tasks]
        view.add_row(str(i), f"{r['similarity']:.4f}", Text(r["uri"]), *(cell(v) for v in labels))
    console.print(view)
