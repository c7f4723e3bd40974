"""How the read/decode and predict stages run: a Ray Data pipeline, or the same stages in this process.

``choose_executor`` picks one. Both feed the driver's sink batch by batch; the Ray one is at-least-once (the sink
dedups by uri). Where the driver itself runs (here, connected to a cluster, or submitted as a Ray job) is
``cluster.py``'s choice; ``init_ray`` starts or joins the Ray this driver uses. An interrupt (SIGINT, or SIGTERM
turned into an exception) stops the pipeline, then shuts down a Ray this run started, before it propagates.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from catalog_tagger.errors import UserError
from catalog_tagger.fetch import ReadLimits
from catalog_tagger.storage import filesystem, is_local, strip
from catalog_tagger.tag.config import TagJobConfig
from catalog_tagger.tag.diff import Work
from catalog_tagger.tag.predictor import FaultInjection, Predictor
from catalog_tagger.tag.reader import DecodeStage
from catalog_tagger.tag.sink import Sink, Totals
from catalog_tagger.tag.writer import PartWriter

if TYPE_CHECKING:
    from types import FrameType

    from ray.data import Dataset

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (images done, images to tag)

# Ray Data is at-least-once either way (the driver dedups by uri); these make a killed actor or task recover
# instead of failing the run, and bound the retries of a batch that kills its actor every time (poison batch).
# Set explicitly rather than inherited from Ray's defaults, which change between releases.
ACTOR_MAX_RESTARTS = -1  # restart a dead Predictor without limit (preemptions over a long night)...
ACTOR_MAX_TASK_RETRIES = 3  # ...but retry one batch at most 3 times after its actor died
DECODE_MAX_RETRIES = 3  # decode tasks whose worker process died

OBJECT_STORE_MAX_BYTES = 2 * 1024**3  # embedded local Ray: object store at most 2 GiB...
OBJECT_STORE_RAM_FRACTION = 0.30  # ...and at most 30% of RAM (bounded memory; Ray's own default is 30% of RAM)
LOCAL_DECODE_THREADS = 1  # local executor: decode the next slice while the model runs on this one
LOCAL_PREFETCH = 2  # slices decoded ahead of the model
PROGRESS_LOG_S = 10.0  # how often the driver logs its rate
WRITE_CPUS = 0.25  # a write task encodes Parquet (zstd): light next to decode, and must fit beside the actors


@dataclass(frozen=True)
class Stages:
    """How to build one run's decode and predict stages: the same for both executors."""

    cfg: TagJobConfig
    run_id: str
    tagged_at: datetime  # every row of the run carries it
    image_size: int  # the model's input size: the decode stage resizes to it
    credentials: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)  # sources.Listing's

    def decode(self) -> DecodeStage:
        cfg = self.cfg
        return DecodeStage(
            image_size=self.image_size,
            storage_options=cfg.storage_options,
            allowed_root=cfg.allowed_root,
            credentials=self.credentials,
            limits=ReadLimits(
                max_bytes=cfg.max_image_bytes, timeout_s=cfg.read_timeout_s, deadline_s=cfg.read_deadline_s
            ),
            max_pixels=cfg.max_image_pixels,
        )

    def predictor_kwargs(self, *, device: str, threads: int | None, faults: FaultInjection | None) -> dict[str, Any]:
        """The Predictor's keyword arguments (Ray builds the actors from them, in their own processes)."""
        return {
            "run_id": self.run_id,
            "tagged_at": self.tagged_at,
            "device": device,
            "calibrate": self.cfg.calibrate,
            "baselines": self.cfg.baseline,
            "threads": threads,
            "faults": faults,
        }


