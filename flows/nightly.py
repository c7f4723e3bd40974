"""Nightly tagging and backfill: thin Prefect flows around the library's tagging job, plus the savings artifacts.

A flow run validates its parameters (``NightlyParams``) before any task runs, derives the tagging run id from the
flow run (so a retry of the same flow run, task-level or from the UI, resumes the staged shards of the same run),
tags on the Ray path its ``ray_address`` selects (``catalog_tagger.cluster``), writes the HTML report when the
library has one, and publishes the savings as Prefect artifacts under stable keys (``nightly-savings``,
``nightly-summary``; ``backfill-*`` for backfills). Results are never persisted: no pickles anywhere.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff

from catalog_tagger.errors import RayJobFailed, UserError
from catalog_tagger.render import savings_rows
from catalog_tagger.tag import cluster
from catalog_tagger.tag import job as tag_job
from catalog_tagger.tag.job import RunResult, TagJobConfig
from flows.params import NightlyParams

log = logging.getLogger(__name__)

# Feature check at import time: the HTML report module may not exist in this version of the library. Errors
# raised by it at run time are real failures and are never swallowed.
HAVE_REPORT = importlib.util.find_spec("catalog_tagger.report") is not None

# ------------------------------------------------------------------------------------------ retry policy
# OSErrors that say "this input is wrong", not "the network hiccupped": retrying them only delays the failure.
_PERMANENT_OSERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# Transient failures raised by Ray (head/worker/actor loss, timeouts) and botocore (endpoint unreachable), by name:
# the retry condition must not import Ray just to classify an exception.
_TRANSIENT_NAMES = {
    "RaySystemError",
    "ActorDiedError",
    "ActorUnavailableError",
    "NodeDiedError",
    "ObjectLostError",
    "ObjectFetchTimedOutError",
    "OwnerDiedError",
    "WorkerCrashedError",
    "GetTimeoutError",
    "RpcError",
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ConnectionClosedError",
}


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes/contexts, and the user exception a RayTaskError wraps."""
    out: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is seen for seen in out):
            continue
        out.append(e)
        cause = getattr(e, "cause", None)
        todo += [e.__cause__, e.__context__, cause if isinstance(cause, BaseException) else None]
    return out


def is_transient(exc: BaseException) -> bool:
    """True for object-storage and Ray connection failures worth a retry; never for bad input (``UserError``)."""
    chain = _chain(exc)
    if any(isinstance(e, UserError) for e in chain):
        return False
    for e in chain:
        if isinstance(e, RayJobFailed):
            return e.retryable
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and not isinstance(e, _PERMANENT_OSERRORS):
            return True
        if type(e).__name__ in _TRANSIENT_NAMES:
            return True
    return False


def retry_on_transient(task, task_run, state) -> bool:  # noqa: ARG001 - Prefect's retry_condition_fn signature
    """Prefect ``retry_condition_fn``: retry transient errors, fail at once on anything else."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classify whatever the task raised
        retry = is_transient(exc)
        try:
            logger = get_run_logger()
        except MissingContextError:
            logger = log
        logger.warning("%s (%s): %s", type(exc).__name__, "transient" if retry else "not retried", exc)
        return retry
    return False


TRANSIENT_RETRY = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=20),  # 20 s, 40 s, 80 s
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_transient,
    persist_result=False,
    cache_policy=NO_CACHE,
)


# ------------------------------------------------------------------------------------------ tasks
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
def write_html_report(output: str, run_id: str) -> str | None:
    """The run's HTML report (``catalog_tagger.report``), or None where this library version has none."""
    if not HAVE_REPORT:
        get_run_logger().info("this catalog_tagger has no report module: no HTML report")
        return None
    from catalog_tagger.report import write_report

    return write_report(output, run_id=run_id)


# ------------------------------------------------------------------------------------------ artifacts
# (key in the manifest's savings, label): every number of the savings report, raw, in one table.
SAVINGS_FIELDS: list[tuple[str, str]] = [
    ("images", "images tagged (ok)"),
    ("tasks", "tasks (heads)"),
    ("device", "device"),
    ("method", "how single-task cost was measured"),
    ("multi_head_accel_s", "multi-head accelerator-seconds (measured)"),
    ("single_task_accel_s", "single-task accelerator-seconds (n models)"),
    ("multi_head_accel_hours", "multi-head accelerator-hours"),
    ("single_task_accel_hours", "single-task accelerator-hours"),
    ("accel_hours_saved", "accelerator-hours saved"),
    ("fraction_saved", "fraction saved"),
    ("price_per_hour", "price per accelerator-hour (USD)"),
    ("cost_saved", "cost saved (USD)"),
    ("decode_cpu_s", "decode CPU-seconds (measured)"),
    ("decode_cpu_s_saved", "decode CPU-seconds saved"),
]


