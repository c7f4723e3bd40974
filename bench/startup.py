"""Ray path start-up, each round in a fresh process (bench/run.py's own Ray is warm and would hide it): a cold
``init_ray``, the time to the first result batch on that cold Ray and then on the same Ray warm, the Predictor
actor's start and model load, and what the decode and write task workers import (torch belongs to the actor)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from bench.common import (
    MAIN,
    BenchResult,
    Check,
    Context,
    at_most,
    ensure_artifact,
    ensure_catalog,
    info,
    median,
    ratio,
    rotated,
    scratch,
    write_manifest,
)

NAME = "startup"
ROOT = Path(__file__).resolve().parent.parent
# Cold ``ray.init`` of the embedded local Ray: 3.5-4.3 s on this 2-core box when idle (GCS, raylet, the dashboard
# process Ray starts even with include_dashboard=False, two agents: the floor through Ray's public options),
# 7-17 s while neighbours load it. 5 s = the idle figure with ~20% margin.
RAY_INIT_TARGET_S = 5.0
# First result batch of a job on a warm Ray: a fresh actor process (Ray Data + torch imports, model load) and
# fresh task processes (Ray Data imports), then one batch. 10 s ~ what the in-process executor does in the same
# time on this box (~1,100 images at 113 img/s), well under the 2,000 images above which ``auto`` picks Ray.
FIRST_BATCH_TARGET_S = 10.0
# The change kept (executors.PARQUET_DATASOURCE_V2 = False) must save at least 10% of the time to the first batch.
SHIPPED_VS_V2_TARGET = 0.9
VARIANTS = ("shipped", "v2")
HEAVY = ("torch", "torchvision", "deltalake", "prefect", "ray.train", "duckdb", "catalog_tagger.model.inference")
PROBE_ENV = "CATALOG_TAGGER_BENCH_STARTUP_PROBE"  # where the probes write; Ray's workers inherit it from the child


# ------------------------------------------------------------------------------------------------ probes
# Subclasses of the real stages that note their process's modules and times. They live in the child's __main__,
# so Ray pickles them by value: a worker imports exactly what the real stage's module imports, plus nothing.
def _note(kind: str) -> None:
    import psutil

    doc = {
        "kind": kind,
        "pid": os.getpid(),
        "created": psutil.Process().create_time(),
        "t": time.time(),
        "heavy": [m for m in HEAVY if m in sys.modules],
    }
    path = Path(os.environ[PROBE_ENV]) / f"{kind}-{os.getpid()}-{time.time_ns()}.json"
    path.write_text(json.dumps(doc))


def _probe_classes() -> tuple[type, type, type]:
    from catalog_tagger.tag.predictor import Predictor
    from catalog_tagger.tag.reader import DecodeStage
    from catalog_tagger.tag.writer import PartWriter

    class ProbeDecode(DecodeStage):
        def __call__(self, batch: Any) -> Any:
            _note("decode")
            return super().__call__(batch)

    class ProbeWriter(PartWriter):
        def __call__(self, batch: Any) -> Any:
            _note("write")
            return super().__call__(batch)

    class ProbePredictor(Predictor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            _note("actor_init_start")
            super().__init__(*args, **kwargs)
            _note("actor_init_end")

    return ProbeDecode, ProbeWriter, ProbePredictor


def _install_probes(calls: list[dict[str, Any]]) -> None:
    """Swap the probes in for the real stages, and note each ``execute``'s start and returned resources."""
    from catalog_tagger.tag import executors, job

    probe_decode, probe_writer, probe_predictor = _probe_classes()
    real_decode, real_execute = executors.Stages.decode, executors.execute

    def decode(self: Any, plan: dict[str, Any]) -> Any:
        d = real_decode(self, plan)
        return probe_decode(**{f.name: getattr(d, f.name) for f in dataclasses.fields(d)})

    def execute(*args: Any, **kwargs: Any) -> Any:
        started = time.time()
        resources, totals = real_execute(*args, **kwargs)
        calls.append({"started": started, "resources": dict(resources)})
        return resources, totals

    swaps = ((executors.Stages, "decode", decode), (executors, "Predictor", probe_predictor))
    for owner, name, value in (*swaps, (job, "PartWriter", probe_writer), (job, "execute", execute)):
        setattr(owner, name, value)


