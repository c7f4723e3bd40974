"""The tagging job: list -> diff vs committed runs -> Ray Data decode + predict -> staged shards -> commit."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator

from catalog_tagger.accounting import DEFAULT_PRICE_PER_HOUR, compute_savings
from catalog_tagger.errors import ArtifactError, CommitLockLost, CommitLockTimeout, OutputWriteError, UserError
from catalog_tagger.model.artifact import check_weights, load_card
from catalog_tagger.schema import OUTPUT_SCHEMA_VERSION, STATUS_ERROR, STATUS_OK
from catalog_tagger.storage import filesystem, is_local, is_storage_error, is_transient, redact, retry_transient, strip
from catalog_tagger.tag import commit as ledger
from catalog_tagger.tag import plan as incremental
from catalog_tagger.tag.commit import Layout
from catalog_tagger.tag.plan import plan_work
from catalog_tagger.tag.predictor import (
    ACCEL_COL,
    CALIB_COL,
    DECODE_COL,
    STATUS_UNCHANGED,
    DecodeStage,
    FaultInjection,
    Predictor,
)
from catalog_tagger.tag.sources import list_source, refuse_outside_root

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]

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


class TagJobConfig(BaseModel):
    """Everything one tagging run needs. Validated before any work starts."""

    model_config = ConfigDict(extra="forbid")

    model: str  # model artifact directory (path or fsspec URL)
    source: str  # image prefix, or a .csv/.parquet manifest with a `uri` column
    output: str  # output root (path or fsspec URL)
    run_id: str | None = None  # default: UTC timestamp + random suffix; reuse an id to resume a crashed run
    ray_address: str | None = None  # None/"local": in-process Ray; "auto" or "ray://host:10001": connect
    batch_size: int = Field(default=64, ge=1, le=4096)  # images per model forward pass
    actors: int | None = Field(default=None, ge=1)  # predictor actors (default: one per GPU, else 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    full: bool = False  # re-tag everything, not only new/changed images
    limit: int | None = Field(default=None, ge=1)  # tag at most N images (trial runs)
    rows_per_shard: int = Field(default=20_000, ge=1)  # rows per part file = unit of resume
    price_per_hour: float = Field(default=DEFAULT_PRICE_PER_HOUR, ge=0)
    calibrate: bool = True  # time a single-task model at actor start for the savings report
    baseline: list[str] = Field(default_factory=list)  # the user's own single-task artifacts to compare against
    storage_options: dict[str, Any] | None = Field(default=None, repr=False)  # fsspec options (never logged)
    decode_cpus: float | None = Field(default=None, gt=0)  # CPUs per decode task (default: machine-sized)
    allowed_root: str | None = None  # if set, every image uri must resolve inside it, else the run is refused
    # "ray": Ray Data pipeline; "local": the same stages in this process (no Ray); "auto": local for small runs
    # on the embedded default (no cluster address, no CUDA GPU, at most local_max_images to tag), else ray.
    executor: Literal["auto", "ray", "local"] = "auto"
    local_max_images: int = Field(default=2000, ge=0)

    @field_validator("run_id")
    @classmethod
    def _run_id_safe(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/\\ =*?[]") or v.startswith((".", "_"))):
            raise ValueError(
                f"run_id {v!r} must be non-empty, without '/', '\\\\', '=', '*', '?', '[', ']' or spaces, "
                "and must not start with '.' or '_'"
            )
        return v


@dataclass
class RunResult:
    """What a run did; ``manifest`` is the committed run manifest (None when nothing was committed)."""

    run_id: str
    listed: int
    processed: int
    ok: int
    error: int
    unchanged: int
    wall_s: float
    manifest: dict[str, Any] | None
    output: str
    notes: list[str] = field(default_factory=list)
    resumed: int = 0  # images staged by an earlier attempt of this run id, not tagged again

    @property
    def images_per_s(self) -> float:
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _check_output_writable(cfg: TagJobConfig) -> None:
    fs = filesystem(cfg.output, cfg.storage_options)
    root = strip(cfg.output)
    probe = f"{root.rstrip('/')}/_staging/.write-probe-{uuid.uuid4().hex}"

    def write_probe() -> None:
        fs.makedirs(os.path.dirname(probe), exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)

    try:
        retry_transient(write_probe, f"write probe {redact(cfg.output)}")
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot write there"
        if is_transient(err):
            raise  # a store hiccup that outlived the retries: retryable by the caller (Prefect), not bad input
        raise UserError(f"output {redact(cfg.output)!r} is not writable: {type(err).__name__}: {err}") from None


def _check_allowed_root(cfg: TagJobConfig) -> None:
    root = cfg.allowed_root
    if root is None:
        return
    if is_local(root) and not os.path.isdir(strip(root)):
        raise UserError(f"allowed_root {root!r} is not an existing local folder")
    if not is_local(root) and not strip(root).strip("/"):
        raise UserError(f"allowed_root {root!r} must name a bucket or prefix, not a whole store")


def _check_baselines(cfg: TagJobConfig) -> None:
    """``--baseline`` artifacts must load and take the same input size (they are timed on the same batch)."""
    size = load_card(cfg.model).image_size
    for uri in cfg.baseline:
        card = load_card(uri)
        check_weights(uri)
        if card.image_size != size:
            raise UserError(
                f"baseline {redact(uri)!r} takes {card.image_size} px images, the model {size} px: baselines are "
                "timed on the model's own batches, so their input size must match"
            )


def validate(cfg: TagJobConfig) -> None:
    """Refuse bad input before any work: model artifact, output writability (the source is checked by listing)."""
    try:
        load_card(cfg.model)
    except ArtifactError:
        raise
    except FileNotFoundError:
        raise UserError(f"model {redact(cfg.model)!r} not found") from None
    check_weights(cfg.model)
    _check_baselines(cfg)
    _check_allowed_root(cfg)
    _check_source_exists(cfg)
    _check_output_writable(cfg)


def _check_source_exists(cfg: TagJobConfig) -> None:
    fs = filesystem(cfg.source, cfg.storage_options)
    try:
        found = fs.exists(strip(cfg.source))
    except Exception as err:  # noqa: BLE001 - permission, bad bucket, bad credentials...
        if is_transient(err):
            raise
        raise UserError(f"source {redact(cfg.source)!r} cannot be read: {type(err).__name__}: {err}") from None
    if not found:
        raise UserError(f"source {redact(cfg.source)!r} does not exist or is not readable")


def _ray_address(address: str | None) -> str:
    """None/"" -> $RAY_ADDRESS when set, else "local" (never a stray ``ray start`` cluster found on disk)."""
    if address in (None, ""):
        return os.environ.get("RAY_ADDRESS") or "local"
    return address


def _object_store_bytes() -> int:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return OBJECT_STORE_MAX_BYTES
    return int(min(OBJECT_STORE_MAX_BYTES, OBJECT_STORE_RAM_FRACTION * ram))


def init_ray(address: str | None) -> None:
    """Connect to a cluster, or start the embedded local Ray sized to this machine (reused when running).

    ``None`` means ``$RAY_ADDRESS`` when set, else an embedded local Ray started with ``address="local"``: a bare
    ``ray.init()`` would attach to any cluster a ``ray start`` left on this machine.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = _ray_address(address)
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


