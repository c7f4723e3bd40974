"""Where a tagging job runs: the embedded local Ray, a connected Ray cluster, or a Ray Jobs API submission.

``ray_address`` picks the path (``ray_path``):

- ``None`` / ``"local"``: Ray started in this process, sized to the machine (``ray_runtime.init_ray``).
- ``"auto"``, ``"ray://head:10001"``, ``"head:6379"``: this process connects to the cluster and drives the job;
  the Ray Data pipeline runs on the cluster's nodes (``job.run`` -> ``ray_runtime.init_ray(address)``).
- ``"http(s)://head:8265"`` (the dashboard): the job is submitted through the Ray Jobs API and its driver runs
  on the cluster (``python -m catalog_tagger.cli tag ...``). This process only submits, streams the job's logs,
  maps its final status and reads the committed manifest. Storage credentials stay in the cluster's environment:
  nothing secret travels in the job's runtime env (Ray returns ``env_vars`` in clear to any SDK client).

A retried submission re-attaches: jobs carry the tagging run id in their metadata, so a caller that lost its
connection finds the job still running (or finished) instead of starting a second driver for the same run.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shlex
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from catalog_tagger.errors import RayJobFailed, UserError
from catalog_tagger.tag import job
from catalog_tagger.tag.commit import Layout, committed_manifest
from catalog_tagger.tag.config import TagJobConfig
from catalog_tagger.tag.executors import ProgressFn
from catalog_tagger.tag.health import EXIT_OVER_BUDGET
from catalog_tagger.tag.job import RunResult

if TYPE_CHECKING:
    from ray.job_submission import JobStatus, JobSubmissionClient

log = logging.getLogger(__name__)

RayPath = Literal["local", "connect", "jobs"]
LogFn = Callable[[str], None]

RUN_ID_METADATA = "catalog_tagger_run_id"
# The CLI maps a UserError to exit code 2: the job's input was refused, a retry cannot help.
USER_ERROR_EXIT_CODE = 2
# Names that must never travel in a job's runtime env (Ray hands env_vars back in clear to any SDK client).
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|SESSION|PRIVATE|API_KEY", re.I)
_GCS_ADDRESS = re.compile(r"[A-Za-z0-9_.\-]+:\d{1,5}")
# TagJobConfig fields the ``tag`` command cannot express yet; a non-default value is refused, never dropped.
_NOT_ON_CLI = ("calibrate", "storage_options", "decode_cpus")
# TagJobConfig fields passed on as ``--flag value`` when set and off their defaults, and boolean ``--flag``s.
_VALUED = (
    "price_per_cpu_hour", "actors", "limit", "write_tasks", "allowed_root", "executor", "rows_per_shard",
    "shard_seconds", "decode_on", "max_image_bytes", "read_timeout_s", "read_deadline_s", "max_image_pixels",
    "max_error_fraction",
)  # fmt: skip
_SWITCHES = ("full", "allow_task_change", "recalibrate")


def ray_path(address: str | None) -> RayPath:
    """Which path a ``ray_address`` selects; a malformed address is a user error."""
    a = (address or "").strip()
    if a in ("", "local"):
        return "local"
    if a.startswith(("http://", "https://")):
        return "jobs"
    if a == "auto" or a.startswith("ray://") or _GCS_ADDRESS.fullmatch(a):
        return "connect"
    raise UserError(
        f"ray_address {address!r} is not understood: use 'local' (embedded Ray), 'auto', 'ray://head:10001' or "
        "'head:6379' (connect to a cluster), or the dashboard 'http://head:8265' (submit through the Ray Jobs API)"
    )


@dataclass
class JobsOptions:
    """How to submit to the Ray Jobs API."""

    env_vars: dict[str, str] = field(default_factory=dict)  # non-secret env for the driver (e.g. AWS_ENDPOINT_URL)
    runtime_env: dict[str, Any] | None = None  # extra runtime env (pip, working_dir...); env_vars merged in
    poll_s: float = 2.0  # status polling interval once the log stream ends or breaks
    entrypoint_num_cpus: float = 0  # CPUs reserved for the driver itself (the pipeline's own are requested by it)
    python: str = "python"  # the interpreter on the cluster (the image's)


def run_tag(
    cfg: TagJobConfig,
    *,
    progress: ProgressFn | None = None,
    on_log: LogFn | None = None,
    jobs: JobsOptions | None = None,
) -> RunResult:
    """Run one tagging job on the path ``cfg.ray_address`` selects and return what it committed."""
    path = ray_path(cfg.ray_address)
    if path == "jobs":
        return submit_tag_job(cfg, on_log=on_log, options=jobs)
    if path == "local":
        log.info("tagging on the embedded local Ray")
    else:
        log.info("tagging on the Ray cluster at %s (connected driver)", cfg.ray_address)
    return job.run(cfg, progress=progress)


# --------------------------------------------------------------------------------------------- Jobs API
def tag_entrypoint(cfg: TagJobConfig, *, python: str = "python") -> str:
    """The shell command a Ray job runs for ``cfg`` (its driver connects to the cluster it runs on)."""
    if cfg.run_id is None:
        raise ValueError("tag_entrypoint needs a run_id (the submitter must know where the manifest will land)")
    refused = [name for name in _NOT_ON_CLI if getattr(cfg, name) != TagJobConfig.model_fields[name].get_default()]
    if refused:
        raise UserError(
            f"{', '.join(refused)} cannot be passed to a Ray Jobs submission (the `tag` command has no flag for "
            "them); leave them at their defaults, keep storage credentials in the cluster's environment"
        )
    args = [python, "-m", "catalog_tagger.cli", "tag"]
    args += ["--model", cfg.model, "--source", cfg.source, "--output", cfg.output, "--run-id", cfg.run_id]
    args += ["--ray-address", "auto", "--batch-size", str(cfg.batch_size), "--device", cfg.device]
    args += ["--price-per-hour", repr(float(cfg.price_per_hour))]
    return shlex.join(args + _optional_args(cfg))


def _optional_args(cfg: TagJobConfig) -> list[str]:
    """The ``tag`` flags of the options that are set (or off their defaults)."""
    args: list[str] = []
    for name in _VALUED:
        value = getattr(cfg, name)
        if value is not None and value != TagJobConfig.model_fields[name].get_default():
            args += [_flag(name), repr(value) if isinstance(value, float) else str(value)]
    for uri in cfg.baseline:
        args += ["--baseline", uri]
    return args + [_flag(name) for name in _SWITCHES if getattr(cfg, name)]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def job_runtime_env(options: JobsOptions) -> dict[str, Any]:
    """The runtime env of a submission: unbuffered output for live logs plus the caller's non-secret env."""
    secret = sorted(k for k in options.env_vars if _SECRET_NAME.search(k))
    if secret:
        raise UserError(
            f"refusing to put {', '.join(secret)} in a Ray job's runtime env (readable by any dashboard client): "
            "give the cluster its storage credentials in its own environment (Kubernetes Secret, instance role)"
        )
    env = dict(options.runtime_env or {})
    env["env_vars"] = {"PYTHONUNBUFFERED": "1", **env.get("env_vars", {}), **options.env_vars}
    return env