# ------------------------------------------------------------------------------------------------ the child
def _child(model: str, source: str, out: str, batch_size: int, variant: str) -> None:
    """Cold job (the job starts Ray itself), warm job on the same Ray, then a local-executor job; JSON to OUT.json.

    ``variant``: "shipped", or "v2" = Ray Data's default Parquet datasource (V2) for the work files (the before).
    """
    from catalog_tagger.tag import executors

    executors.PARQUET_DATASOURCE_V2 = variant == "v2"
    os.environ.pop("RAY_ADDRESS", None)  # the embedded local Ray, like a plain CLI run
    probes = Path(out) / "probes"
    probes.mkdir(parents=True)
    os.environ[PROBE_ENV] = str(probes)
    t0 = time.perf_counter()
    import ray

    import_ray_s = time.perf_counter() - t0
    from catalog_tagger.tag.job import TagJobConfig, run

    calls: list[dict[str, Any]] = []
    _install_probes(calls)
    workers: list[int] = []  # worker processes Ray started during each Ray job (one log file each)
    jobs: tuple[tuple[str, Literal["ray", "local"]], ...] = (("cold", "ray"), ("warm", "ray"), ("local", "local"))
    for name, executor in jobs:
        before = _worker_logs(ray)
        cfg = TagJobConfig(
            model=model,
            source=source,
            output=f"{out}/{name}",
            batch_size=batch_size,
            executor=executor,
            calibrate=False,
        )
        run(cfg)
        workers.append(len(_worker_logs(ray) - before))
    notes = [json.loads(p.read_text()) for p in sorted(probes.glob("*.json"))]
    doc = {"import_ray_s": import_ray_s, "driver_pid": os.getpid(), "calls": calls, "notes": notes, "workers": workers}
    Path(out + ".json").write_text(json.dumps(doc))


def _worker_logs(ray: Any) -> set[Path]:
    """The worker processes this process's Ray has started so far: Ray writes one core-worker log file each."""
    if not ray.is_initialized():
        return set()
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())  # no public way to count them
    return set(logs.glob("python-core-worker-*.log"))