def _plan_resources(cfg: TagJobConfig) -> dict[str, Any]:
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0)) if cfg.device != "cpu" else 0
    cpus = max(1.0, float(res.get("CPU", 1)))
    if cfg.device == "cuda" and gpus == 0:
        raise UserError("--device cuda was requested but the Ray cluster has no GPUs")
    if gpus:
        actors = cfg.actors or gpus
        return {
            "executor": "ray",
            "actors": actors,
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
        "num_gpus": 0,
        "num_cpus": per_actor if cpus - reserve >= actors else max(0.25, (cpus - reserve) / actors),
        "threads": int(cpus) if cpus <= 2 else per_actor,
        "decode_cpus": cfg.decode_cpus or (0.5 if cpus <= 2 else 1),
    }


def _build_dataset(cfg: TagJobConfig, work: pa.Table, model_version: str, image_size: int, run_id: str, tagged_at):
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.execution_options.preserve_order = False
    plan = _plan_resources(cfg)
    block_rows = max(1, min(cfg.batch_size, math.ceil(work.num_rows / 4)))
    # One block per slice, made on the driver: a repartition is an all-to-all task that needs a whole CPU,
    # which a cluster of 1-CPU nodes running the actor pool may never have free.
    ds = ray.data.from_arrow([work.slice(i, block_rows) for i in range(0, work.num_rows, block_rows)])
    with warnings.catch_warnings():
        # Ray 2.60 flags every extra remote arg (max_restarts...) as deprecated, with no named replacement yet.
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(
            DecodeStage(image_size=image_size, storage_options=cfg.storage_options, allowed_root=cfg.allowed_root),
            batch_format="pyarrow",
            batch_size=block_rows,
            num_cpus=plan["decode_cpus"],
            zero_copy_batch=True,
            max_retries=DECODE_MAX_RETRIES,
        )
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={
                "model_uri": cfg.model,
                "run_id": run_id,
                "tagged_at": tagged_at,
                "device": "cuda" if plan["num_gpus"] else "cpu",
                "storage_options": cfg.storage_options,
                "calibrate": cfg.calibrate,
                "baselines": cfg.baseline,
                "threads": plan["threads"],
                # Test-only faults come from the DRIVER's environment: the actors' may predate the test's settings.
                "faults": FaultInjection.from_env(),
            },
            batch_format="numpy",
            batch_size=cfg.batch_size,
            compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
            num_gpus=plan["num_gpus"],
            num_cpus=plan["num_cpus"],
            zero_copy_batch=True,
            max_restarts=ACTOR_MAX_RESTARTS,
            max_task_retries=ACTOR_MAX_TASK_RETRIES,
        )
    return ds, plan


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


