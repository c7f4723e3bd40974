"""How the decode, predict and write stages run: a Ray Data pipeline, or the same stages in this process.

``choose_executor`` picks one. The Ray pipeline reads the run's work files (``read_parquet``), decodes in tasks,
predicts in an actor pool and writes data files in write tasks on any node; the driver only receives one stats
row per file. The local executor runs the same stages in this process and groups rows into files with
``sink.Sink``. Where the driver itself runs (here, connected to a cluster, or submitted as a Ray job) is
``cluster.py``'s choice; ``ray_runtime.init_ray`` starts or joins the Ray this driver uses. An interrupt (SIGINT,
or SIGTERM turned into an exception) stops the pipeline, then shuts down a Ray this run started, before it
propagates.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from catalog_tagger.errors import UserError
from catalog_tagger.fetch import ReadLimits
from catalog_tagger.storage import filesystem, is_local, strip
from catalog_tagger.tag.config import TagJobConfig
from catalog_tagger.tag.diff import Work
from catalog_tagger.tag.predictor import FaultInjection, Predictor
from catalog_tagger.tag.ray_runtime import init_ray, shutdown_ray
from catalog_tagger.tag.reader import DecodeStage
from catalog_tagger.tag.resources import LOCAL_DECODE_THREADS, choose_executor, local_resources, plan_resources
from catalog_tagger.tag.sink import Sink, Totals
from catalog_tagger.tag.writer import PartWriter

if TYPE_CHECKING:
    from ray.data import Dataset

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]  # (images done, images to tag)

# Ray Data is at-least-once either way (the driver dedups by uri); these make a killed actor or task recover
# instead of failing the run, and bound the retries of a batch that kills its actor every time (poison batch).
# Set explicitly rather than inherited from Ray's defaults, which change between releases.
ACTOR_MAX_RESTARTS = -1  # restart a dead Predictor without limit (preemptions over a long night)...
ACTOR_MAX_TASK_RETRIES = 3  # ...but retry one batch at most 3 times after its actor died
DECODE_MAX_RETRIES = 3  # decode tasks whose worker process died

LOCAL_PREFETCH = 2  # slices decoded ahead of the model
PROGRESS_LOG_S = 10.0  # how often the driver logs its rate
MIN_FILES = 8  # a Ray run writes at least this many data files (when it has the rows)
WRITE_CPUS = 0.25  # a write task encodes Parquet (zstd): light next to decode, and must fit beside the actors
# Ray Data 2.60 reads Parquet through its datasource V2 by default, which reads the files' footers on a pool of up
# to 32 FooterReader actors: fresh worker processes, each importing Ray Data, for a run's few work files (one per
# 50,000 uris). V1 lists them in the driver and samples at most 10 in ordinary tasks (pooled worker processes).
# Same rows; on this 2-core box V1 started 1-3 worker processes per job on a warm Ray instead of 6-9, and the
# first batch came after 4.4 s instead of 7.3 s (bench/startup.py measures both).
PARQUET_DATASOURCE_V2 = False


@dataclass(frozen=True)
class Stages:
    """How to build one run's decode and predict stages: the same for both executors."""

    cfg: TagJobConfig
    run_id: str
    tagged_at: datetime  # every row of the run carries it
    image_size: int  # the model's input size: the decode stage resizes to it
    model_version: str | None = None  # the version the run validated: a Predictor refuses another (tag/predictor.py)
    credentials: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)  # sources.Listing's

    def decode(self, plan: dict[str, Any]) -> DecodeStage:
        """The read + decode stage for the executor's ``plan`` (its ``decode_on``: where JPEGs are decoded)."""
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
            accelerator_jpeg=plan.get("decode_on") == "accelerator",
        )

    def predictor_kwargs(self, *, device: str, threads: int | None, faults: FaultInjection | None) -> dict[str, Any]:
        """The Predictor's keyword arguments (Ray builds the actors from them, in their own processes)."""
        return {
            "run_id": self.run_id,
            "tagged_at": self.tagged_at,
            "device": device,
            "threads": threads,
            "faults": faults,
            "model_version": self.model_version,
        }


def execute(
    stages: Stages, work: Work, writer: PartWriter, progress: ProgressFn | None = None
) -> tuple[dict[str, Any], Totals]:
    """Run the decode, predict and write stages over ``work``'s files; the driver only sees counts.

    Returns the resources plan recorded in the manifest (``{}`` when there was nothing to tag) and the totals. The
    plan carries the run's start-up seconds: ``first_batch_s`` (from this call to the first result batch reaching
    the driver: Ray's start, worker and actor start-up, the model load and the first batch's work) and, on Ray,
    ``ray_init_s`` (the part of it ``init_ray`` took; 0.0 when this process's Ray was already running).
    """
    totals = Totals()
    if not work.rows:
        return {}, totals
    t0 = time.perf_counter()
    cfg = stages.cfg
    executor = choose_executor(cfg, work.rows)
    log.info("run %s: %s executor", stages.run_id, executor)
    if executor == "local":
        resources = local_resources(cfg)
        sink = Sink(writer, cfg.rows_per_shard, cfg.shard_seconds, totals=totals)
        batches = local_batches(stages, work, threads=resources["threads"])
        first = _drain(batches, sink.add, totals, work.rows, stages.run_id, progress)
        sink.flush()
        return {**resources, "first_batch_s": _since(t0, first)}, totals
    t_init = time.perf_counter()
    started = init_ray(cfg.ray_address)
    ray_init_s = time.perf_counter() - t_init if started else 0.0
    log.info("run %s: Ray ready after %.2fs%s", stages.run_id, ray_init_s, "" if started else " (already running)")
    try:
        ds, resources = build_dataset(stages, work, writer)
        stats = ds.iter_batches(batch_format="pyarrow", batch_size=None)
        first = _drain(stats, totals.add_stats, totals, work.rows, stages.run_id, progress)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or Ray's SIGTERM handler: stop Ray before exiting
        if started:
            shutdown_ray()
        raise
    except Exception as err:
        if (found := user_error_in(err)) is None:
            raise
        raise found from err
    return {**resources, "ray_init_s": round(ray_init_s, 3), "first_batch_s": _since(t0, first)}, totals


