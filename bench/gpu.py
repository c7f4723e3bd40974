"""The accelerator section: end-to-end img/s per GPU vs the bare model loop on the same GPU, busy fraction, CPU cores.

Skipped with its reason without CUDA. ``python -m bench.gpu`` runs it alone (what ``bench/gpu.sh`` calls on a GPU
machine) and rewrites its JSON after every step, so a timeout keeps what was measured; ``--dry-run-cpu`` runs the
same code on CPU with tiny sizes, which tests the harness on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import numpy as np

from bench.common import (
    GPU_CATALOG,
    RESULTS,
    BenchResult,
    CatalogImage,
    Check,
    Context,
    Sizes,
    at_least,
    at_most,
    ensure_artifact,
    ensure_catalog,
    info,
    machine_info,
    quiet_logs,
    ratio,
    run_job,
    scratch,
    start_ray,
    write_manifest,
)
from bench.gpu_probes import (
    CHILD_SLACK_S,
    COMPILE_LIMIT_S,
    WARMUP_BATCHES,
    Sampler,
    compile_compare,
    load_model,
    timed_loop,
)

NAME = "gpu"
MODELS = ("mobilenet_v3_large", "resnet50")
DECODE_ON = ("accelerator", "cpu")  # TagJobConfig.decode_on values compared side by side, where the field exists
BARE_TARGET, BUSY_TARGET, CORES_TARGET = 0.8, 0.9, 8.0  # issue 15's targets, per GPU
DISTINCT = 512  # decoded images the bare loop cycles through (77 MB of uint8 on the device)
SKIP_REASON = "skipped: no CUDA device"


@dataclass(frozen=True)
class Settings:
    """What the section does; the dry run swaps in tiny sizes on CPU."""

    images: int = 2000  # per model: the bare loop's forward passes and each end-to-end run
    batch_size: int = 128
    models: tuple[str, ...] = MODELS
    device: str = "cuda"
    compile: bool = True  # eager vs torch.compile of the bare loop, in a child process (bounded)
    budget_s: float = 330.0  # a compile comparison starts only if it still ends within this
    dry_run: bool = False


DRY_RUN = Settings(images=16, batch_size=8, device="cpu", dry_run=True)


# ------------------------------------------------------------------------------------------------ measurements
def jpegs(n: int, *, jobs: int) -> list[CatalogImage]:
    """The first ``n`` JPEGs of the 800-1600 px synthetic catalog (it is 80% JPEG; PNG and WebP are left out)."""
    total = int(n / 0.8 * 1.1) + 16
    while True:
        found = [i for i in ensure_catalog(GPU_CATALOG, total, jobs=jobs) if i.format == "jpeg"]
        if len(found) >= n:
            return found[:n]
        total = int(total * 1.5)


def device_batches(images: list[CatalogImage], size: int, s: Settings) -> list[Any]:
    """Full uint8 (B, H, W, 3) batches on the device, decoded once by the job's CPU decoder (threads)."""
    import torch

    from catalog_tagger.decode import decode_image

    def decode(uri: str) -> np.ndarray:
        return decode_image(Path(uri).read_bytes(), size).array

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        arrays = list(pool.map(decode, [i.uri for i in images[:DISTINCT]]))
    count = max(1, len(arrays) // s.batch_size) * s.batch_size
    stacked = torch.from_numpy(np.stack([arrays[i % len(arrays)] for i in range(count)])).to(s.device)
    return list(stacked.split(s.batch_size))  # type: ignore[no-untyped-call]


def bare(uri: str, images: list[CatalogImage], s: Settings) -> dict[str, Any]:
    """The bare model loop: pre-decoded uint8 batches already on the device, the job's forward (``run_batch``:
    autocast, channels_last, outputs back to the host), no reading, decoding or writing."""
    import torch

    model, card = load_model(uri, s.device)
    batches = device_batches(images, card.image_size, s)
    n = max(1, s.images // s.batch_size)
    wall, forward = timed_loop(model, batches, n)
    del model, batches
    if s.device == "cuda":
        torch.cuda.empty_cache()
    done = n * s.batch_size
    return {"images": done, "seconds": wall, "images_per_s": done / wall, "busy_fraction": forward / wall}


def decode_variants() -> list[str | None]:
    """The ``decode_on`` values to compare; [None] (the job's default) if the config has no such field."""
    from catalog_tagger.tag.config import TagJobConfig

    field = TagJobConfig.model_fields.get("decode_on")
    if field is None:
        return [None]
    choices = get_args(field.annotation)
    return [v for v in DECODE_ON if not choices or v in choices] or [None]


def end_to_end(uri: str, source: str, out: Path, s: Settings, decode_on: str | None) -> dict[str, Any]:
    """``job.run`` with the Ray executor on the device: img/s, busy fraction, CPU cores per GPU, NVML."""
    kw: dict[str, Any] = {"executor": "ray", "device": s.device, "calibrate": False}
    if decode_on is not None:
        kw["decode_on"] = decode_on
    with Sampler(gpu=s.device == "cuda") as smp:
        jr = run_job(uri, source, str(out), batch_size=s.batch_size, **kw)
    m = jr.manifest or {}
    timings, resources, savings = m.get("timings") or {}, m.get("resources") or {}, m.get("savings") or {}
    devices = int(resources.get("actors") or 1)
    busy_s = float(savings.get("multi_head_accel_s", jr.accel_s))
    # After the first batch (actors up, model loaded): the steady state, approximately (busy_s shared out evenly
    # over the images). At a few thousand images the start-up is most of pipeline_s on a fast GPU.
    steady_s = jr.pipeline_s - float(timings.get("first_batch_s") or 0.0)
    return {
        "images_per_s": timings.get("images_per_s") or jr.images_per_s,
        "wall_images_per_s": ratio(jr.ok, jr.wall_s),
        "after_first_batch_images_per_s": ratio(max(0, jr.ok - s.batch_size), steady_s),
        "busy_fraction": ratio(busy_s, jr.pipeline_s * devices),
        "busy_after_first_batch": ratio(busy_s * max(0, jr.ok - s.batch_size) / max(1, jr.ok), steady_s * devices),
        "cpu_cores_per_gpu": ratio(smp.cpu_s, jr.pipeline_s * devices),  # all the run's CPU s in its pipeline time
        "cpu_cores_per_gpu_over_wall": ratio(smp.cpu_s, smp.wall_s * devices),
        "machine_cores_busy": smp.machine_cores,
        "nvml_util_mean": smp.util_mean,
        "nvml_samples": len(smp.util),
        "nvml_note": smp.note,
        "devices": devices,
        "ok": jr.ok,
        "processed": jr.processed,
        "job": jr.to_dict(),
        "timings": timings,
    }


# ------------------------------------------------------------------------------------------------ the section
def skipped() -> BenchResult:
    res = BenchResult(NAME, {})
    res.notes.append(
        "no CUDA device (torch.cuda.is_available() is False): the accelerator section did not run; "
        "bench/gpu.sh runs it on a GPU machine"
    )
    res.checks.append(info(SKIP_REASON, None))
    return res


def run(ctx: Context) -> BenchResult:
    """bench.run's entry: the section at ``sizes.gpu_images`` per model, or a visible skip without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return skipped()
    return measure(ctx, Settings(images=ctx.sizes.gpu_images, budget_s=ctx.budget_s))


def variant_checks(p: str, e: dict[str, Any], bare_ips: float) -> list[Check]:
    """One end-to-end run's figures: with and without the start-up (actors, model load, first batch)."""
    if "error" in e:
        return [info(f"{p}: crashed", None, note=e["error"].strip().splitlines()[-1][:100])]
    return [
        info(f"{p}: end to end", e["images_per_s"], "img/s", "ok rows / manifest pipeline_s"),
        at_least(f"{p}: end to end / bare loop", ratio(e["images_per_s"], bare_ips), BARE_TARGET, note="with start-up"),
        at_least(f"{p}: GPU busy fraction", e["busy_fraction"], BUSY_TARGET, unit="", note="with start-up"),
        # Start-up left out: shown, not judged (pipelined batches make it an overestimate, by about one batch)
        info(f"{p}: end to end after the first batch", e["after_first_batch_images_per_s"], "img/s", "approx."),
        info(f"{p}: after the first batch / bare loop", ratio(e["after_first_batch_images_per_s"], bare_ips), "x"),
        info(f"{p}: busy after the first batch", e["busy_after_first_batch"], "", "approx."),
        at_most(f"{p}: CPU cores per GPU", e["cpu_cores_per_gpu"], CORES_TARGET, unit="cores", note="upper bound"),
        info(f"{p}: NVML utilisation (mean)", e["nvml_util_mean"], "%", e["nvml_note"]),
    ]


def checks(models: dict[str, Any], s: Settings) -> list[Check]:
    """Every figure next to its target; in a dry run the targets are shown but not judged (CPU, tiny sizes)."""
    out: list[Check] = []
    for name, fig in models.items():
        bare_ips = (fig.get("bare") or {}).get("images_per_s") or 0.0
        out.append(info(f"{name}: bare model loop", bare_ips, "img/s", f"batch {s.batch_size}, uint8 on the device"))
        for v, e in fig.get("e2e", {}).items():
            out += variant_checks(f"{name} [decode {v}]", e, bare_ips)
        comp = fig.get("compile")
        if comp and "compiled_vs_eager" in comp:
            note = comp.get("error", f"compiled in {comp['compile_s']:.0f}s")
            out.append(info(f"{name}: torch.compile / eager (bare loop)", comp["compiled_vs_eager"], "x", note))
        elif comp:
            out.append(info(f"{name}: torch.compile", None, note=comp["error"]))
    if s.dry_run:
        out = [
            replace(c, passed=None, note=f"dry run, not judged; {c.note}".rstrip("; ")) if c.target else c for c in out
        ]
    return out


def _variant_run(uri: str, source: str, out: Path, s: Settings, v: str | None) -> dict[str, Any]:
    try:
        return end_to_end(uri, source, out, s, v)
    except Exception:  # noqa: BLE001 - one crashed variant must not hide the other's figures
        return {"error": traceback.format_exc(limit=3)}


def measure(ctx: Context, s: Settings, checkpoint: Callable[[BenchResult], None] | None = None) -> BenchResult:
    """The section: per model, the bare loop then ``job.run`` per decode variant; compile comparisons last."""
    res = BenchResult(NAME, {**asdict(s), "catalog": GPU_CATALOG.key})
    models: dict[str, Any] = {}
    res.data["models"] = models

    def step() -> None:
        res.checks = checks(models, s)
        if checkpoint is not None:
            checkpoint(res)

    ctx.say(f"{NAME}: {s.images} catalog JPEGs ({GPU_CATALOG.key}), models {', '.join(s.models)}")
    images = jpegs(s.images, jobs=max(1, (os.cpu_count() or 1) // 2))
    res.data["ray_init_s"] = start_ray()
    variants = decode_variants()
    with scratch(NAME) as tmp:
        source = write_manifest(tmp / "manifest.parquet", images)
        warm = write_manifest(tmp / "warm.parquet", images[: 2 * s.batch_size])
        uris = {m: ensure_artifact("multi4", backbone=m) for m in s.models}
        # Not timed: Ray's worker processes, their imports and CUDA's first context are paid here.
        kw: dict[str, Any] = {"executor": "ray", "device": s.device, "calibrate": False}
        res.data["warmup"] = run_job(
            uris[s.models[0]], warm, str(tmp / "warm"), batch_size=s.batch_size, **kw
        ).to_dict()
        for m in s.models:
            models[m] = {"bare": bare(uris[m], images, s), "e2e": {}}
            ctx.say(f"{NAME}: {m} bare loop {models[m]['bare']['images_per_s']:.0f} img/s")
            step()
            for v in variants:
                models[m]["e2e"][v or "default"] = e2e = _variant_run(uris[m], source, tmp / f"{m}-{v}", s, v)
                ctx.say(f"{NAME}: {m} decode {v or 'default'}: {e2e.get('images_per_s') or e2e.get('error')}")
                step()
        for m in s.models if s.compile else ():
            if time.perf_counter() - ctx.started + COMPILE_LIMIT_S + CHILD_SLACK_S > s.budget_s:
                res.notes.append(f"torch.compile of {m} not tried: it would not end within {s.budget_s:.0f}s")
                continue
            args = {"model": uris[m], "device": s.device, "batch_size": s.batch_size, "images": s.images}
            models[m]["compile"] = compile_compare(args, tmp)
            step()
    res.notes += _notes(s, variants)
    step()
    return res


def _notes(s: Settings, variants: list[str | None]) -> list[str]:
    notes = [
        f"bare loop: {min(DISTINCT, s.images)} pre-decoded JPEGs cycled on the device, "
        f"{s.images // s.batch_size} batches of {s.batch_size} through run_batch after {WARMUP_BATCHES} warm-up "
        "batches; end to end: job.run (executor ray, calibrate off), img/s = ok rows / manifest pipeline_s "
        "(start-up included)",
        "busy fraction = manifest savings.multi_head_accel_s / (pipeline_s x GPUs); CPU cores per GPU = CPU seconds "
        "of the driver's process tree (Ray's processes included) over the whole job.run / pipeline_s (an upper "
        "bound: planning and commit CPU counted too; the same over the job's wall is in the JSON); 'after the first "
        "batch' leaves out the start-up (actors, model load, first batch: manifest first_batch_s): shown, not judged",
    ]
    if variants == [None]:
        notes.append("TagJobConfig has no decode_on field yet: the job's default decode only")
    if s.dry_run:
        notes.append("dry run on CPU with tiny sizes: tests the harness; targets are not judged")
    return notes


# ------------------------------------------------------------------------------------------------ command line
def _fmt(value: float | None, unit: str) -> str:
    if value is None or value != value:
        return "n/a"
    return (f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}") + (f" {unit}" if unit else "")


def summary(res: BenchResult, machine: dict[str, Any]) -> str:
    """The short text a GPU run leaves next to its JSON."""
    lines = [f"accelerator section on {machine['device']}, {machine['cpu_logical']} CPUs, {res.seconds:.0f}s"]
    for c in res.checks:
        verdict = "" if c.passed is None else ("PASS" if c.passed else "FAIL")
        lines.append(f"{c.metric}: {_fmt(c.value, c.unit)}  {c.target or ''} {verdict}  {c.note}".rstrip())
    if res.error:
        lines.append(f"ERROR: {res.error.strip().splitlines()[-1]}")
    return "\n".join(lines + [f"- {n}" for n in res.notes]) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    p.add_argument("--dry-run-cpu", action="store_true", help="the same code on CPU with tiny sizes (no GPU needed)")
    p.add_argument("--images", type=int, help="images per model (default 2000; dry run 16)")
    p.add_argument("--batch-size", type=int, help="default 128; dry run 8")
    p.add_argument("--models", help=f"comma-separated backbones (default {','.join(MODELS)})")
    p.add_argument("--no-compile", action="store_true", help="skip eager vs torch.compile")
    p.add_argument("--budget-s", type=float, help="the section's own deadline for starting a compile comparison")
    p.add_argument("--out", help="JSON path (default bench/results/gpu-<stamp>.json); the summary goes next to it")
    return p.parse_args(argv)


def _settings(args: argparse.Namespace) -> Settings:
    s = DRY_RUN if args.dry_run_cpu else Settings()
    given = {
        "images": args.images,
        "batch_size": args.batch_size,
        "models": tuple(args.models.split(",")) if args.models else None,
        "budget_s": args.budget_s,
    }
    s = replace(s, **{k: v for k, v in given.items() if v is not None})
    return replace(s, compile=False) if args.no_compile else s


def _terminated(signum: int, _frame: object) -> None:
    """SIGTERM (gpu.sh's time limit) ends the section like an error: figures so far and a summary are written, then
    Ray is shut down at exit."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run the section alone; exit 2 (one line) without CUDA unless it is a dry run, 1 if it crashed."""
    args = _parse(argv)
    import torch
    from rich.console import Console

    if not args.dry_run_cpu and not torch.cuda.is_available():
        sys.stderr.write("bench.gpu: no CUDA device (torch.cuda.is_available() is False); --dry-run-cpu tests it\n")
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_logs()
    console = Console(width=None if sys.stdout.isatty() else 160)
    s = _settings(args)
    out = Path(args.out or RESULTS / f"gpu-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    doc: dict[str, Any] = {"created_at": datetime.now(UTC).isoformat(timespec="seconds"), "argv": argv or sys.argv[1:]}
    doc.update(dry_run=s.dry_run, settings=asdict(s), machine=machine, complete=False)

    def checkpoint(res: BenchResult) -> None:
        doc["result"] = res.to_dict()
        out.write_text(json.dumps(doc, indent=2, default=str))

    ctx = Context(sizes=Sizes(gpu_images=s.images), say=console.log)
    signal.signal(signal.SIGTERM, _terminated)
    try:
        res = measure(ctx, s, checkpoint)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - the JSON still records what was measured, and why not more
        # SystemExit: SIGTERM, by our handler before ray.init and by Ray's own after it
        why = "stopped by SIGTERM (gpu.sh's time limit)\n" if isinstance(err, SystemExit) else ""
        res = BenchResult(
            NAME, asdict(s), data=(doc.get("result") or {}).get("data", {}), error=traceback.format_exc() + why
        )
        res.checks = checks(res.data.get("models", {}), s)
        if not why:
            console.print_exception()
    res.seconds = time.perf_counter() - ctx.started
    doc["complete"] = res.error is None
    checkpoint(res)
    text = summary(res, machine)
    out.with_suffix(".txt").write_text(text)
    console.print(text, markup=False, highlight=False)
    console.print(f"figures: {out} (summary {out.with_suffix('.txt')})")
    return 1 if res.error else 0


if __name__ == "__main__":
    sys.exit(main())