def _local_batches(
    cfg: TagJobConfig, work: pa.Table, image_size: int, run_id: str, tagged_at, plan: dict[str, Any]
) -> Iterator[pa.Table]:
    """The Ray pipeline's stages in this process: DecodeStage on slices (decoded ahead on a thread), one Predictor."""
    import torch

    prev_threads = torch.get_num_threads()
    # The model gets the cores the decode thread leaves: on a small box, torch's OpenMP threads sharing a core
    # with the decode thread (or a neighbour) run several times slower than one thread per free core.
    threads = max(1, (os.cpu_count() or 1) - LOCAL_DECODE_THREADS)
    faults = FaultInjection.from_env()
    # Test-only faults target the Ray actors: never os._exit the driver; a per-batch delay is kept.
    faults = dataclasses.replace(faults, kill_at_batch=0, kill_marker=None) if faults else FaultInjection()
    decode = DecodeStage(image_size=image_size, storage_options=cfg.storage_options, allowed_root=cfg.allowed_root)
    try:
        predictor = Predictor(
            cfg.model,
            run_id=run_id,
            tagged_at=tagged_at,
            device=cfg.device,
            storage_options=cfg.storage_options,
            calibrate=cfg.calibrate,
            threads=threads,
            faults=faults,
            baselines=cfg.baseline,
        )
        cuda = predictor.device.type == "cuda"
        plan.update(executor="local", actors=1, num_gpus=1 if cuda else 0, threads=threads)
        step = cfg.batch_size
        starts = iter(range(0, work.num_rows, step))
        with ThreadPoolExecutor(max_workers=LOCAL_DECODE_THREADS, thread_name_prefix="decode") as pool:
            ahead: deque[Future] = deque()

            def fill() -> None:
                while len(ahead) < LOCAL_PREFETCH:
                    start = next(starts, None)
                    if start is None:
                        return
                    ahead.append(pool.submit(decode, work.slice(start, step)))

            try:
                fill()
                while ahead:
                    decoded = ahead.popleft().result()
                    fill()
                    yield predictor(decoded)
            finally:
                for fut in ahead:
                    fut.cancel()
    finally:
        torch.set_num_threads(prev_threads)