def _client(address: str) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except ConnectionError:
        raise
    except Exception as err:  # the SDK raises bare Exceptions for an unreachable dashboard
        raise ConnectionError(f"cannot reach the Ray Jobs API at {address!r}: {err}") from err


def _jobs_of_run(client: Any, run_id: str) -> list[Any]:
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get(RUN_ID_METADATA) == run_id and j.submission_id]
    return sorted(jobs, key=lambda j: j.start_time or 0)


def submit_tag_job(
    cfg: TagJobConfig,
    *,
    on_log: LogFn | None = None,
    options: JobsOptions | None = None,
    client: Any = None,
) -> RunResult:
    """Submit the job (or re-attach to the live one of the same run id), stream its logs, map its final status."""
    from ray.job_submission import JobStatus

    options = options or JobsOptions()
    t_start = time.perf_counter()
    run_id = cfg.run_id or job.new_run_id()
    cfg = cfg.model_copy(update={"run_id": run_id})
    entrypoint = tag_entrypoint(cfg, python=options.python)
    runtime_env = job_runtime_env(options)
    client = client or _client(str(cfg.ray_address))

    previous = _jobs_of_run(client, run_id)
    live = [j for j in previous if not JobStatus(j.status).is_terminal()]
    done = [j for j in previous if JobStatus(j.status) == JobStatus.SUCCEEDED]
    if live:
        submission_id = live[-1].submission_id
        log.info("run %s: re-attaching to Ray job %s (%s)", run_id, submission_id, live[-1].status)
    elif done:
        submission_id = done[-1].submission_id
        log.info("run %s: Ray job %s already succeeded", run_id, submission_id)
    else:
        submission_id = f"catalog-tagger-{run_id}-{len(previous) + 1}"
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=runtime_env,
            metadata={RUN_ID_METADATA: run_id},
            entrypoint_num_cpus=options.entrypoint_num_cpus,
        )
        log.info("run %s: submitted Ray job %s: %s", run_id, submission_id, entrypoint)

    status = follow_job(client, submission_id, on_log=on_log, poll_s=options.poll_s)
    if status == JobStatus.SUCCEEDED:
        return _result_from_output(cfg, time.perf_counter() - t_start, submission_id)
    info = client.get_job_info(submission_id)
    if status == JobStatus.FAILED and info.driver_exit_code == EXIT_OVER_BUDGET:
        # committed, over its error budget: the manifest's health says so (no retry: it would change nothing)
        return _result_from_output(cfg, time.perf_counter() - t_start, submission_id)
    tail = _log_tail(client, submission_id)
    detail = f"Ray job {submission_id} {status}: {info.message or ''}".strip()
    if tail:
        detail += "\nlast log lines:\n" + tail
    if status == JobStatus.FAILED and info.driver_exit_code == USER_ERROR_EXIT_CODE:
        refusal = [ln for ln in tail.splitlines() if ln.lstrip().lower().startswith("error:")]
        raise UserError(refusal[-1].split(":", 1)[1].strip() if refusal else detail)
    raise RayJobFailed(detail, status=str(status), submission_id=submission_id, retryable=status == JobStatus.FAILED)


