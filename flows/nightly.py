"""Nightly tagging and backfill: thin Prefect flows around the library's tagging job.

A flow run validates its parameters (``NightlyParams``) before any task runs, derives the tagging run id from the
flow run (so a retry of the same flow run, task-level or from the UI, resumes the staged shards of the same run),
tags on the Ray path its ``ray_address`` selects (``catalog_tagger.tag.cluster``), writes the HTML report,
publishes the savings as Prefect artifacts (``flows.artifacts``), then maintains the output (``maintain``) and
refreshes its ANN index when it has one (``ann.refresh``): a failure there is logged, never failing the night.
A run over its error budget has committed its rows and published its artifacts, then the flow ends Failed with a
message naming the count; it emits ``catalog-tagger.run.over-error-budget`` then, and ``catalog-tagger.run.drift``
when the run's health lists drift. Results are never persisted: no pickles anywhere.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.client.schemas.objects import State
from prefect.events import emit_event
from prefect.states import Failed

from catalog_tagger.storage import redact
from catalog_tagger.tag import cluster
from catalog_tagger.tag import job as tag_job
from catalog_tagger.tag.health import over_budget
from catalog_tagger.tag.job import RunResult, TagJobConfig
from flows.artifacts import output_slug, publish_run
from flows.params import NightlyParams
from flows.runtime import TRANSIENT_RETRY, flow_run_namer, run_id_for_flow_run, scheduled_date

_WHERE = {"local": "embedded local Ray", "connect": "cluster {address}", "jobs": "Ray Jobs API"}


@task(name="check-inputs", **TRANSIENT_RETRY)
def check_inputs(cfg: TagJobConfig) -> None:
    """Refuse a bad model or an unwritable output before any tagging starts (``UserError``: no retry)."""
    tag_job.validate(cfg)


@task(name="tag-catalog", **TRANSIENT_RETRY)
def tag_catalog(cfg: TagJobConfig) -> dict[str, Any]:
    """Run the tagging job (resumes the staged shards of ``cfg.run_id`` on a retry) and return its result."""
    logger = get_run_logger()
    last = [time.monotonic()]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] >= 15 or done == total:
            logger.info("tagged %d/%d images", done, total)
            last[0] = time.monotonic()

    result = cluster.run_tag(cfg, progress=progress, on_log=lambda line: logger.info("[ray job] %s", line))
    out = dataclasses.asdict(result)
    out["images_per_s"] = round(result.images_per_s, 2)
    return out


@task(name="write-report", **TRANSIENT_RETRY)
def write_html_report(output: str, run_id: str) -> str:
    """The run's HTML report (``catalog_tagger.report``); returns where it was written."""
    from catalog_tagger.report import write_report  # DuckDB: imported when a run has something to report

    return write_report(output, run_id=run_id)