class _ShardWriter:
    """Driver-side sink: dedups rows by uri (Ray is at-least-once) and stages a part file every N rows."""

    def __init__(self, layout: Layout, run_id: str, rows_per_shard: int, seen: set[str], next_index: int) -> None:
        self.layout, self.run_id, self.rows_per_shard = layout, run_id, rows_per_shard
        self.seen = seen
        self.index = next_index
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.shards: list[ledger.Shard] = []
        self.totals = {
            "ok": 0,
            "error": 0,
            "unchanged": 0,
            "duplicates": 0,
            "accel_s": 0.0,
            "decode_s": 0.0,
            "single_s": 0.0,
        }

    def add(self, table: pa.Table) -> int:
        uris = table.column("uri").to_pylist()
        keep = [i for i, u in enumerate(uris) if u not in self.seen]
        self.totals["duplicates"] += len(uris) - len(keep)
        if len(keep) != len(uris):
            table = table.take(pa.array(keep, type=pa.int64()))
        # A batch repeated by a retry appears once: remember uris only after dedup within the batch too.
        new_uris = table.column("uri").to_pylist()
        if len(set(new_uris)) != len(new_uris):
            first: dict[str, int] = {}
            for i, u in enumerate(new_uris):
                first.setdefault(u, i)
            self.totals["duplicates"] += len(new_uris) - len(first)
            table = table.take(pa.array(sorted(first.values()), type=pa.int64()))
        self.seen.update(table.column("uri").to_pylist())
        self.totals["accel_s"] += pc.sum(table.column(ACCEL_COL)).as_py() or 0.0
        self.totals["single_s"] += pc.sum(table.column(CALIB_COL)).as_py() or 0.0
        self.totals["decode_s"] += pc.sum(table.column(DECODE_COL)).as_py() or 0.0
        status = table.column("status")
        unchanged = pc.equal(status, STATUS_UNCHANGED)
        self.totals["unchanged"] += pc.sum(unchanged).as_py() or 0
        table = table.filter(pc.invert(unchanged))
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.rows_per_shard:
            merged = pa.concat_tables(self.pending)
            self.pending = [merged.slice(self.rows_per_shard)]
            self.pending_rows = merged.num_rows - self.rows_per_shard
            self._write(merged.slice(0, self.rows_per_shard))
        return table.num_rows

    def flush(self) -> None:
        if self.pending_rows:
            self._write(pa.concat_tables(self.pending))
        self.pending, self.pending_rows = [], 0

    def _write(self, table: pa.Table) -> None:
        timing = {
            "accel_s": pc.sum(table.column(ACCEL_COL)).as_py() or 0.0,
            "single_s": pc.sum(table.column(CALIB_COL)).as_py() or 0.0,
            "decode_s": pc.sum(table.column(DECODE_COL)).as_py() or 0.0,
        }
        table = table.drop_columns([ACCEL_COL, CALIB_COL, DECODE_COL])
        stats = {**_table_stats(table), **timing}
        with _output_errors(self.run_id, self.layout.output):
            shard = ledger.write_shard(self.layout, self.run_id, self.index, table, stats)
        self.shards.append(shard)
        self.totals["ok"] += stats["ok"]
        self.totals["error"] += stats["error"]
        self.index += 1


@contextmanager
def _output_errors(run_id: str, output: str) -> Iterator[None]:
    """Turn a store's final refusal of a write into one clear error saying what was kept and how to resume."""
    try:
        yield
    except (UserError, CommitLockTimeout, CommitLockLost):
        raise
    except Exception as err:
        if not is_storage_error(err):
            raise
        hint = f"run {run_id} is not committed; its staged shards are kept: rerun with --run-id {run_id} to resume"
        if is_transient(err):  # retries exhausted: let the caller (Prefect) retry the whole run, which resumes
            log.error("writing to %s kept failing (%s: %s); %s", redact(output), type(err).__name__, err, hint)
            raise
        raise OutputWriteError(f"cannot write to output {redact(output)}: {type(err).__name__}: {err}; {hint}") from err