_RAISED = re.compile(r"catalog_tagger\.errors\.(\w+): ([^\n]+)")


def user_error_in(err: BaseException) -> UserError | None:
    """The user error a Predictor raised where Ray runs it (e.g. a model artifact replaced mid-run), rebuilt from
    the text of Ray's ``ActorDiedError`` / ``RayTaskError``: one clear line instead of a remote traceback."""
    from catalog_tagger import errors

    for name, message in reversed(_RAISED.findall(str(err))):
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, UserError):
            return cls(message.strip())
    return None


def _since(t0: float, t: float | None) -> float | None:
    """Seconds from ``t0`` to ``t`` (``perf_counter`` readings), rounded like the manifest's timings."""
    return None if t is None else round(t - t0, 3)


def _drain(
    batches: Iterable[pa.Table],
    consume: Callable[[pa.Table], object],
    totals: Totals,
    total: int,
    run_id: str,
    progress: ProgressFn | None,
) -> float | None:
    """Hand every batch to ``consume`` (which updates ``totals``), reporting progress and logging the rate.

    Returns when the first batch arrived (``perf_counter``; None without a batch): the end of the start-up. The
    batch iterator is closed on the way out, so that an interrupt stops its producers (Ray Data's executor, the
    local decode thread) before anything else happens.
    """
    t0 = last_log = time.perf_counter()
    first: float | None = None
    it = iter(batches)
    try:
        for batch in it:
            if first is None:
                first = time.perf_counter()
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
    return first


def work_batches(work: Work, storage_options: dict[str, Any] | None, rows: int) -> Iterator[pa.Table]:
    """The work files' rows, ``rows`` at a time, read file by file (never the whole list at once)."""
    import pyarrow.parquet as pq

    for uri in work.files:
        fs = filesystem(uri, storage_options)
        with fs.open(strip(uri), "rb") as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=rows):
                yield pa.Table.from_batches([batch])


# --------------------------------------------------------------------------------------------- local executor
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
        yield from _prefetched(stages.decode(local_resources(cfg)), slices, predictor)
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
    ds = read_work(work, cfg.storage_options)
    # A work file is one block of up to 50,000 uris: cut it into blocks of one model batch (streaming, by Ray
    # tasks), so decode runs in parallel and every stage streams (one big block would be decoded by one task
    # and reach the write stage only at the end of the run).
    ds = ds.repartition(target_num_rows_per_block=max(1, min(cfg.batch_size, math.ceil(work.rows / 4))))
    with warnings.catch_warnings():
        # Ray 2.60 flags every extra remote arg (max_restarts...) as deprecated, with no named replacement yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(
            stages.decode(plan),
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
            batch_size=write_rows(cfg.rows_per_shard, work.rows),
            num_cpus=WRITE_CPUS,
            compute=None if cfg.write_tasks is None else ray.data.TaskPoolStrategy(size=cfg.write_tasks),
            max_retries=DECODE_MAX_RETRIES,
            scheduling_strategy="SPREAD",  # write bandwidth from every node, not the head's alone
        )
    plan["write_tasks"] = cfg.write_tasks
    return ds, plan


def read_work(work: Work, storage_options: dict[str, Any] | None) -> Dataset:
    """The run's work files as a Dataset, read by Ray's first Parquet datasource (``PARQUET_DATASOURCE_V2``)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    default, ctx.use_datasource_v2 = ctx.use_datasource_v2, PARQUET_DATASOURCE_V2
    try:  # read_parquet picks its datasource now: the process's default is put back for any other reader
        return ray.data.read_parquet(
            [strip(f) for f in work.files], filesystem=_arrow_fs(work.files[0], storage_options), partitioning=None
        )
    finally:
        ctx.use_datasource_v2 = default


def write_rows(rows_per_shard: int, rows: int) -> int:
    """Rows per data file in the Ray pipeline: ``rows_per_shard``, but small enough that a run writes at least
    ``MIN_FILES`` files (the unit of resume: Ray has no time budget like the local sink's ``shard_seconds``)."""
    return max(1, min(rows_per_shard, math.ceil(rows / MIN_FILES)))


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
