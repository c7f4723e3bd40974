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
from typing import Any

from catalog_tagger.accounting import compute_savings
from catalog_tagger.model.artifact import ModelCard, load_card
from catalog_tagger.schema import OUTPUT_SCHEMA_VERSION, RunCounts, RunManifest, RunTimings
from catalog_tagger.storage import is_local, redact
from catalog_tagger.tag import commit, lock
from catalog_tagger.tag.checks import validate
from catalog_tagger.tag.commit import Layout, Shard
from catalog_tagger.tag.config import TagJobConfig
from catalog_tagger.tag.executors import ProgressFn, Stages, execute
from catalog_tagger.tag.plan import RunPlan, drop_committed_meanwhile, plan_run
from catalog_tagger.tag.sink import Sink

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
    _clear_leftovers(layout)
    earlier = _committed_earlier(layout, run_id, cfg.output)
    if earlier is not None:
        wall_s = time.perf_counter() - t_start
        return RunResult.from_manifest(earlier, output=cfg.output, wall_s=wall_s, notes=[ALREADY_COMMITTED])

    planned = plan_run(cfg, layout, run_id, card.version)
    resumed = set(planned.work.resumed_uris)
    sink = Sink(layout, run_id, cfg.rows_per_shard, cfg.shard_seconds, seen=resumed, index=planned.next_index)
    t_pipe = time.perf_counter()
    stages = Stages(cfg, run_id, planned.tagged_at, card.image_size, credentials=planned.listing.credentials)
    resources = execute(stages, planned.work.table, sink, progress)
    attempt = _Attempt(t_start, time.perf_counter() - t_pipe, sink, resources)
    return _commit(cfg, card, planned, attempt)


def _clear_leftovers(layout: Layout) -> None:
    """What runs stopped after their manifest left behind: their staging folders and a dead commit lock."""
    commit.clear_committed_staging(layout)
    lock.clear_stale_lock(layout)


def _committed_earlier(layout: Layout, run_id: str, output: str) -> dict[str, Any] | None:
    """The manifest of ``run_id`` if an earlier attempt committed it, finishing an interrupted commit first."""
    existing = commit.read_json(layout.manifest(run_id), layout.storage_options)
    if existing is not None:
        log.info("run %s is already committed; nothing to do", run_id)
        return existing
    if not commit.pending_commit(layout, run_id):
        return None
    log.info("run %s: finishing an interrupted commit", run_id)
    with commit.output_errors(run_id, output), lock.commit_lock(layout, run_id) as held:
        manifest = commit.read_json(layout.manifest(run_id), layout.storage_options)
        if manifest is None:
            manifest = commit.finish_commit(layout, run_id, heartbeat=held.refresh)
    commit.clear_committed_staging(layout, [run_id])
    return manifest


@dataclass(frozen=True)
class _Attempt:
    """What this attempt's pipeline did."""

    start: float  # perf_counter at the start of run()
    pipeline_s: float  # read + decode + predict + stage
    sink: Sink
    resources: dict[str, Any]  # the executor's plan

    def wall_s(self) -> float:
        return time.perf_counter() - self.start


def _commit(cfg: TagJobConfig, card: ModelCard, planned: RunPlan, attempt: _Attempt) -> RunResult:
    """Under the output's commit lock: drop what concurrent runs committed meanwhile, then publish the rest."""
    layout, run_id = planned.layout, planned.run_id
    shards = planned.done + attempt.sink.shards
    if not shards:
        listed = planned.listing.table.num_rows
        msg = "nothing to do: no new or changed images" if listed else "nothing to do: the source has no images"
        return _nothing(cfg, planned, attempt, msg)
    with commit.output_errors(run_id, cfg.output), lock.commit_lock(layout, run_id) as held:
        # Under the lock: another process may have committed this very run id, or other runs the same images.
        already = commit.read_json(layout.manifest(run_id), cfg.storage_options)
        if already is not None:
            log.warning("run %s was committed by another process meanwhile; not committing it twice", run_id)
            wall_s = attempt.wall_s()
            return RunResult.from_manifest(already, output=cfg.output, wall_s=wall_s, notes=[ALREADY_COMMITTED])
        shards, dropped, meanwhile = drop_committed_meanwhile(layout, run_id, planned.state, card.version, shards)
        if meanwhile and dropped:
            planned.notes.append(
                f"concurrent runs: {dropped} image(s) were committed meanwhile by run(s) {', '.join(meanwhile)} "
                "with the same model and bytes; not committed twice"
            )
        if not shards:
            msg = f"nothing to commit: every tagged image was committed meanwhile by {', '.join(meanwhile)}"
            return _nothing(cfg, planned, attempt, msg)
        manifest = _manifest(cfg, card, planned, attempt, shards, dropped)
        committed = commit.commit(layout, run_id, shards, manifest, heartbeat=held.refresh)
    commit.clear_committed_staging(layout, [run_id])
    return RunResult.from_manifest(committed, output=cfg.output, wall_s=attempt.wall_s())