def execute(
    stages: Stages, work: Work, writer: PartWriter, progress: ProgressFn | None = None
) -> tuple[dict[str, Any], Totals]:
    """Run the decode, predict and write stages over ``work``'s files; the driver only sees counts.

    Returns the resources plan recorded in the manifest (``{}`` when there was nothing to tag) and the totals.
    """
    totals = Totals()
    if not work.rows:
        return {}, totals
    cfg = stages.cfg
    executor = choose_executor(cfg, work.rows)
    log.info("run %s: %s executor", stages.run_id, executor)
    if executor == "local":
        resources = local_resources(cfg)
        sink = Sink(writer, cfg.rows_per_shard, cfg.shard_seconds, totals=totals)
        batches = local_batches(stages, work, threads=resources["threads"])
        _drain(batches, sink.add, totals, work.rows, stages.run_id, progress)
        sink.flush()
        return resources, totals
    started = init_ray(cfg.ray_address)
    try:
        ds, resources = build_dataset(stages, work, writer)
        stats = ds.iter_batches(batch_format="pyarrow", batch_size=None)
        _drain(stats, totals.add_stats, totals, work.rows, stages.run_id, progress)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or Ray's SIGTERM handler: stop Ray before exiting
        if started:
            shutdown_ray()
        raise
    return resources, totals


