"""The tagging job, top to bottom: validate -> plan (list + diff) -> execute (decode + predict) -> sink -> commit.

``run`` is the one entry point (the CLI, the flows and the benchmarks call it); each stage lives in its own
module (``checks``, ``plan``, ``executors``, ``reader``, ``predictor``, ``sink``, ``commit``, ``lock``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from catalog_tagger.accounting import Pricing, Usage, compute_savings
from catalog_tagger.model.artifact import ModelCard, load_card
from catalog_tagger.schema import OUTPUT_SCHEMA_VERSION, RunCounts, RunManifest, RunTimings, output_schema
from catalog_tagger.storage import is_local, is_storage_error, redact
from catalog_tagger.tag import calibrate, commit, delta, health, latest, lock, migrate, writer
from catalog_tagger.tag.checks import validate
from catalog_tagger.tag.commit import Layout
from catalog_tagger.tag.config import TagJobConfig
from catalog_tagger.tag.dedup import Dropped, drop_duplicates
from catalog_tagger.tag.executors import ProgressFn, Stages, execute
from catalog_tagger.tag.plan import RunPlan, plan_run
from catalog_tagger.tag.resources import local_resources
from catalog_tagger.tag.sink import Totals
from catalog_tagger.tag.writer import PartWriter, StagedFile

if TYPE_CHECKING:
    import pyarrow as pa
    from deltalake import DeltaTable

__all__ = ["ProgressFn", "RunResult", "TagJobConfig", "new_run_id", "run", "validate"]

log = logging.getLogger(__name__)

ALREADY_COMMITTED = "already committed"


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
        """The committed run's throughput as its manifest records it (images tagged by this attempt / pipeline
        time: resumed images are not counted twice); without a manifest, rows / wall time."""
        recorded = ((self.manifest or {}).get("timings") or {}).get("images_per_s")
        if recorded is not None:
            return float(recorded)
        return self.processed / self.wall_s if self.wall_s > 0 else 0.0

    @classmethod
    def from_manifest(
        cls, manifest: dict[str, Any], *, output: str, wall_s: float, notes: list[str] | None = None
    ) -> RunResult:
        """The result of a committed run, read from its manifest; ``notes`` default to the manifest's."""
        c = manifest.get("counts", {})
        return cls(
            run_id=manifest["run_id"],
            listed=int(c.get("listed", 0)),
            processed=int(c.get("rows", 0)),
            ok=int(c.get("ok", 0)),
            error=int(c.get("error", 0)),
            unchanged=int(c.get("unchanged", 0)),
            wall_s=wall_s,
            manifest=manifest,
            output=output,
            notes=list(manifest.get("notes", [])) if notes is None else notes,
            resumed=int(c.get("resumed", 0)),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """The inverse of ``dataclasses.asdict`` (keys that are not fields, such as a flow's extras, are dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def new_run_id(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run(cfg: TagJobConfig, *, progress: ProgressFn | None = None) -> RunResult:
    """Tag a catalog and commit the run. Safe to rerun with the same ``run_id`` after a crash (resumes)."""
    t_start = time.perf_counter()
    validate(cfg)
    card = load_card(cfg.model)
    layout = Layout(cfg.output, cfg.storage_options)
    run_id = cfg.run_id or new_run_id()
    migrate.refuse_old_layout(cfg.output, cfg.storage_options)
    _clear_leftovers(layout)
    with commit.output_errors(run_id, cfg.output):
        known = layout.history()  # None before the first run: nothing is created until the plan refused nothing
        if known is not None:
            _schema(cfg, card, known)  # another task set is refused before any work
            latest.catch_up(cfg.output, cfg.storage_options)  # merge what a crash left out (the diff reads latest)
            earlier = delta.find_run(known, run_id)
            if earlier is not None:
                log.info("run %s is already committed; nothing to do", run_id)
                return _already(earlier.manifest, cfg, t_start)
    planned = plan_run(cfg, layout, run_id, card.version, -1 if known is None else known.version())
    with commit.output_errors(run_id, cfg.output):
        schema = _schema(cfg, card, _history(cfg, card, layout))
    # the table's schema has no Parquet metadata: the data files carry the model's (schema version, tasks)
    model_meta = output_schema(card.task_config(), card.embedding_dim).metadata
    file_schema = delta.file_schema(schema).with_metadata(model_meta)
    part_writer = PartWriter(cfg.output, run_id, planned.state["run_date"], cfg.storage_options, file_schema)
    t_pipe = time.perf_counter()
    stages = Stages(cfg, run_id, planned.tagged_at, card.image_size, card.version, planned.listing.credentials)
    with commit.output_errors(run_id, cfg.output):
        resources, totals = execute(stages, planned.work, part_writer, progress)
    attempt = _Attempt(t_start, time.perf_counter() - t_pipe, totals, resources)
    return _commit(cfg, card, planned, attempt, part_writer, schema)


def _calibration(cfg: TagJobConfig, card: ModelCard, resources: dict[str, Any]) -> calibrate.RunCalibration | None:
    """The calibration this run's savings use (stored, or measured now on the Predictors' kind of device)."""
    if not cfg.calibrate:
        return None
    plan = resources or local_resources(cfg)  # nothing tagged by this attempt: the earlier attempts' device
    baselines = tuple(load_card(u).version for u in cfg.baseline)
    return calibrate.ensure(cfg, calibrate.run_key(cfg, card.version, plan, baselines), plan)


def _already(manifest: dict[str, Any], cfg: TagJobConfig, t_start: float) -> RunResult:
    """The result of a run id that is committed already: nothing done, nothing committed twice."""
    wall_s = time.perf_counter() - t_start
    return RunResult.from_manifest(manifest, output=cfg.output, wall_s=wall_s, notes=[ALREADY_COMMITTED])


def _history(cfg: TagJobConfig, card: ModelCard, layout: Layout) -> DeltaTable:
    """The history table, created on the first run (after checking that the store can commit safely)."""
    table = layout.history()
    if table is not None:
        return table
    delta.require_conditional_put(cfg.output, cfg.storage_options)
    want = delta.predictions_schema(card.task_config(), card.embedding_dim)
    return delta.ensure_table(layout.table_uri(), want, layout.delta_options(), partition_by=[delta.PARTITION])


def _schema(cfg: TagJobConfig, card: ModelCard, table: DeltaTable) -> pa.Schema:
    """The schema this run commits with: a model whose tasks differ from the table's is refused unless
    ``allow_task_change`` (``delta.refuse_task_change``)."""
    want = delta.predictions_schema(card.task_config(), card.embedding_dim)
    return delta.refuse_task_change(table, want, allow=cfg.allow_task_change, what=f"output {redact(cfg.output)}")


def _clear_leftovers(layout: Layout) -> None:
    """What runs stopped after their commit left behind: their staging folders and a dead commit lock."""
    commit.clear_committed_staging(layout)
    lock.clear_stale_lock(layout)


@dataclass(frozen=True)
class _Attempt:
    """What this attempt's pipeline did."""

    start: float  # perf_counter at the start of run()
    pipeline_s: float  # read + decode + predict + write
    totals: Totals
    resources: dict[str, Any]  # the executor's plan

    def wall_s(self) -> float:
        return time.perf_counter() - self.start