def savings_table(savings: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the table artifact: the manifest's numbers unformatted, so dashboards can read them back."""
    return [{"metric": label, "key": key, "value": savings[key]} for key, label in SAVINGS_FIELDS if key in savings]


def summary_markdown(kind: str, result: dict[str, Any], report_uri: str | None, path: str, when: str) -> str:
    m = result["manifest"]
    lines = [
        f"# {kind.capitalize()} tagging {when}: run `{result['run_id']}`",
        "",
        "| | |",
        "|---|---|",
        f"| images listed | {result['listed']:,} |",
        f"| unchanged (skipped) | {result['unchanged']:,} |",
        f"| tagged ok | {result['ok']:,} |",
        f"| errors | {result['error']:,} |",
        f"| wall time | {result['wall_s']:.1f} s |",
        f"| Ray | {path} |",
    ]
    if m is not None:
        lines += ["", "## Accelerator-hours saved: one multi-head model vs one model per task", ""]
        lines += ["| | |", "|---|---|"]
        lines += [f"| {label} | {value} |" for label, value in savings_rows(m["savings"])]
        manifest_uri = f"{result['output']}/runs/{result['run_id']}.json"
        lines += ["", f"Model version `{m['model_version']}`; manifest `{manifest_uri}`."]
    else:
        lines += ["", "Nothing was committed: no new or changed images."]
    if report_uri:
        lines += ["", f"HTML report: `{report_uri}`"]
    elif m is not None:
        lines += ["", "HTML report: not available (this catalog_tagger has no report module)."]
    if result["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in result["notes"]]]
    return "\n".join(lines) + "\n"


def publish_artifacts(kind: str, result: dict[str, Any], report_uri: str | None, path: str, when: str) -> None:
    """``{kind}-savings`` (table, only when a run committed) and ``{kind}-summary`` (markdown), stable keys."""
    if result["manifest"] is not None:
        create_table_artifact(
            key=f"{kind}-savings",
            table=savings_table(result["manifest"]["savings"]),
            description=f"Savings of run {result['run_id']} ({when}): one multi-head model vs one model per task",
        )
    create_markdown_artifact(
        key=f"{kind}-summary",
        markdown=summary_markdown(kind, result, report_uri, path, when),
        description=f"Summary of {kind} tagging run {result['run_id']}",
    )


# ------------------------------------------------------------------------------------------ flows
def _scheduled_date() -> str:
    from prefect.runtime import flow_run

    return f"{flow_run.scheduled_start_time:%Y-%m-%d}"


def flow_run_namer(kind: str) -> Callable[[], str]:
    def name() -> str:
        return f"{kind}-{_scheduled_date()}"

    return name


def run_id_for_flow_run(kind: str) -> str:
    """``{kind}-YYYYMMDD-{flow run id[:8]}``: stable across retries of one flow run, distinct across flow runs."""
    from prefect.runtime import flow_run

    short = str(flow_run.id or "").replace("-", "")[:8]
    if not short:
        raise RuntimeError("run_id_for_flow_run must be called inside a flow run")
    return f"{kind}-{flow_run.scheduled_start_time:%Y%m%d}-{short}"


def _tag_and_report(params: NightlyParams, kind: str) -> dict[str, Any]:
    logger = get_run_logger()
    run_id = run_id_for_flow_run(kind)
    cfg = params.job_config(run_id)
    path = cluster.ray_path(cfg.ray_address)
    where = {"local": "embedded local Ray", "connect": f"cluster {cfg.ray_address}", "jobs": "Ray Jobs API"}[path]
    logger.info("run %s: %s -> %s with %s on %s", run_id, cfg.source, cfg.output, cfg.model, where)
    if path == "jobs":
        logger.info("inputs are validated by the job on the cluster (this worker may not see its storage)")
    else:
        check_inputs(cfg)
    result = tag_catalog(cfg)
    report_uri = write_html_report(cfg.output, run_id) if result["manifest"] is not None else None
    when = _scheduled_date()
    publish_artifacts(kind, result, report_uri, f"{path} ({cfg.ray_address or 'local'})", when)
    logger.info(
        "run %s: %d ok, %d errors, %d unchanged%s",
        run_id,
        result["ok"],
        result["error"],
        result["unchanged"],
        f"; report {report_uri}" if report_uri else "",
    )
    return {**result, "report": report_uri, "ray_path": path}


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
) -> dict[str, Any]:
    """Tag the new and changed images of a catalog, commit Parquet, and publish the savings report.

    Parameters are validated as one ``NightlyParams`` before any work (defaults: see that model).
    """
    params = NightlyParams.parse(
        "nightly_tagging",
        source=source,
        output=output,
        model=model,
        ray_address=ray_address,
        full=full,
        price_per_hour=price_per_hour,
        limit=limit,
        batch_size=batch_size,
        executor=executor,
    )
    return _tag_and_report(params, "nightly")


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
) -> dict[str, Any]:
    """Re-tag every image with ``model`` (e.g. a new model version), whatever earlier runs committed."""
    params = NightlyParams.parse(
        "backfill",
        source=source,
        output=output,
        model=model,
        ray_address=ray_address,
        full=True,
        price_per_hour=price_per_hour,
        limit=limit,
        batch_size=batch_size,
        executor=executor,
    )
    return _tag_and_report(params, "backfill")


def as_run_result(flow_result: dict[str, Any]) -> RunResult:
    """The library's ``RunResult`` from a tagging flow's JSON result (drops the flow-only keys)."""
    names = {f.name for f in dataclasses.fields(RunResult)}
    return RunResult(**{k: v for k, v in flow_result.items() if k in names})


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