def follow_job(client: Any, submission_id: str, *, on_log: LogFn | None = None, poll_s: float = 2.0) -> JobStatus:
    """Stream a job's log lines to ``on_log`` until it ends; return its terminal ``JobStatus``."""
    if on_log is not None:
        try:
            _tail_logs(client, submission_id, on_log)
        except Exception as err:  # noqa: BLE001 - logs are a convenience; the status below is the truth
            log.warning("log stream of Ray job %s broke (%s); polling its status", submission_id, err)
    while True:
        status: JobStatus = client.get_job_status(submission_id)
        if status.is_terminal():
            return status
        time.sleep(poll_s)


def _tail_logs(client: Any, submission_id: str, on_log: LogFn) -> None:
    async def follow() -> None:
        buf = ""
        async for chunk in client.tail_job_logs(submission_id):
            buf += chunk
            *lines, buf = buf.split("\n")
            for line in lines:
                on_log(line)
        if buf:
            on_log(buf)

    # Its own thread and event loop: the caller may already run one (Prefect tasks, notebooks).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ray-job-logs") as pool:
        pool.submit(asyncio.run, follow()).result()


def _log_tail(client: Any, submission_id: str, lines: int = 20) -> str:
    try:
        return "\n".join(client.get_job_logs(submission_id).rstrip().splitlines()[-lines:])
    except Exception as err:  # noqa: BLE001 - best effort: the status is already known
        return f"(logs unavailable: {err})"


def _result_from_output(cfg: TagJobConfig, wall_s: float, submission_id: str) -> RunResult:
    """What the job committed, read back from the output store (absent when there was nothing to tag)."""
    run_id = str(cfg.run_id)
    layout = Layout(cfg.output, cfg.storage_options)
    manifest = committed_manifest(layout, run_id)
    note = f"ran as Ray job {submission_id}"
    if manifest is None:
        return RunResult(
            run_id=run_id,
            listed=0,
            processed=0,
            ok=0,
            error=0,
            unchanged=0,
            wall_s=wall_s,
            manifest=None,
            output=cfg.output,
            notes=[note, "nothing committed: no new or changed images (see the job's logs)"],
        )
    return RunResult.from_manifest(manifest, output=cfg.output, wall_s=wall_s, notes=[note, *manifest.get("notes", [])])