def _commit(
    cfg: TagJobConfig, card: ModelCard, planned: RunPlan, attempt: _Attempt, part_writer: PartWriter, schema: pa.Schema
) -> RunResult:
    """Under the output's commit lock: drop what was committed meanwhile or written twice, then ONE Delta commit."""
    layout, run_id = planned.layout, planned.run_id
    if not writer.staged_files(cfg.output, run_id, cfg.storage_options):
        msg = "nothing to do: no new or changed images" if planned.listed else "nothing to do: the source has no images"
        return _nothing(cfg, planned, attempt, msg)
    with commit.output_errors(run_id, cfg.output):
        cal = _calibration(cfg, card, attempt.resources)  # before the lock: measuring may take seconds
    with commit.output_errors(run_id, cfg.output), lock.commit_lock(layout, run_id) as held:
        # Read the sidecars again under the lock: `maintain` may have unstaged an abandoned run's files.
        files = writer.staged_files(cfg.output, run_id, cfg.storage_options)
        table = layout.history()
        assert table is not None  # created before planning
        # Under the lock: another process may have committed this very run id, or other runs the same images.
        already = delta.find_run(table, run_id)
        if already is not None:
            log.warning("run %s was committed by another process meanwhile; not committing it twice", run_id)
            wall_s = attempt.wall_s()
            return RunResult.from_manifest(
                already.manifest, output=cfg.output, wall_s=wall_s, notes=[ALREADY_COMMITTED]
            )
        dropped = drop_duplicates(
            part_writer, table, files, known_version=int(planned.state["known_version"]), model_version=card.version
        )
        held.refresh()
        if dropped.meanwhile:
            planned.notes.append(
                f"concurrent runs: {dropped.meanwhile} image(s) were committed meanwhile by run(s) "
                f"{', '.join(dropped.runs)} with the same model and bytes; not committed twice"
            )
        if not dropped.files:
            msg = f"nothing to commit: every tagged image was committed meanwhile by {', '.join(dropped.runs)}"
            return _nothing(cfg, planned, attempt, msg)
        manifest = _manifest(cfg, card, planned, attempt, dropped, cal)
        health.assess(manifest, cfg, table=table, files=dropped.files, tasks=card.task_config())
        committed = commit.commit(layout, table, dropped.files, manifest, schema)
    _after_commit(cfg, layout, run_id)
    # the manifest's wall time, so that the console, the report and the artifacts show one figure
    return RunResult.from_manifest(committed, output=cfg.output, wall_s=float(committed["timings"]["wall_s"]))


