"""Peak RSS of the whole process tree (driver + Ray) for a job on N and on 10 N images, each in a fresh process."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.common import (
    SMALL,
    BenchResult,
    Context,
    at_most,
    ensure_artifact,
    ensure_catalog,
    info,
    ratio,
    run_job,
    scratch,
    start_ray,
    write_manifest,
)

NAME = "memory"
GROWTH_TARGET = 1.2
SAMPLE_S = 0.2
MIB = 2**20


class TreeSampler(threading.Thread):
    """Every ~0.2 s: the summed RSS of a process and all its descendants (Ray's GCS, raylet, workers)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.root = psutil.Process(pid)
        self.stop = threading.Event()
        self.peak_total = 0
        self.peak_driver = 0
        self.peak_procs = 0
        self.samples: list[tuple[float, int]] = []
        self.at_peak: dict[str, float] = {}  # MiB per process kind at the peak sample: where the memory sits

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        seen: list[tuple[psutil.Process, int]] = []
        for p in procs:
            try:
                rss = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            total += rss
            seen.append((p, rss))
            if p.pid == self.root.pid:
                self.peak_driver = max(self.peak_driver, rss)
        if total > self.peak_total:
            self.peak_total = total
            self.at_peak = {}
            for p, rss in seen:
                kind = "driver" if p.pid == self.root.pid else _kind(p)
                self.at_peak[kind] = self.at_peak.get(kind, 0.0) + rss / MIB
        self.peak_procs = max(self.peak_procs, len(procs))
        self.samples.append((time.monotonic(), total))

    def run(self) -> None:
        while not self.stop.wait(SAMPLE_S):
            self.sample()


def _kind(p) -> str:
    try:
        name = p.name()
        cmd = p.cmdline()
    except Exception:  # noqa: BLE001 - the process may be gone already
        return "gone"
    if name.startswith("ray::"):
        return name  # ray::MapWorker(, ray::IDLE, ray::_StatsActor...
    return os.path.basename(cmd[1] if len(cmd) > 1 and "python" in name else (cmd[0] if cmd else name))[:40]


def measure(model: str, source: str, out: Path, batch_size: int) -> dict:
    """Run one job in a fresh interpreter (its own Ray) and sample its process tree from here."""
    result = out / "result.json"
    cmd = [sys.executable, "-m", "bench.memory", "--child", model, source, str(out / "output"), str(batch_size)]
    proc = subprocess.Popen([*cmd, str(result)], cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    rc = proc.wait()
    sampler.stop.set()
    sampler.join()
    if rc != 0:
        raise RuntimeError(f"memory child exited with {rc}")
    data = json.loads(result.read_text())
    data.update(
        peak_tree_mib=sampler.peak_total / MIB,
        peak_driver_mib=sampler.peak_driver / MIB,
        peak_processes=sampler.peak_procs,
        samples=len(sampler.samples),
        at_peak_mib={k: round(v, 1) for k, v in sorted(sampler.at_peak.items(), key=lambda kv: -kv[1])},
    )
    return data


def _child(model: str, source: str, out: str, batch_size: int, result: str) -> None:
    import ray

    start_ray()
    # Always the Ray pipeline: both sizes must run the same code (small runs would take the no-Ray path).
    jr = run_job(model, source, out, batch_size=batch_size, executor="ray")
    Path(result).write_text(json.dumps(jr.to_dict()))
    ray.shutdown()


def run(ctx: Context) -> BenchResult:
    s = ctx.sizes
    n, big = s.memory_images, s.memory_images * s.memory_factor
    res = BenchResult(NAME, {"images": [n, big], "batch_size": s.batch_size, "catalog": SMALL.key})
    images = ensure_catalog(SMALL, big)
    model = ensure_artifact("multi4")
    peaks = {}
    with scratch(NAME) as tmp:
        for count in (n, big):
            out = tmp / f"n{count}"
            out.mkdir()
            source = write_manifest(out / "manifest.parquet", images[:count])
            ctx.say(f"{NAME}: job on {count} images in a fresh process")
            peaks[count] = measure(model, source, out, s.batch_size)
            ctx.say(f"{NAME}: {count} images: peak tree RSS {peaks[count]['peak_tree_mib']:.0f} MiB")
    res.data = {str(k): v for k, v in peaks.items()}
    res.checks += [
        info(f"peak tree RSS, {n} images", peaks[n]["peak_tree_mib"], "MiB"),
        info(f"peak tree RSS, {big} images", peaks[big]["peak_tree_mib"], "MiB"),
        at_most(
            f"peak tree RSS growth ({s.memory_factor}x images)",
            ratio(peaks[big]["peak_tree_mib"], peaks[n]["peak_tree_mib"]),
            GROWTH_TARGET,
        ),
        info(
            f"peak driver RSS growth ({s.memory_factor}x images)",
            ratio(peaks[big]["peak_driver_mib"], peaks[n]["peak_driver_mib"]),
            "x",
        ),
    ]
    small, large = peaks[n]["at_peak_mib"], peaks[big]["at_peak_mib"]
    growth = {k: round(large.get(k, 0.0) - small.get(k, 0.0), 1) for k in set(small) | set(large)}
    res.data["growth_at_peak_mib"] = dict(sorted(growth.items(), key=lambda kv: -abs(kv[1])))
    top = ", ".join(f"{k} {v:+.0f} MiB" for k, v in list(res.data["growth_at_peak_mib"].items())[:4])
    res.notes.append(f"growth at the peak sample by process: {top}")
    res.notes.append(
        "RSS summed over the driver and all its descendants (GCS, raylet, Ray workers) every 0.2 s; shared "
        "pages (object store, libraries) count once per process that maps them, so the totals overstate "
        "unique memory but compare like with like"
    )
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--child", nargs=5, metavar=("MODEL", "SOURCE", "OUT", "BATCH", "RESULT"))
    args = p.parse_args()
    if args.child:
        model, source, out, batch, result = args.child
        _child(model, source, out, int(batch), result)


if __name__ == "__main__":
    main()
