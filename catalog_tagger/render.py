"""Console rendering of a run's result and savings (rich tables); the library itself only logs."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from catalog_tagger.tag.job import RunResult


def savings_rows(savings: dict) -> list[tuple[str, str]]:
    return [
        ("images (ok)", f"{savings['images']:,}"),
        ("tasks", str(savings["tasks"])),
        ("device", savings["device"]),
        ("multi-head accelerator-hours (measured)", f"{savings['multi_head_accel_hours']:.6f}"),
        (
            f"single-task accelerator-hours ({savings['method']})",
            f"{savings['single_task_accel_hours']:.6f}",
        ),
        ("accelerator-hours saved", f"{savings['accel_hours_saved']:.6f} ({savings['fraction_saved']:.0%})"),
        (f"cost saved at ${savings['price_per_hour']:.2f}/h", f"${savings['cost_saved']:.4f}"),
        ("decode CPU-hours saved", f"{savings['decode_cpu_s_saved'] / 3600:.6f}"),
    ]


def render_run_summary(result: RunResult, console: Console) -> None:
    table = Table(title=f"run {result.run_id}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("images listed", f"{result.listed:,}")
    table.add_row("unchanged (skipped)", f"{result.unchanged:,}")
    table.add_row("tagged ok", f"{result.ok:,}")
    table.add_row("errors", f"{result.error:,}")
    if result.processed:
        table.add_row("throughput", f"{result.images_per_s:.1f} images/s (wall, incl. start-up)")
    m = result.manifest
    if m and "savings" in m:
        for k, v in savings_rows(m["savings"]):
            table.add_row(k, v)
    console.print(table)
    for note in result.notes:
        console.print(f"- {note}")
    if m:
        console.print(f"output: {result.output} (manifest runs/{result.run_id}.json)")