def _nothing(cfg: TagJobConfig, planned: RunPlan, attempt: _Attempt, msg: str) -> RunResult:
    """Nothing to commit: clear the run's staging and say why."""
    commit.clear_staging(planned.layout, planned.run_id)
    log.info("run %s: %s", planned.run_id, msg)
    return RunResult(
        run_id=planned.run_id,
        listed=planned.listing.table.num_rows,
        processed=0,
        ok=0,
        error=0,
        unchanged=planned.work.unchanged + attempt.sink.totals.unchanged,
        wall_s=attempt.wall_s(),
        manifest=None,
        output=cfg.output,
        notes=[*planned.notes, msg],
        resumed=len(planned.work.resumed_uris),
    )


def _count(shards: list[Shard], key: str) -> int:
    """A count summed over shard stats (the stats: a resumed run counts its earlier attempts' shards too)."""
    return sum(int(s.stats.get(key, 0)) for s in shards)


def _seconds(shards: list[Shard], key: str) -> float:
    """Seconds summed over shard stats (the stats: a resumed run counts its earlier attempts' shards too)."""
    return sum(float(s.stats.get(key, 0.0)) for s in shards)


def _manifest(
    cfg: TagJobConfig, card: ModelCard, planned: RunPlan, attempt: _Attempt, shards: list[Shard], dropped: int
) -> RunManifest:
    """The manifest of what is about to be committed (the commit adds its files)."""
    ok, err = _count(shards, "ok"), _count(shards, "error")
    accel_s, decode_s = _seconds(shards, "accel_s"), _seconds(shards, "decode_s")
    savings = compute_savings(
        images=ok,
        tasks=len(card.tasks),
        device="cuda" if attempt.resources.get("num_gpus") else "cpu",
        multi_s=accel_s,
        single_s=_seconds(shards, "single_s"),
        decode_s=decode_s,
        price_per_hour=cfg.price_per_hour,
        method=("baseline-artifacts" if cfg.baseline else "calibrated") if cfg.calibrate else "none",
    )
    work, listing, totals = planned.work, planned.listing, attempt.sink.totals
    counts = RunCounts(
        listed=listing.table.num_rows,
        to_tag=work.table.num_rows + len(work.resumed_uris),
        unchanged=work.unchanged + totals.unchanged,
        rows=ok + err,
        ok=ok,
        error=err,
        skipped_non_image=listing.skipped_non_image,
        duplicate_uris=listing.duplicates,
        skipped_by_reason=dict(listing.skipped),
        retried_duplicates_dropped=totals.duplicates,
        resumed=len(work.resumed_uris),
        committed_meanwhile_dropped=dropped,
    )
    pipeline_s = attempt.pipeline_s
    timings = RunTimings(
        wall_s=round(attempt.wall_s(), 3),
        list_s=round(planned.list_s, 3),
        pipeline_s=round(pipeline_s, 3),
        accel_s=accel_s,
        decode_cpu_s=decode_s,
        images_per_s=round(totals.ok / pipeline_s, 2) if pipeline_s > 0 else None,
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
        resources=dict(attempt.resources),
        savings=savings.to_dict(),
        notes=planned.notes,
    )