def _drain(
    batches: Iterable[pa.Table],
    consume: Callable[[pa.Table], object],
    totals: Totals,
    total: int,
    run_id: str,
    progress: ProgressFn | None,
) -> None:
    """Hand every batch to ``consume`` (which updates ``totals``), reporting progress and logging the rate.

    The batch iterator is closed on the way out, so that an interrupt stops its producers (Ray Data's executor,
    the local decode thread) before anything else happens.
    """
    t0 = last_log = time.perf_counter()
    it = iter(batches)
    try:
        for batch in it:
            consume(batch)
            done = totals.done + totals.duplicates
            if progress is not None:
                progress(min(done, total), total)
            if time.perf_counter() - last_log > PROGRESS_LOG_S:
                rate = done / (time.perf_counter() - t0)
                log.info("run %s: %d/%d images (%.1f img/s)", run_id, done, total, rate)
                last_log = time.perf_counter()
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def work_batches(work: Work, storage_options: dict[str, Any] | None, rows: int) -> Iterator[pa.Table]:
    """The work files' rows, ``rows`` at a time, read file by file (never the whole list at once)."""
    import pyarrow.parquet as pq

    for uri in work.files:
        fs = filesystem(uri, storage_options)
        with fs.open(strip(uri), "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=rows):
                yield pa.Table.from_batches([batch])


# --------------------------------------------------------------------------------------------- the choice
def _ray_address(address: str | None) -> str:
    """None/"" -> $RAY_ADDRESS when set, else "local" (never a stray ``ray start`` cluster found on disk)."""
    if address in (None, ""):
        return os.environ.get("RAY_ADDRESS") or "local"
    return address


def _cuda_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def choose_executor(cfg: TagJobConfig, work_rows: int) -> Literal["ray", "local"]:
    """``auto``: in-process for small runs on the embedded default, Ray Data for clusters, GPUs and big runs."""
    if cfg.executor != "auto":
        return cfg.executor
    if _ray_address(cfg.ray_address) != "local" or work_rows > cfg.local_max_images or cfg.device == "cuda":
        return "ray"
    if cfg.device != "cpu" and _cuda_visible():
        return "ray"
    return "local"


# --------------------------------------------------------------------------------------------- local executor
def local_resources(cfg: TagJobConfig) -> dict[str, Any]:
    """One predictor in this process; the model gets the cores the decode thread leaves.

    On a small box, torch's OpenMP threads sharing a core with the decode thread (or a neighbour) run several
    times slower than one thread per free core.
    """
    from catalog_tagger.model.inference import select_device

    cuda = select_device(cfg.device).type == "cuda"
    threads = max(1, (os.cpu_count() or 1) - LOCAL_DECODE_THREADS)
    return {"executor": "local", "actors": 1, "num_gpus": 1 if cuda else 0, "threads": threads}


def local_batches(stages: Stages, work: Work, *, threads: int) -> Iterator[pa.Table]:
    """The Ray pipeline's stages in this process: decode slices on a thread, ahead of one Predictor."""
    import torch

    prev_threads = torch.get_num_threads()
    env_faults = FaultInjection.from_env()
    # Test-only faults target the Ray actors: never os._exit the driver; a per-batch delay is kept.
    faults = dataclasses.replace(env_faults, kill_at_batch=0, kill_marker=None) if env_faults else FaultInjection()
    cfg = stages.cfg
    try:
        kwargs = stages.predictor_kwargs(device=cfg.device, threads=threads, faults=faults)
        predictor = Predictor(cfg.model, **kwargs)
        slices = work_batches(work, cfg.storage_options, cfg.batch_size)
        yield from _prefetched(stages.decode(), slices, predictor)
    finally:
        torch.set_num_threads(prev_threads)


def _prefetched(decode: DecodeStage, slices: Iterator[pa.Table], predictor: Predictor) -> Iterator[pa.Table]:
    """Predict slice after slice while the next ``LOCAL_PREFETCH`` slices are read and decoded."""
    with ThreadPoolExecutor(max_workers=LOCAL_DECODE_THREADS, thread_name_prefix="decode") as pool:
        ahead: deque[Future[dict[str, np.ndarray]]] = deque()

        def fill() -> None:
            while len(ahead) < LOCAL_PREFETCH:
                piece = next(slices, None)
                if piece is None:
                    return
                ahead.append(pool.submit(decode, piece))

        try:
            fill()
            while ahead:
                decoded = ahead.popleft().result()
                fill()
                yield predictor(decoded)
        finally:
            for fut in ahead:
                fut.cancel()


# --------------------------------------------------------------------------------------------- Ray executor
def _object_store_bytes() -> int:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return OBJECT_STORE_MAX_BYTES
    return int(min(OBJECT_STORE_MAX_BYTES, OBJECT_STORE_RAM_FRACTION * ram))


@contextmanager
def _signals_held() -> Iterator[list[int]]:
    """Record SIGINT and SIGTERM instead of acting on them during the block (main thread only; elsewhere Python
    delivers no signals), then put the handlers back. A Ctrl-C inside Ray's start-up or shut-down has ended in a
    segfault. ``ray.init`` also installs its own SIGTERM handler (``sys.exit``): it is kept only where no handler
    was set before (a caller's own handler, such as the CLI's, wins)."""
    held: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield held
        return

    def hold(signum: int, frame: FrameType | None) -> None:  # noqa: ARG001 - the signal handler signature
        held.append(signum)

    before = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield held
    finally:
        for sig, handler in before.items():
            if handler in (signal.SIG_DFL, None) and signal.getsignal(sig) is not hold:
                continue  # Ray installed one where there was none: keep it
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def init_ray(address: str | None) -> bool:
    """Connect to a cluster, or start the embedded local Ray sized to this machine (reused when running).

    ``None`` means ``$RAY_ADDRESS`` when set, else an embedded local Ray started with ``address="local"``: a bare
    ``ray.init()`` would attach to any cluster a ``ray start`` left on this machine. Returns whether this call
    started (or connected) Ray. An interrupt while Ray starts is held until it has started, then Ray is shut down
    and the interrupt delivered.
    """
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with _signals_held() as held:
        try:
            _start_ray(_ray_address(address))
        except SystemExit:  # the SIGTERM handler ray.init installs first thing fired: stop like on a held SIGTERM
            held.append(signal.SIGTERM)
    if held:
        shutdown_ray()
        signal.raise_signal(held[0])
    return True


def shutdown_ray() -> None:
    """Shut down the Ray this process started or connected, before the interpreter exits (interrupts held: we are
    stopping already, and a second Ctrl-C must not cut the shutdown short)."""
    import ray

    log.info("shutting down Ray")
    with _signals_held():
        ray.shutdown()


def _start_ray(address: str) -> None:
    """``ray.init`` of the embedded local Ray (``address="local"``) or of a cluster's driver."""
    import ray

    if address == "local":
        ray.init(
            address="local",
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=_object_store_bytes(),
        )
    else:
        try:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError) as err:
            raise ConnectionError(f"cannot connect to Ray at {address!r}: {err}") from err