def _table_stats(table: pa.Table) -> dict[str, Any]:
    status = table.column("status")
    return {
        "ok": int(pc.sum(pc.equal(status, STATUS_OK)).as_py() or 0),
        "error": int(pc.sum(pc.equal(status, STATUS_ERROR)).as_py() or 0),
    }


def run(cfg: TagJobConfig, *, progress: ProgressFn | None = None) -> RunResult:
    """Tag a catalog and commit the run. Safe to rerun with the same ``run_id`` after a crash (resumes)."""
    t_start = time.perf_counter()
    validate(cfg)
    card = load_card(cfg.model)
    layout = Layout(cfg.output, cfg.storage_options)
    run_id = cfg.run_id or new_run_id()

    existing = ledger.read_json(layout.manifest(run_id), cfg.storage_options)
    if existing is not None:
        log.info("run %s is already committed; nothing to do", run_id)
        return _result_from_manifest(existing, cfg.output, time.perf_counter() - t_start)
    if ledger.pending_commit(layout, run_id):
        log.info("run %s: finishing an interrupted commit", run_id)
        with _output_errors(run_id, cfg.output), ledger.commit_lock(layout, run_id) as lock:
            manifest = ledger.read_json(layout.manifest(run_id), cfg.storage_options)
            if manifest is None:
                manifest = ledger.finish_commit(layout, run_id, heartbeat=lock.refresh)
        return _result_from_manifest(manifest, cfg.output, time.perf_counter() - t_start)

    # List (and refuse uris outside the allowed root) before anything is written for this run.
    t0 = time.perf_counter()
    listing = list_source(cfg.source, cfg.storage_options, limit=cfg.limit)
    list_s = time.perf_counter() - t0
    if cfg.allowed_root is not None:
        refuse_outside_root(listing, cfg.source, cfg.allowed_root)

    state = _run_state(layout, run_id, card.version, cfg)
    tagged_at = datetime.fromisoformat(state["started_at"])
    done = ledger.done_shards(layout, run_id)
    work, plan_notes = plan_work(layout, listing.table, model_version=card.version, full=cfg.full, resumed_shards=done)
    notes = listing.notes + plan_notes
    seen = set(work.resumed_uris)
    total = work.table.num_rows
    log.info(
        "run %s: %d listed, %d to tag%s",
        run_id,
        listing.table.num_rows,
        total,
        f", {len(seen)} already staged (resumed)" if seen else "",
    )

    writer = _ShardWriter(
        layout, run_id, cfg.rows_per_shard, seen, next_index=max((s.index for s in done), default=-1) + 1
    )
    t_pipe = time.perf_counter()
    plan: dict[str, Any] = {}
    if total:
        executor = choose_executor(cfg, total)
        log.info("run %s: %s executor", run_id, executor)
        batches: Iterable[pa.Table]
        if executor == "local":
            batches = _local_batches(cfg, work.table, card.image_size, run_id, tagged_at, plan)
        else:
            init_ray(cfg.ray_address)
            ds, plan = _build_dataset(cfg, work.table, card.version, card.image_size, run_id, tagged_at)
            batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
        processed = 0
        last_log = time.perf_counter()
        for batch in batches:
            writer.add(batch)
            processed += batch.num_rows
            if progress is not None:
                progress(min(processed, total), total)
            if time.perf_counter() - last_log > 10:
                rate = processed / (time.perf_counter() - t_pipe)
                log.info("run %s: %d/%d images (%.1f img/s)", run_id, processed, total, rate)
                last_log = time.perf_counter()
        writer.flush()
    pipeline_s = time.perf_counter() - t_pipe

    def nothing(msg: str, extra_notes: list[str] | None = None) -> RunResult:
        ledger.clear_staging(layout, run_id)
        log.info("run %s: %s", run_id, msg)
        return RunResult(
            run_id=run_id,
            listed=listing.table.num_rows,
            processed=0,
            ok=0,
            error=0,
            unchanged=work.unchanged + writer.totals["unchanged"],
            wall_s=time.perf_counter() - t_start,
            manifest=None,
            output=cfg.output,
            notes=[*notes, *(extra_notes or []), msg],
            resumed=len(work.resumed_uris),
        )

    shards = done + writer.shards
    if not shards:
        empty = "nothing to do: the source has no images"
        return nothing("nothing to do: no new or changed images" if listing.table.num_rows else empty)

    with _output_errors(run_id, cfg.output), ledger.commit_lock(layout, run_id) as lock:
        # Under the lock: another process may have committed this very run id, or other runs the same images.
        already = ledger.read_json(layout.manifest(run_id), cfg.storage_options)
        if already is not None:
            log.warning("run %s was committed by another process meanwhile; not committing it twice", run_id)
            return _result_from_manifest(already, cfg.output, time.perf_counter() - t_start)
        shards, dropped, meanwhile = _drop_committed_meanwhile(layout, run_id, state, card.version, shards)
        if meanwhile and dropped:
            notes.append(
                f"concurrent runs: {dropped} image(s) were committed meanwhile by run(s) {', '.join(meanwhile)} "
                "with the same model and bytes; not committed twice"
            )
        if not shards:
            return nothing(f"nothing to commit: every tagged image was committed meanwhile by {', '.join(meanwhile)}")

        ok = sum(int(s.stats.get("ok", 0)) for s in shards)
        err = sum(int(s.stats.get("error", 0)) for s in shards)
        # Timings come from the shard stats, so a resumed run still accounts for the shards of earlier attempts.
        accel_s = sum(float(s.stats.get("accel_s", 0.0)) for s in shards)
        single_s = sum(float(s.stats.get("single_s", 0.0)) for s in shards)
        decode_s = sum(float(s.stats.get("decode_s", 0.0)) for s in shards)
        savings = compute_savings(
            images=ok,
            tasks=len(card.tasks),
            device="cuda" if plan.get("num_gpus") else "cpu",
            multi_s=accel_s,
            single_s=single_s,
            decode_s=decode_s,
            price_per_hour=cfg.price_per_hour,
            method=("baseline-artifacts" if cfg.baseline else "calibrated") if cfg.calibrate else "none",
        )
        wall_s = time.perf_counter() - t_start
        manifest = {
            "run_id": run_id,
            "run_date": state["run_date"],
            "started_at": state["started_at"],
            "finished_at": datetime.now(UTC).isoformat(timespec="milliseconds"),  # orders same-second runs
            # absolute for local models, so `similar --image` works from any folder
            "model": redact(os.path.abspath(cfg.model) if is_local(cfg.model) else cfg.model),
            "model_version": card.version,
            "source": redact(cfg.source),
            "schema_version": OUTPUT_SCHEMA_VERSION,
            "tasks": [t["name"] for t in card.tasks],
            "incremental": not cfg.full,
            "counts": {
                "listed": listing.table.num_rows,
                "to_tag": total + len(work.resumed_uris),
                "unchanged": work.unchanged + writer.totals["unchanged"],
                "rows": ok + err,
                "ok": ok,
                "error": err,
                "skipped_non_image": listing.skipped_non_image,
                "duplicate_uris": listing.duplicates,
                "retried_duplicates_dropped": writer.totals["duplicates"],
                "resumed": len(work.resumed_uris),
                "committed_meanwhile_dropped": dropped,
            },
            "timings": {
                "wall_s": round(wall_s, 3),
                "list_s": round(list_s, 3),
                "pipeline_s": round(pipeline_s, 3),
                "accel_s": accel_s,
                "decode_cpu_s": decode_s,
                "images_per_s": round(writer.totals["ok"] / pipeline_s, 2) if pipeline_s > 0 else None,
            },
            "resources": {k: v for k, v in plan.items()},
            "savings": savings.to_dict(),
            "notes": notes,
        }
        committed = ledger.commit(layout, run_id, state["run_date"], shards, manifest, heartbeat=lock.refresh)
    return RunResult(
        run_id=run_id,
        listed=listing.table.num_rows,
        processed=ok + err,
        ok=ok,
        error=err,
        unchanged=manifest["counts"]["unchanged"],
        wall_s=time.perf_counter() - t_start,
        manifest=committed,
        output=cfg.output,
        notes=notes,
        resumed=len(work.resumed_uris),
    )