def _after_commit(cfg: TagJobConfig, layout: Layout, run_id: str) -> None:
    """Derived state: ``latest`` gains the run, the staging folder goes. Both are caught up later if this fails."""
    try:
        latest.catch_up(cfg.output, cfg.storage_options)
    except Exception as err:
        if not is_storage_error(err):
            raise
        log.warning(
            "run %s is committed; updating latest failed (the next run or maintain catches up): %s", run_id, err
        )
    commit.clear_committed_staging(layout, [run_id])


def _nothing(cfg: TagJobConfig, planned: RunPlan, attempt: _Attempt, msg: str) -> RunResult:
    """Nothing to commit: clear the run's staging and say why."""
    commit.clear_staging(planned.layout, planned.run_id)
    log.info("run %s: %s", planned.run_id, msg)
    return RunResult(
        run_id=planned.run_id,
        listed=planned.listed,
        processed=0,
        ok=0,
        error=0,
        unchanged=planned.work.unchanged + attempt.totals.unchanged,
        wall_s=attempt.wall_s(),
        manifest=None,
        output=cfg.output,
        notes=[*planned.notes, msg],
        resumed=planned.work.resumed,
    )


def _savings(
    cfg: TagJobConfig,
    card: ModelCard,
    attempt: _Attempt,
    planned: RunPlan,
    files: list[StagedFile],
    cal: calibrate.RunCalibration | None,
) -> dict[str, Any]:
    """The run's savings: busy seconds from every attempt's files, allocated time from this attempt's pipeline."""
    res = attempt.resources
    gpu = bool(res.get("num_gpus"))
    devices = int(res.get("actors") or 1)
    notes = []
    allocated = None  # this attempt ran no pipeline (all resumed): what earlier attempts held is not known
    if res and attempt.totals.done:
        allocated = devices * attempt.pipeline_s
    if planned.work.resumed:
        notes.append("resumed run: allocated time counts this attempt's predict stage only")
    usage = Usage(
        images=sum(f.ok for f in files),
        tasks=len(card.tasks),
        device="cuda" if gpu else "cpu",
        devices=devices,
        cores_per_device=1 if gpu else int(res.get("threads") or 1),
        busy_s=sum(f.accel_s for f in files),
        allocated_s=allocated,
        decode_cpu_s=sum(f.decode_s for f in files),
    )
    savings = compute_savings(
        usage,
        None if cal is None else cal.calibration,
        Pricing(cfg.price_per_hour, cfg.price_per_cpu_hour),
        notes=notes,
    )
    savings["calibration"] = None if cal is None else cal.record()
    return savings


def _manifest(
    cfg: TagJobConfig,
    card: ModelCard,
    planned: RunPlan,
    attempt: _Attempt,
    dropped: Dropped,
    cal: calibrate.RunCalibration | None,
) -> RunManifest:
    """The manifest of what is about to be committed (counts and seconds from every attempt's files)."""
    files = dropped.files
    ok, err = sum(f.ok for f in files), sum(f.error for f in files)
    resources = dict(attempt.resources)
    ray_init_s, first_batch_s = resources.pop("ray_init_s", None), resources.pop("first_batch_s", None)
    work, listing, totals = planned.work, planned.listing, attempt.totals
    counts = RunCounts(
        listed=planned.listed,
        to_tag=work.rows + work.resumed,
        unchanged=work.unchanged + totals.unchanged,
        rows=ok + err,
        ok=ok,
        error=err,
        skipped_non_image=listing.skipped_non_image,
        duplicate_uris=listing.duplicates,
        skipped_by_reason=dict(listing.skipped),
        retried_duplicates_dropped=totals.duplicates + dropped.repeats,
        resumed=work.resumed,
        committed_meanwhile_dropped=dropped.meanwhile,
    )
    pipeline_s = attempt.pipeline_s
    timings = RunTimings(
        wall_s=round(attempt.wall_s(), 3),
        list_s=round(planned.list_s, 3),
        pipeline_s=round(pipeline_s, 3),
        accel_s=sum(f.accel_s for f in files),
        decode_cpu_s=sum(f.decode_s for f in files),
        images_per_s=round(totals.ok / pipeline_s, 2) if pipeline_s > 0 and totals.ok else None,
        ray_init_s=ray_init_s,
        calibration_s=None if cal is None else round(cal.seconds, 3),
        first_batch_s=first_batch_s,
    )
    return RunManifest(
        run_id=planned.run_id,
        run_date=planned.state["run_date"],
        started_at=planned.state["started_at"],
        finished_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        # absolute for local models, so `similar --image` works from any folder
        model=redact(os.path.abspath(cfg.model) if is_local(cfg.model) else cfg.model),
        model_version=card.version,
        source=redact(cfg.source),
        schema_version=OUTPUT_SCHEMA_VERSION,
        incremental=not cfg.full,
        tasks=[t["name"] for t in card.tasks],
        counts=counts,
        timings=timings,
        resources={**resources, "write_nodes": sorted({f.node for f in files})},
        savings=_savings(cfg, card, attempt, planned, files, cal),
        notes=planned.notes,
        files=len(files),
        bytes=sum(f.bytes for f in files),
    )
