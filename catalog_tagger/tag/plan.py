"""What a run must tag: the listing minus the images already committed (the nightly diff) minus resumed ones.

The run's state (``_staging/<run_id>/_run.json``) is written on its first attempt and read back when it resumes:
its run date and start (every row carries them), its model version, and ``known_version``, the history table's
version when it first planned. Runs committed after that version may have tagged the same images concurrently:
``dedup.py`` checks them under the commit lock. The diff itself is ``diff.py`` (out of core): the listing streams
into it and nothing is written before the whole listing has passed (a uri outside the allowed root refuses the run
first). ``preview`` is the same plan without the run (``tag --plan-only``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from catalog_tagger.errors import UserError
from catalog_tagger.storage import redact, strip
from catalog_tagger.tag import commit, latest, migrate, writer
from catalog_tagger.tag.commit import RUN_STATE, Layout
from catalog_tagger.tag.config import TagJobConfig
from catalog_tagger.tag.diff import Diff, Work
from catalog_tagger.tag.sources import Listing, inside_root, list_source
from catalog_tagger.tag.writer import StagedFile

if TYPE_CHECKING:
    import pyarrow.dataset as pads

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    """One attempt of a run: what was listed, what is left to tag, and what earlier attempts wrote."""

    layout: Layout
    run_id: str
    listing: Listing
    work: Work
    state: dict[str, Any]  # the run's ``_run.json``: run_date, started_at, model_version, known_version
    done: list[StagedFile]  # files written by earlier attempts (resumed)
    notes: list[str]
    list_s: float  # seconds spent listing the source (streamed into the diff, made unique)

    @property
    def tagged_at(self) -> datetime:
        """Every row of the run carries its first attempt's start."""
        return datetime.fromisoformat(self.state["started_at"])

    @property
    def listed(self) -> int:
        return self.listing.listed


@dataclass(frozen=True)
class PlanPreview:
    """What a run would do (``tag --plan-only``): nothing is written to the output."""

    listed: int
    new: int  # no committed row of this model version
    changed: int  # a committed row of another identity (or one only the bytes' hash can tell)
    unchanged: int
    resumed: int  # already written by an earlier attempt of the given run id
    notes: list[str]
    list_s: float


def _listed(diff: Diff, cfg: TagJobConfig) -> Listing:
    """Stream the source into ``diff`` (refusing the whole run, before anything is written, when a uri lies
    outside the allowed root) and make it unique there."""
    listing = list_source(cfg.source, cfg.storage_options)
    batches = listing.batches
    if cfg.allowed_root is not None:
        batches = inside_root(batches, cfg.source, cfg.allowed_root)
    for batch in batches:
        diff.add(batch)
    listing.settle(*diff.settle(cfg.limit))
    notes = "; " + "; ".join(listing.notes) if listing.notes else ""
    log.info("source %s: %d image(s)%s", redact(cfg.source), listing.listed, notes)
    return listing


def plan_run(cfg: TagJobConfig, layout: Layout, run_id: str, model_version: str, known_version: int) -> RunPlan:
    """List the source (refusing uris outside the allowed root before anything is written), record the run's
    state, and diff the listing against the committed state and this run's written files."""
    t0 = time.perf_counter()
    with Diff() as d:
        listing = _listed(d, cfg)
        list_s = time.perf_counter() - t0
        state = run_state(layout, run_id, model_version, cfg, known_version)
        done = writer.staged_files(cfg.output, run_id, cfg.storage_options)
        committed = None if cfg.full else latest.state(cfg.output, cfg.storage_options)
        with commit.output_errors(run_id, cfg.output):
            d.join(committed, _dataset(layout, done), model_version=model_version)
            work = d.write(layout.staging(run_id), cfg.storage_options)
    notes = list(listing.notes)
    if done:
        notes.append(f"resumed: {work.resumed} image(s) already written by an earlier attempt")
    if work.unchanged:
        notes.append(f"incremental: {work.unchanged} image(s) unchanged since the last committed run of this model")
    resumed = f", {work.resumed} already written (resumed)" if work.resumed else ""
    log.info("run %s: %d listed, %d to tag%s", run_id, listing.listed, work.rows, resumed)
    return RunPlan(layout, run_id, listing, work, state, done, notes, list_s)


def preview(cfg: TagJobConfig) -> PlanPreview:
    """The plan of a run without the run: list the source and diff it against the committed state in a private
    temporary folder; nothing is written to the output (no staging, no lock, no table). The committed state is
    ``latest`` as it is: a run whose merge a crash left out is caught up by the next real run."""
    from catalog_tagger.model.artifact import load_card

    t0 = time.perf_counter()
    try:
        version = load_card(cfg.model).version
    except FileNotFoundError:
        raise UserError(f"model {redact(cfg.model)!r} not found") from None
    migrate.refuse_old_layout(cfg.output, cfg.storage_options)
    layout = Layout(cfg.output, cfg.storage_options)
    done = writer.staged_files(cfg.output, cfg.run_id, cfg.storage_options) if cfg.run_id else []
    with Diff() as d:
        listing = _listed(d, cfg)
        committed = None if cfg.full else latest.state(cfg.output, cfg.storage_options)
        c = d.join(committed, _dataset(layout, done), model_version=version)
    return PlanPreview(
        listing.listed, c.new, c.changed, c.unchanged, c.resumed, listing.notes, time.perf_counter() - t0
    )


def _dataset(layout: Layout, files: list[StagedFile]) -> pads.Dataset | None:
    """This run's written data files as one dataset (None when there are none)."""
    import pyarrow.dataset as pads

    if not files:
        return None
    paths = [strip(writer.data_uri(layout.output, f.path)) for f in files]
    return pads.dataset(paths, format="parquet", filesystem=layout.fs())


def run_state(layout: Layout, run_id: str, model_version: str, cfg: TagJobConfig, known_version: int) -> dict[str, Any]:
    """This run's ``_run.json`` (created on its first attempt, read back when resuming)."""
    state_uri = layout.staged(run_id, RUN_STATE)
    state = commit.read_json(state_uri, cfg.storage_options)
    if state is not None and state.get("model_version") != model_version:
        raise UserError(
            f"run {run_id} was started with model {state.get('model_version')}, not {model_version}: use a new run id"
        )
    if state is not None and "known_version" not in state:
        raise UserError(
            f"run {run_id} was staged by an older catalog-tagger (output layout v1): start a new run id; "
            f"`catalog-tagger maintain --output {redact(cfg.output)}` removes its leftovers"
        )
    if state is None:
        now = datetime.now(UTC)
        state = {
            "run_id": run_id,
            "run_date": now.strftime("%Y-%m-%d"),
            "started_at": now.isoformat(timespec="seconds"),
            "model_version": model_version,
            "source": redact(cfg.source),
            # The history's version when this run planned its work: a run committed after it may have tagged
            # the same images concurrently, and is checked under the commit lock (dedup.py).
            "known_version": known_version,
        }
        with commit.output_errors(run_id, cfg.output):
            commit.write_json(state_uri, state, cfg.storage_options)
    return state