def plan_resources(cfg: TagJobConfig) -> dict[str, Any]:
    """Actors, GPUs and CPUs per stage for the cluster Ray is connected to (recorded in the manifest)."""
    import ray

    res = ray.cluster_resources()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
    gpus = int(res.get("GPU", 0)) if cfg.device != "cpu" else 0
    cpus = max(1.0, float(res.get("CPU", 1)))
    if cfg.device == "cuda" and gpus == 0:
        raise UserError("--device cuda was requested but the Ray cluster has no GPUs")
    if gpus:
        actors = cfg.actors or gpus
        return {
            "executor": "ray",
            "actors": actors,
            # Without --actors the pool starts once one GPU is free and grows to every GPU the cluster has
            # (Ray autoscales an actor pool between its min and max size).
            "min_actors": actors if cfg.actors else 1,
            "num_gpus": 1,
            "num_cpus": 1,
            "threads": None,
            "decode_cpus": cfg.decode_cpus or 1,
        }
    actors = cfg.actors or 1
    # On CPU the actors' torch threads and the decode tasks share the cores. Keep CPU resources for decode
    # (else the pool takes every CPU and decode tasks never schedule); on tiny machines let torch use all
    # cores anyway, since decode is light next to the model.
    reserve = 1 if cpus < 8 else max(1, int(cpus // 4))
    per_actor = max(1, int((cpus - reserve) // actors))
    return {
        "executor": "ray",
        "actors": actors,
        "min_actors": actors,
        "num_gpus": 0,
        "num_cpus": per_actor if cpus - reserve >= actors else max(0.25, (cpus - reserve) / actors),
        "threads": int(cpus) if cpus <= 2 else per_actor,
        "decode_cpus": cfg.decode_cpus or (0.5 if cpus <= 2 else 1),
    }


def build_dataset(stages: Stages, work: Work, writer: PartWriter) -> tuple[Dataset, dict[str, Any]]:
    """The Ray Data pipeline: work files -> decode tasks -> an actor pool of Predictors -> write tasks; and its plan.

    Its output is one stats row per data file written (``writer.STATS_SCHEMA``): no predicted row reaches the driver.
    """
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    plan = plan_resources(stages.cfg)
    cfg = stages.cfg
    ds: Dataset = ray.data.read_parquet(
        [strip(f) for f in work.files], filesystem=_arrow_fs(work.files[0], cfg.storage_options), partitioning=None
    )
    with warnings.catch_warnings():
        # Ray 2.60 flags every extra remote arg (max_restarts...) as deprecated, with no named replacement yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(
            stages.decode(),
            batch_format="pyarrow",
            batch_size=cfg.batch_size,
            num_cpus=plan["decode_cpus"],
            zero_copy_batch=True,
            max_retries=DECODE_MAX_RETRIES,
        )
        ds = _predict(ds, stages, plan)
        ds = ds.map_batches(
            writer,
            batch_format="pyarrow",
            batch_size=cfg.rows_per_shard,
            num_cpus=WRITE_CPUS,
            concurrency=cfg.write_tasks,
            max_retries=DECODE_MAX_RETRIES,
            scheduling_strategy="SPREAD",  # write bandwidth from every node, not the head's alone
        )
    plan["write_tasks"] = cfg.write_tasks
    return ds, plan


def _arrow_fs(uri: str, storage_options: dict[str, Any] | None) -> Any:
    """The pyarrow filesystem Ray's readers use for the work files (None for local paths)."""
    if is_local(uri):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(filesystem(uri, storage_options)))


def _predict(ds: Dataset, stages: Stages, plan: dict[str, Any]) -> Dataset:
    """The Predictor actor pool, restarted when an actor dies (its batch is retried)."""
    import ray

    device = "cuda" if plan["num_gpus"] else "cpu"
    # Test-only faults come from the DRIVER's environment: the actors' may predate the test's settings.
    kwargs = stages.predictor_kwargs(device=device, threads=plan["threads"], faults=FaultInjection.from_env())
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_uri": stages.cfg.model, **kwargs},
        batch_format="numpy",
        batch_size=stages.cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=plan["min_actors"], max_size=plan["actors"]),
        num_gpus=plan["num_gpus"],
        num_cpus=plan["num_cpus"],
        zero_copy_batch=True,
        max_restarts=ACTOR_MAX_RESTARTS,
        max_task_retries=ACTOR_MAX_TASK_RETRIES,
    )
