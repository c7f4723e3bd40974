"""Shared bench plumbing: sizes, machine info, cached catalogs and artifacts, job configs, ratio checks."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("CATALOG_TAGGER_BENCH_CACHE") or BENCH_DIR / ".cache")  # tests point it at tmp_path
RESULTS = BENCH_DIR / "results"
MODEL_ENV = "CATALOG_TAGGER_BENCH_MODEL"  # a trained artifact for the decode label check
BACKBONE = "mobilenet_v3_small"
IMAGE_SIZE = 224


# ------------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class CatalogSpec:
    """One cached synthetic catalog: image i is a pure function of (seed, i), so it can grow in place."""

    seed: int
    min_size: int
    max_size: int

    @property
    def key(self) -> str:
        return f"seed{self.seed}_{self.min_size}-{self.max_size}"


MAIN = CatalogSpec(seed=0, min_size=300, max_size=800)  # product photos of web size
SMALL = CatalogSpec(seed=2, min_size=128, max_size=256)  # the memory benchmark: many cheap images
LARGE = CatalogSpec(seed=1, min_size=1000, max_size=1600)  # the decode benchmark: >= 1000 px
GPU_CATALOG = CatalogSpec(seed=3, min_size=800, max_size=1600)  # the accelerator section: catalog-like photos


@dataclass(frozen=True)
class Sizes:
    """How much work each benchmark does; ``--quick`` and ``--images`` swap these."""

    batch_size: int = 64  # the job's default batch size, used by every loop
    rounds: int = 2  # interleaved repeats of each comparison (medians are reported)
    throughput_images: int = 1000
    startup_images: int = 64  # cold vs warm run in a fresh process
    multihead_images: int = 300
    decode_images: int = 150  # JPEGs >= 1000 px
    memory_images: int = 300  # and memory_factor x this
    memory_factor: int = 10
    incremental_images: int = 1000
    incremental_new_fraction: float = 0.01
    gpu_images: int = 2000  # per model, the accelerator section (skipped without CUDA)

    def with_images(self, n: int) -> Sizes:
        return replace(
            self,
            throughput_images=n,
            multihead_images=n,
            decode_images=n,
            memory_images=n,
            incremental_images=n,
            gpu_images=n,
            startup_images=min(self.startup_images, n),
        )


QUICK = Sizes(
    rounds=1,
    throughput_images=64,
    startup_images=16,
    multihead_images=32,
    decode_images=12,
    memory_images=32,
    incremental_images=100,
    gpu_images=256,
)


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Check:
    """One reported figure; ``target`` set means it is a PASS/FAIL ratio."""

    metric: str
    value: float | None
    unit: str = "x"
    target: str | None = None  # e.g. ">= 0.9"
    passed: bool | None = None
    note: str = ""


def at_least(metric: str, value: float | None, threshold: float, *, unit: str = "x", note: str = "") -> Check:
    ok = None if value is None else value >= threshold
    return Check(metric, value, unit, f">= {threshold:g}", ok, note)


def at_most(metric: str, value: float | None, threshold: float, *, unit: str = "x", note: str = "") -> Check:
    ok = None if value is None else value <= threshold
    return Check(metric, value, unit, f"<= {threshold:g}", ok, note)


def info(metric: str, value: float | None, unit: str = "", note: str = "") -> Check:
    return Check(metric, value, unit, None, None, note)


@dataclass
class BenchResult:
    name: str
    sizes: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # raw measurements, for the JSON
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def rotated(items: list[Any], k: int) -> list[Any]:
    """Round k runs the items in a rotated order, so a slow drift of the machine hits each of them alike."""
    k %= len(items)
    return items[k:] + items[:k]


# ------------------------------------------------------------------------------------------------ machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import PIL
    import psutil
    import ray
    import torch
    import torchvision

    cuda = torch.cuda.is_available()
    return {
        "cpu_model": _cpu_model(),
        "cpu_logical": psutil.cpu_count(logical=True),
        "cpu_physical": psutil.cpu_count(logical=False),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "ray": ray.__version__,
        "pillow": PIL.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------------ catalogs
@dataclass(frozen=True)
class CatalogImage:
    index: int
    uri: str
    width: int
    height: int
    format: str


def ensure_catalog(spec: CatalogSpec, images: int, *, jobs: int = 1) -> list[CatalogImage]:
    """The first ``images`` images of a cached catalog, generating only what the cache lacks (in ``jobs``
    processes, each writing its own ``truth_<start>.parquet``: a 16-core GPU machine renders 8x faster)."""
    from concurrent.futures import ProcessPoolExecutor

    from catalog_tagger.synthetic.catalog import SynthConfig, generate

    root = CACHE / "catalogs" / spec.key
    meta_path = root / "bench_catalog.json"
    have = json.loads(meta_path.read_text())["images"] if meta_path.exists() else 0
    if have < images:
        t0 = time.perf_counter()
        step = math.ceil((images - have) / max(1, jobs))
        configs = [
            SynthConfig(
                out=str(root),
                images=min(step, images - start),
                start=start,
                seed=spec.seed,
                min_size=spec.min_size,
                max_size=spec.max_size,
            )
            for start in range(have, images, step)
        ]
        if len(configs) == 1:
            generate(configs[0])
        else:
            with ProcessPoolExecutor(max_workers=len(configs)) as pool:
                list(pool.map(generate, configs))
        meta_path.write_text(json.dumps({"images": images, **asdict(spec)}))
        log.info("catalog %s: generated images %d..%d in %.1fs", spec.key, have, images - 1, time.perf_counter() - t0)
    tables = [
        pq.read_table(p, columns=["uri", "index", "width", "height", "format"]) for p in root.glob("truth*.parquet")
    ]
    rows = pa.concat_tables(tables).to_pylist()
    by_index = {r["index"]: r for r in rows if r["index"] < images}
    missing = [i for i in range(images) if i not in by_index]
    if missing:
        raise RuntimeError(f"catalog cache {root} lacks images {missing[:5]}...: delete {root} and rerun")
    return [
        CatalogImage(i, by_index[i]["uri"], by_index[i]["width"], by_index[i]["height"], by_index[i]["format"])
        for i in range(images)
    ]


def write_manifest(path: Path, images: list[CatalogImage]) -> str:
    """A Parquet manifest with size + mtime, so the incremental diff uses listing identity (no re-reads)."""
    from datetime import UTC, datetime

    sizes, mtimes = [], []
    for img in images:
        st = os.stat(img.uri)
        sizes.append(st.st_size)
        mtimes.append(datetime.fromtimestamp(st.st_mtime, tz=UTC))
    table = pa.table(
        {"uri": [i.uri for i in images], "size": sizes, "mtime": mtimes},
        schema=pa.schema([("uri", pa.string()), ("size", pa.int64()), ("mtime", pa.timestamp("us", tz="UTC"))]),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


# ------------------------------------------------------------------------------------------------ artifacts
def ensure_artifact(name: str, task_names: list[str] | None = None, *, backbone: str = BACKBONE) -> str:
    """A random-init artifact (mobilenet_v3_small by default) over some of the synthetic tasks (cached, seeded)."""
    import torch

    from catalog_tagger.config import TaskConfig
    from catalog_tagger.model.artifact import card_for, save_artifact
    from catalog_tagger.model.multihead import MultiHeadModel
    from catalog_tagger.synthetic.plan import SYNTH_TASKS

    tasks = SYNTH_TASKS.tasks if task_names is None else tuple(SYNTH_TASKS.task(t) for t in task_names)
    path = CACHE / "models" / f"{name}_{backbone}_{IMAGE_SIZE}"
    if (path / "model.json").exists():
        return str(path)
    torch.manual_seed(0)
    # MultiHeadModel directly (not build_model): random init on purpose, whatever sits in the hub cache.
    model = MultiHeadModel(backbone=backbone, tasks=TaskConfig(tasks=tasks)).eval()
    tmp = path.with_name(path.name + f".tmp-{uuid.uuid4().hex[:6]}")
    save_artifact(model, card_for(model, image_size=IMAGE_SIZE), tmp)
    tmp.rename(path)  # complete artifacts only: a crash mid-save leaves a .tmp folder, never a half model
    return str(path)


def trained_artifact() -> str | None:
    """A trained artifact for the decode label check: $CATALOG_TAGGER_BENCH_MODEL, else bench/.cache/model."""
    env = os.environ.get(MODEL_ENV)
    if env:
        return env
    default = CACHE / "model"
    return str(default) if (default / "model.json").exists() else None


# ------------------------------------------------------------------------------------------------ jobs
def start_ray() -> float:
    """Start the embedded local Ray like ``ray_runtime.init_ray``, but never attach to a stray ``ray start`` cluster."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    t0 = time.perf_counter()
    if not ray.is_initialized():
        # address="local": ray_runtime.init_ray(None) would join any cluster found in /tmp/ray/ray_current_cluster,
        # and on a shared machine that may be someone else's.
        ray.init(address="local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    return time.perf_counter() - t0


def quiet_logs() -> None:
    """Library and Ray INFO lines off the console; Ray Data keeps writing its own log file in the session dir."""
    import ray.data  # noqa: F401 - importing it installs Ray Data's handlers, which we then turn down

    for name in ("ray", "catalog_tagger"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ != "SessionFileHandler":
            handler.setLevel(logging.WARNING)


@dataclass
class JobRun:
    """What the benchmarks read back from one ``job.run``."""

    wall_s: float  # around job.run, as the caller sees it
    pipeline_s: float  # the Ray pipeline only (manifest timings)
    accel_s: float  # summed busy seconds of the forward passes
    decode_cpu_s: float  # summed CPU seconds of read + decode
    processed: int
    ok: int
    manifest: dict[str, Any] | None

    @property
    def images_per_s(self) -> float:
        return ratio(self.processed, self.pipeline_s)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("manifest")
        d["resources"] = (self.manifest or {}).get("resources")
        return d


def run_job(model: str, source: str, output: str, *, batch_size: int, full: bool = True, **kw: Any) -> JobRun:
    from catalog_tagger.tag.job import TagJobConfig, run

    cfg = TagJobConfig(model=model, source=source, output=output, batch_size=batch_size, full=full, **kw)
    t0 = time.perf_counter()
    res = run(cfg)
    wall = time.perf_counter() - t0
    timings = (res.manifest or {}).get("timings", {})
    return JobRun(
        wall_s=wall,
        pipeline_s=float(timings.get("pipeline_s", math.nan)),
        accel_s=float(timings.get("accel_s", 0.0)),
        decode_cpu_s=float(timings.get("decode_cpu_s", 0.0)),
        processed=res.processed,
        ok=res.ok,
        manifest=res.manifest,
    )


@contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A folder under bench/.cache/tmp for one benchmark's outputs, removed afterwards."""
    base = CACHE / "tmp"
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix + "-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Context:
    """What run.py hands every benchmark."""

    sizes: Sizes
    say: Callable[[str], None]  # one progress line on the console
    threads: int = 1  # torch threads the pipeline's predictor uses (from the warm-up run's plan)
    budget_s: float = math.inf  # this benchmark's share of the run's time budget
    started: float = field(default_factory=time.perf_counter)  # when this benchmark started

    def another_round(self, done: int, notes: list[str]) -> bool:
        """Round 1 always runs; a further one only if, at the pace so far, it ends within the budget."""
        if done == 0:
            return True
        spent = time.perf_counter() - self.started
        if spent + spent / done <= self.budget_s:
            return True
        notes.append(f"stopped after {done} of {self.sizes.rounds} rounds to stay within {self.budget_s:.0f}s")
        return False
