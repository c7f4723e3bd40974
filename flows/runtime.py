"""What every flow shares: the task retry policy (transient failures only) and names taken from the flow run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.tasks import exponential_backoff

from catalog_tagger.storage import is_transient

log = logging.getLogger(__name__)


def retry_on_transient(task: Any, task_run: Any, state: Any) -> bool:  # noqa: ARG001 - Prefect's retry_condition_fn signature
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


# Task options: results are never persisted (no pickles anywhere), and only transient errors are retried.
TRANSIENT_RETRY: dict[str, Any] = dict(
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=20),  # 20 s, 40 s, 80 s
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_transient,
    persist_result=False,
    cache_policy=NO_CACHE,
)


def scheduled_date() -> str:
    """The running flow run's scheduled date, ``YYYY-MM-DD``."""
    from prefect.runtime import flow_run

    return f"{flow_run.scheduled_start_time:%Y-%m-%d}"


def flow_run_namer(kind: str) -> Callable[[], str]:
    """A ``flow_run_name`` callable: ``{kind}-YYYY-MM-DD`` of the scheduled date."""

    def name() -> str:
        return f"{kind}-{scheduled_date()}"

    return name


def run_id_for_flow_run(kind: str) -> str:
    """``{kind}-YYYYMMDD-{flow run id[:8]}``: stable across retries of one flow run, distinct across flow runs."""
    from prefect.runtime import flow_run

    short = str(flow_run.id or "").replace("-", "")[:8]
    if not short:
        raise RuntimeError("run_id_for_flow_run must be called inside a flow run")
    return f"{kind}-{flow_run.scheduled_start_time:%Y%m%d}-{short}"