def _run_state(layout: Layout, run_id: str, model_version: str, cfg: TagJobConfig) -> dict[str, Any]:
    """This run's ``_run.json`` (created on its first attempt, read back when resuming)."""
    state_uri = ledger.join(layout.staging(run_id), "_run.json")
    state = ledger.read_json(state_uri, cfg.storage_options)
    if state is not None and state.get("model_version") != model_version:
        raise UserError(
            f"run {run_id} was started with model {state.get('model_version')}, not {model_version}: use a new run id"
        )
    if state is None:
        now = datetime.now(UTC)
        state = {
            "run_id": run_id,
            "run_date": now.strftime("%Y-%m-%d"),
            "started_at": now.isoformat(timespec="seconds"),
            "model_version": model_version,
            "source": redact(cfg.source),
            # Runs committed before this one planned its work: any other run that commits before us may have
            # tagged the same images concurrently, and is checked under the commit lock.
            "known_runs": ledger.committed_run_ids(layout),
        }
        with _output_errors(run_id, cfg.output):
            ledger.write_json(state_uri, state, cfg.storage_options)
    return state


def _drop_committed_meanwhile(
    layout: Layout, run_id: str, state: dict[str, Any], model_version: str, shards: list[ledger.Shard]
) -> tuple[list[ledger.Shard], int, list[str]]:
    """Unstage rows whose image another run committed (same model, same bytes) after this run planned.

    Two runs started at once plan the same new images; the second to take the commit lock drops them here, so
    each image is committed once. Shards are rewritten in place (parquet, then stats): idempotent on a rerun.
    """
    other, meanwhile = incremental.committed_meanwhile(
        layout,
        model_version=model_version,
        run_id=run_id,
        known_runs=state.get("known_runs"),
        started_at=state["started_at"],
    )
    if other is None:
        return shards, 0, meanwhile
    kept: list[ledger.Shard] = []
    dropped = 0
    for shard in sorted(shards, key=lambda s: s.index):
        table = ledger.read_shard(layout, shard)
        dup = incremental.already_committed(table, other)
        n_dup = int(pc.sum(dup).as_py() or 0)
        dropped += n_dup
        if n_dup == table.num_rows:
            ledger.remove_shard(layout, run_id, shard)
            continue
        if n_dup or int(shard.stats.get("rows", -1)) != table.num_rows:
            table = table.filter(pc.invert(dup))
            timing = {k: shard.stats[k] for k in ("accel_s", "single_s", "decode_s") if k in shard.stats}
            shard = ledger.write_shard(layout, run_id, shard.index, table, {**_table_stats(table), **timing})
        kept.append(shard)
    if dropped:
        log.warning("run %s: %d image(s) were committed meanwhile by %s; dropped", run_id, dropped, meanwhile)
    return kept, dropped, meanwhile


def _result_from_manifest(m: dict[str, Any], output: str, wall_s: float) -> RunResult:
    c = m.get("counts", {})
    return RunResult(
        run_id=m["run_id"],
        listed=c.get("listed", 0),
        processed=c.get("rows", 0),
        ok=c.get("ok", 0),
        error=c.get("error", 0),
        unchanged=c.get("unchanged", 0),
        wall_s=wall_s,
        manifest=m,
        output=output,
        notes=["already committed"],
    )
