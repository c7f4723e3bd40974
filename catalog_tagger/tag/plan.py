"""What a run must tag: the listing minus the images already committed (the nightly diff) minus resumed ones.

The run's state (``_staging/<run_id>/_run.json``) is written on its first attempt and read back when it resumes:
its run date and start (every row carries them), its model version, and ``known_version``, the history table's
version when it first planned. Runs committed after that version may have tagged the same images concurrently:
``dedup.py`` checks them under the commit lock. The diff itself is ``diff.py`` (out of core).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from catalog_tagger.errors import UserError
from catalog_tagger.storage import redact, strip
from catalog_tagger.tag import commit, diff, latest, writer
from catalog_tagger.tag.commit import RUN_STATE, Layout
from catalog_tagger.tag.config import TagJobConfig
from catalog_tagger.tag.diff import Work
from catalog_tagger.tag.sources import Listing, list_source, refuse_outside_root
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
    list_s: float  # seconds spent listing the source

    @property
    def tagged_at(self) -> datetime:
        """Every row of the run carries its first attempt's start."""
        return datetime.fromisoformat(self.state["started_at"])

    @property
    def listed(self) -> int:
        return int(self.listing.table.num_rows)


def plan_run(cfg: TagJobConfig, layout: Layout, run_id: str, model_version: str, known_version: int) -> RunPlan:
    """List the source (refusing uris outside the allowed root before anything is written), record the run's
    state, and diff the listing against the committed state and this run's written files."""
    t0 = time.perf_counter()
    listing = list_source(cfg.source, cfg.storage_options, limit=cfg.limit)
    list_s = time.perf_counter() - t0
    if cfg.allowed_root is not None:
        refuse_outside_root(listing, cfg.source, cfg.allowed_root)
    state = run_state(layout, run_id, model_version, cfg, known_version)
    done = writer.staged_files(cfg.output, run_id, cfg.storage_options)
    committed = None if cfg.full else latest.state(cfg.output, cfg.storage_options)
    with commit.output_errors(run_id, cfg.output):
        work = diff.build_work(
            listing.table.to_batches(),
            committed,
            _dataset(layout, done),
            model_version=model_version,
            staging=layout.staging(run_id),
            storage_options=cfg.storage_options,
        )
    notes = list(listing.notes)
    if done:
        notes.append(f"resumed: {work.resumed} image(s) already written by an earlier attempt")
    if work.unchanged:
        notes.append(f"incremental: {work.unchanged} image(s) unchanged since the last committed run of this model")
    resumed = f", {work.resumed} already written (resumed)" if work.resumed else ""
    log.info("run %s: %d listed, %d to tag%s", run_id, listing.table.num_rows, work.rows, resumed)
    return RunPlan(layout, run_id, listing, work, state, done, notes, list_s)


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
