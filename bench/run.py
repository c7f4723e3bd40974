"""`python -m bench.run`: run the benchmarks, print every ratio against its target, write JSON results."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, replace
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from bench import decode, gpu, incremental, memory, multihead_vs_single, startup, throughput
from bench.common import (
    MAIN,
    QUICK,
    RESULTS,
    BenchResult,
    Context,
    Sizes,
    ensure_artifact,
    ensure_catalog,
    machine_info,
    quiet_logs,
    run_job,
    scratch,
    start_ray,
    write_manifest,
)

# Decode first (no Ray), memory last (its fresh processes each start their own Ray).
BENCHMARKS = {
    "decode": decode.run,
    "startup": startup.run,  # fresh processes with their own Ray: bench/run.py's warm Ray would hide the start-up
    "throughput": throughput.run,
    "multihead_vs_single": multihead_vs_single.run,
    "incremental": incremental.run,
    "memory": memory.run,
    "gpu": gpu.run,  # the accelerator section: skipped with its reason without CUDA (starts Ray itself otherwise)
}
NEEDS_RAY = {"throughput", "multihead_vs_single", "incremental"}
# Share of the time budget each benchmark may use before it stops adding rounds (round 1 always runs).
BUDGET_SHARE = {
    "decode": 0.05,
    "startup": 0.1,
    "throughput": 0.3,
    "multihead_vs_single": 0.25,
    "incremental": 0.15,
    "memory": 0.15,
    "gpu": 0.45,  # on a GPU machine only: its torch.compile comparison starts only within this share
}
DEFAULT_BUDGET_S = 780  # `make bench` must end within 15 minutes, start-up and catalog generation included
WARMUP_IMAGES = 16


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the harness (~2-3 min)")
    p.add_argument("--images", type=int, help="images for every benchmark (memory runs N and 10 N)")
    p.add_argument("--rounds", type=int, help="interleaved repeats of each comparison (default 2, quick 1)")
    p.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only this benchmark (repeatable)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time budget; extra rounds are dropped")
    return p.parse_args(argv)


def _fmt(value: Any, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "images":
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.3g} {unit}".strip() if abs(value) < 100 else f"{value:,.0f} {unit}".strip()
    return f"{value} {unit}".strip()


def render(console: Console, results: list[BenchResult], machine: dict[str, Any], sizes: Sizes, wall: float) -> None:
    table = Table(title="catalog-tagger bench", show_lines=False)
    for col in ("benchmark", "metric", "value", "target", "result", "note"):
        table.add_column(col, overflow="fold")
    for res in results:
        if res.error:
            table.add_row(res.name, "[red]crashed[/]", "", "", "[red]ERROR[/]", res.error.splitlines()[-1][:80])
            continue
        for i, c in enumerate(res.checks):
            verdict = "" if c.passed is None else ("[green]PASS[/]" if c.passed else "[red]FAIL[/]")
            table.add_row(res.name if i == 0 else "", c.metric, _fmt(c.value, c.unit), c.target or "", verdict, c.note)
        table.add_section()
    console.print(table)
    console.print(
        f"machine: {machine['cpu_model']}, {machine['cpu_logical']} logical CPUs, {machine['memory_gib']} GiB, "
        f"device {machine['device']}; torch {machine['torch']}, ray {machine['ray']}; load average "
        f"{machine['loadavg_start']} at start, {machine.get('loadavg_end')} at end"
    )
    for res in results:
        console.print(f"[bold]{res.name}[/] ({res.seconds:.0f}s) sizes {res.sizes}")
        for note in res.notes:
            console.print(f"  - {note}")
    console.print(f"total {wall:.0f}s; sizes {sizes}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_logs()
    # Piped output (make bench | tee) gets a wide table instead of rich's 80-column default.
    console = Console(width=None if sys.stdout.isatty() else 170)
    sizes = QUICK if args.quick else Sizes()
    if args.images:
        sizes = sizes.with_images(args.images)
    if args.rounds:
        sizes = replace(sizes, rounds=args.rounds)
    names = args.only or list(BENCHMARKS)
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        console.log(msg)

    machine = machine_info()
    ctx = Context(sizes=sizes, say=say)
    if NEEDS_RAY & set(names):
        say("starting local Ray and warming up one job (not timed)")
        machine["ray_init_s"] = start_ray()
        # One small job first: worker processes, imports and Ray Data's first plan are paid here, not in a timing.
        with scratch("warmup") as tmp:
            images = ensure_catalog(MAIN, WARMUP_IMAGES)
            src = write_manifest(tmp / "m.parquet", images)
            jr = run_job(ensure_artifact("multi4"), src, str(tmp / "out"), batch_size=sizes.batch_size, calibrate=False)
        plan = (jr.manifest or {}).get("resources", {})
        machine["job_plan"] = plan
        ctx.threads = int(plan.get("threads") or 1)
    else:
        import torch

        ctx.threads = torch.get_num_threads()
    results: list[BenchResult] = []
    for name in names:
        say(f"[bold]{name}[/]")
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        ctx.started, ctx.budget_s = time.perf_counter(), args.budget_s * BUDGET_SHARE[name]
        try:
            res = BENCHMARKS[name](ctx)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others' numbers
            res = BenchResult(name, {}, error=traceback.format_exc())
            console.print_exception()
        res.seconds = time.perf_counter() - t0
        res.data["loadavg_before_after"] = [round(load0[0], 2), round(os.getloadavg()[0], 2)]
        results.append(res)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    wall = time.perf_counter() - t_start
    render(console, results, machine, sizes, wall)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    doc = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "quick": args.quick,
        "sizes": asdict(sizes),
        "machine": machine,
        "wall_s": wall,
        "results": [r.to_dict() for r in results],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2, default=str)
    (RESULTS / f"{stamp}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)
    console.print(f"results: {RESULTS / f'{stamp}.json'} (and latest.json)")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