def _one_round(model: str, source: str, tmp: Path, batch_size: int, name: str) -> dict[str, Any]:
    out, variant = tmp / name, name.split("-")[0]
    cmd = [sys.executable, "-m", "bench.startup", "--child", model, source, str(out), str(batch_size), variant]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Ray Data logs to the child's stderr: kept off the table, shown only when the child fails
    done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise RuntimeError(f"startup child {name} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return _figures(json.loads(out.with_suffix(".json").read_text()))


def _figures(doc: dict[str, Any]) -> dict[str, Any]:
    """One round's figures from the child's execute calls (cold, warm, local) and the probes' notes."""
    cold, warm, local = (c["resources"] for c in doc["calls"])
    warm_start = doc["calls"][1]["started"]
    notes = [n for n in doc["notes"] if n["pid"] != doc["driver_pid"]]  # the Ray workers' (not the local job's)

    def first(kind: str, after: float) -> dict[str, Any] | None:
        return min((n for n in notes if n["kind"] == kind and n["t"] >= after), key=lambda n: n["t"], default=None)

    init0, init1 = first("actor_init_start", warm_start), first("actor_init_end", warm_start)
    tasks = [n for n in notes if n["kind"] in ("decode", "write")]
    workers = {(n["kind"], n["pid"]) for n in tasks}
    return {
        "import_ray_s": doc["import_ray_s"],
        "ray_init_s": cold.get("ray_init_s"),
        "first_batch_cold_s": cold.get("first_batch_s"),
        "first_batch_warm_s": warm.get("first_batch_s"),
        "first_batch_local_s": local.get("first_batch_s"),
        "warm_ray_init_s": warm.get("ray_init_s"),
        # warm job: from execute's start to the actor's __init__ (a fresh worker process, its Ray Data imports)...
        "actor_start_s": None if init0 is None else init0["t"] - warm_start,
        # ...and the __init__ itself: torch imports + artifact load
        "model_load_s": None if init0 is None or init1 is None else init1["t"] - init0["t"],
        "task_workers": len(workers),
        "workers_cold_job": doc["workers"][0],
        "workers_warm_job": doc["workers"][1],
        "task_workers_with_torch": len({(n["kind"], n["pid"]) for n in tasks if "torch" in n["heavy"]}),
        "task_heavy_modules": sorted({m for n in tasks for m in n["heavy"]}),
        "actor_heavy_modules": sorted(init1["heavy"]) if init1 else [],
    }


# ------------------------------------------------------------------------------------------------ the benchmark
def run(ctx: Context) -> BenchResult:
    s = ctx.sizes
    n, bs = s.startup_images, s.batch_size
    res = BenchResult(NAME, {"images": n, "batch_size": bs, "rounds": s.rounds, "catalog": MAIN.key})
    model = ensure_artifact("multi4")
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with scratch(NAME) as tmp:
        source = write_manifest(tmp / "manifest.parquet", ensure_catalog(MAIN, n))
        for r in range(s.rounds):
            if not ctx.another_round(r, res.notes):
                break
            for variant in rotated(list(VARIANTS), r):
                got = _one_round(model, source, tmp, bs, f"{variant}-{r}")
                runs[variant].append(got)
                ctx.say(
                    f"{NAME} round {r + 1}/{s.rounds} {variant}: ray.init {got['ray_init_s']:.1f}s, first batch cold "
                    f"{got['first_batch_cold_s']:.1f}s, warm {got['first_batch_warm_s']:.1f}s"
                )
    res.data["runs"] = runs
    res.checks += _checks(runs)
    res.notes.append(
        f"{n} images, batch {bs}; per round and variant a fresh process: a job that starts the embedded Ray (cold), "
        "the same job again (warm Ray), then the in-process executor; variants interleaved (rotated per round), "
        "medians over rounds. 'shipped' = executors.py as is; 'v2' = the same with Ray Data's default Parquet "
        "datasource for the work files (the before). Actor figures are the warm job's (an actor pool lives for one "
        "job). bench/run.py's own Ray, if started, idles meanwhile."
    )
    return res


def _checks(runs: dict[str, list[dict[str, Any]]]) -> list[Check]:
    def med(key: str, variant: str = "shipped") -> float:
        return median([float(g[key]) for g in runs[variant] if g.get(key) is not None])

    def rmed(key: str) -> float:  # shipped / v2 per round, then the median
        return median([ratio(a[key], b[key]) for a, b in zip(runs["shipped"], runs["v2"], strict=False)])

    heavy_tasks = sorted({m for g in runs["shipped"] for m in g["task_heavy_modules"]})
    return [
        info("import ray (fresh process)", med("import_ray_s"), "s"),
        at_most("ray.init, cold (init_ray, embedded local Ray)", med("ray_init_s"), RAY_INIT_TARGET_S, unit="s"),
        info("first batch, cold Ray (ray.init included)", med("first_batch_cold_s"), "s", "executor first_batch_s"),
        at_most("first batch, warm Ray", med("first_batch_warm_s"), FIRST_BATCH_TARGET_S, unit="s"),
        info("first batch, in-process executor", med("first_batch_local_s"), "s", "torch already imported there"),
        info("actor start (warm Ray): process + Ray Data imports", med("actor_start_s"), "s", "execute -> __init__"),
        info("actor model load: torch imports + artifact", med("model_load_s"), "s", "Predictor.__init__"),
        at_most(
            "decode/write task workers that imported torch",
            med("task_workers_with_torch"),
            0,
            unit="",
            note=f"target: no; heavy modules seen in tasks: {', '.join(heavy_tasks) or 'none'}",
        ),
        info(
            "worker processes started: cold job, shipped / v2",
            med("workers_cold_job"),
            "",
            f"v2: {med('workers_cold_job', 'v2'):.0f}",
        ),
        info(
            "worker processes started: warm job, shipped / v2",
            med("workers_warm_job"),
            "",
            f"v2: {med('workers_warm_job', 'v2'):.0f}",
        ),
        info("first batch, warm Ray, v2 (before)", med("first_batch_warm_s", "v2"), "s"),
        at_most("first batch, warm Ray: shipped / v2", rmed("first_batch_warm_s"), SHIPPED_VS_V2_TARGET),
        info("first batch, cold Ray, v2 (before)", med("first_batch_cold_s", "v2"), "s"),
        at_most("first batch, cold Ray: shipped / v2", rmed("first_batch_cold_s"), SHIPPED_VS_V2_TARGET),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--child", nargs=5, metavar=("MODEL", "SOURCE", "OUT", "BATCH", "VARIANT"), required=True)
    args = p.parse_args()
    model, source, out, batch, variant = args.child
    _child(model, source, out, int(batch), variant)


if __name__ == "__main__":
    main()