@task(name="maintain-output", **TRANSIENT_RETRY)
def maintain_output(output: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Catch up ``latest``, compact, vacuum after the retention and checkpoint (``catalog_tagger.tag.maintain``)."""
    from catalog_tagger.tag.maintain import maintain

    return dataclasses.asdict(maintain(output, storage_options))


@task(name="refresh-index", **TRANSIENT_RETRY)
def refresh_index(output: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """Add the night's committed rows to the output's ANN index (a rebuild for a new model version); an output
    nobody indexed (``catalog-tagger index``) is left alone: None (``catalog_tagger.ann.refresh``)."""
    from catalog_tagger.ann import refresh

    return refresh(output, storage_options)


def _after_commit(what: str, step: Any, cfg: TagJobConfig) -> dict[str, Any] | None:
    """A step after the night's commit (maintenance, the index): its failure is logged, never failing the night."""
    state = step(cfg.output, cfg.storage_options, return_state=True)
    if state.is_failed():
        get_run_logger().warning("%s of %s failed (tagging is committed): %s", what, cfg.output, state.message)
        return None
    result: dict[str, Any] | None = state.result()
    return result


def _maintain(cfg: TagJobConfig) -> dict[str, Any] | None:
    """Maintenance after the night's tagging, then the ANN index refresh (both best effort)."""
    maintained = _after_commit("maintenance", maintain_output, cfg)
    indexed = _after_commit("the index refresh", refresh_index, cfg)
    if indexed is not None:
        get_run_logger().info("index of model %s: %d vector(s)", indexed["model_version"], indexed["count"])
    return maintained


EVENT_DRIFT = "catalog-tagger.run.drift"
EVENT_OVER_BUDGET = "catalog-tagger.run.over-error-budget"


def _emit(event: str, output: str, run_id: str, payload: dict[str, Any]) -> None:
    resource = {"prefect.resource.id": f"catalog-tagger.output.{output_slug(output)}"}
    emit_event(event=event, resource=resource, payload={"output": redact(output), "run_id": run_id, **payload})


def _health_verdict(result: dict[str, Any], report_uri: str | None) -> State | None:
    """Events for the run's health; a Failed state when it is over its error budget (its rows are committed)."""
    manifest = result["manifest"]
    health = (manifest or {}).get("health") or {}
    if health.get("drift"):
        _emit(EVENT_DRIFT, result["output"], result["run_id"], {"drift": health["drift"]})
    over = over_budget(manifest)
    if over is None:
        return None
    message = f"{over}: see the run report" + (f" {report_uri}" if report_uri else "")
    counts = {k: manifest["counts"][k] for k in ("rows", "error")}
    fractions = {k: health[k] for k in ("error_fraction", "max_error_fraction")}
    _emit(EVENT_OVER_BUDGET, result["output"], result["run_id"], {**counts, **fractions, "message": message})
    get_run_logger().error("run %s: %s", result["run_id"], message)
    return Failed(message=message)


def _tag_and_report(kind: str, params: NightlyParams) -> dict[str, Any] | State:
    """The body of both flows: check, tag, report, publish the artifacts; the tasks are looked up at call time."""
    logger = get_run_logger()
    run_id = run_id_for_flow_run(kind)
    cfg = params.job_config(run_id)
    path = cluster.ray_path(cfg.ray_address)
    where = _WHERE[path].format(address=cfg.ray_address)
    logger.info("run %s: %s -> %s with %s on %s", run_id, cfg.source, cfg.output, cfg.model, where)
    if path == "jobs":
        logger.info("inputs are validated by the job on the cluster (this worker may not see its storage)")
    else:
        check_inputs(cfg)
    result = tag_catalog(cfg)
    report_uri = write_html_report(cfg.output, run_id) if result["manifest"] is not None else None
    publish_run(kind, result, report_uri, f"{path} ({cfg.ray_address or 'local'})", scheduled_date())
    maintained = _maintain(cfg)
    logger.info(
        "run %s: %d ok, %d errors, %d unchanged%s",
        run_id,
        result["ok"],
        result["error"],
        result["unchanged"],
        f"; report {report_uri}" if report_uri else "",
    )
    failed = _health_verdict(result, report_uri)
    if failed is not None:
        return failed
    return {**result, "report": report_uri, "ray_path": path, "maintained": maintained is not None}


# The flows take flat parameters (``-p name=value``); ``locals()``, read first thing, is exactly those.
@flow(name="nightly-tagging", flow_run_name=flow_run_namer("nightly"), persist_result=False)
def nightly_tagging(
    source: str,
    output: str,
    model: str,
    ray_address: str | None = None,
    full: bool = False,
    price_per_hour: float | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    executor: str = "auto",
    price_per_cpu_hour: float | None = None,
    recalibrate: bool = False,
    decode_on: str = "auto",
    max_error_fraction: float | None = None,
) -> dict[str, Any] | State:
    """Tag the new and changed images of a catalog, commit Parquet, and publish the savings report.

    Parameters are validated as one ``NightlyParams`` before any work (defaults: see that model).
    """
    return _tag_and_report("nightly", NightlyParams.parse("nightly_tagging", **locals()))


@flow(name="backfill", flow_run_name=flow_run_namer("backfill"), persist_result=False)
def backfill(
    source: str,
    output: str,
    model: str,
    ray_address: str | None = None,
    price_per_hour: float | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    executor: str = "auto",
    price_per_cpu_hour: float | None = None,
    recalibrate: bool = False,
    decode_on: str = "auto",
    max_error_fraction: float | None = None,
) -> dict[str, Any] | State:
    """Re-tag every image with ``model`` (e.g. a new model version), whatever earlier runs committed."""
    return _tag_and_report("backfill", NightlyParams.parse("backfill", **locals(), full=True))


def as_run_result(flow_result: dict[str, Any] | State) -> RunResult:
    """The library's ``RunResult`` from a tagging flow's JSON result (drops the flow-only keys)."""
    if isinstance(flow_result, State):  # a flow called without return_state raises before returning a state
        raise RuntimeError(f"the tagging flow ended {flow_result.name}: {flow_result.message}")
    return RunResult.from_dict(flow_result)


def run_local_demo(
    source: str,
    output: str,
    model: str,
    *,
    ray_address: str | None = None,
    limit: int | None = None,
    executor: str = "auto",
    between: Callable[[], None] | None = None,
) -> tuple[RunResult, RunResult]:
    """Run ``nightly_tagging`` twice in this process and return both runs (for ``make demo``).

    No server or worker is needed: without ``PREFECT_API_URL`` Prefect runs the flows against a temporary local
    server it starts itself. ``between`` runs between the two nights (e.g. add 1% new images to the catalog);
    the second night tags only what is new or changed. The flows' artifacts are in that server's database.
    """
    kwargs: dict[str, Any] = {
        "source": source,
        "output": output,
        "model": model,
        "ray_address": ray_address,
        "executor": executor,
    }
    if limit is not None:
        kwargs["limit"] = limit
    first = nightly_tagging(**kwargs)
    if between is not None:
        between()
    second = nightly_tagging(**kwargs)
    return as_run_result(first), as_run_result(second)
