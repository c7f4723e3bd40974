"""The build step of deploy/prefect*.yaml: reads the ``CATALOG_TAGGER_*`` variables once, with explicit defaults.

Prefect 3.8 fills a ``{{ $NAME }}`` placeholder from the environment of ``prefect deploy`` and, for a variable that
is unset there, stores an empty string in parameters and schedules, and keeps the literal placeholder in pull steps
(resolved again, to ``''`` when unset, by each flow-run process). Left to that, a deployment made without
``CATALOG_TAGGER_HOME`` crashed on every run, an unset timezone silently meant UTC, and an unset source ran every
night only to fail. This step makes each default a decision, says it once, and refuses what cannot work:

- ``home``: ``CATALOG_TAGGER_HOME``, else the directory ``prefect deploy`` runs in (the checkout deployed from);
- ``timezone``: ``CATALOG_TAGGER_TZ``, else ``UTC``; a name that is not an IANA timezone fails the deploy;
- ``source``/``output``/``model``: stored as given, ``''`` when unset (a run then needs ``-p name=...``), and while
  any of them is unset the nightly schedule is created paused (``schedule_active`` is ``False``);
- ``worker_image`` (deploy/prefect-k8s.yaml): ``CATALOG_TAGGER_WORKER_IMAGE``, required.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any
from zoneinfo import available_timezones

log = logging.getLogger(__name__)

PARAMETERS = {"source": "CATALOG_TAGGER_SOURCE", "output": "CATALOG_TAGGER_OUTPUT", "model": "CATALOG_TAGGER_MODEL"}


class DeploySettingsError(ValueError):
    """A ``CATALOG_TAGGER_*`` variable that no deployment could run with."""


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


@functools.cache
def _say(message: str) -> None:
    """Log ``message`` once per ``prefect deploy`` (the build step runs once per deployment)."""
    log.warning("%s", message)


def _home(fixed: str | None) -> str:
    if fixed:
        return fixed  # a container image's checkout: the same on every pod, whatever this machine has
    home = _env("CATALOG_TAGGER_HOME")
    if not home:
        home = str(Path.cwd())
        _say(f"CATALOG_TAGGER_HOME is unset: flow runs start in {home} (the directory deployed from)")
    elif not Path(home).is_absolute():
        # A relative directory would be resolved again by each flow-run process, from wherever the worker runs.
        raise DeploySettingsError(f"CATALOG_TAGGER_HOME={home!r} is relative: give the checkout's absolute path")
    elif not (Path(home) / "flows" / "nightly.py").is_file():
        _say(f"CATALOG_TAGGER_HOME={home} has no flows/nightly.py on this machine: the worker's machine needs it")
    return home


def _worker_image() -> str:
    image = _env("CATALOG_TAGGER_WORKER_IMAGE")
    if not image:
        raise DeploySettingsError(
            "CATALOG_TAGGER_WORKER_IMAGE is unset: give the flow-run image (deploy/Dockerfile, target prefect-worker)"
        )
    return image


def _timezone() -> str:
    tz = _env("CATALOG_TAGGER_TZ")
    if not tz:
        _say("CATALOG_TAGGER_TZ is unset: the nightly cron runs at 02:00 UTC")
        return "UTC"
    if tz not in available_timezones():  # the list Prefect's schedules accept
        raise DeploySettingsError(
            f"CATALOG_TAGGER_TZ={tz!r} is not an IANA timezone name (e.g. UTC, Europe/Berlin, America/New_York)"
        )
    return tz


def resolve_settings(home: str | None = None, worker_image: bool = False) -> dict[str, Any]:
    """Prefect build step (``id: settings``): the deployment settings, or ``prefect deploy`` fails naming the variable.

    ``home`` fixes the pull step's directory (a container image's checkout) instead of reading
    ``CATALOG_TAGGER_HOME``; ``worker_image`` requires ``CATALOG_TAGGER_WORKER_IMAGE``. Returns ``home``,
    ``timezone``, ``source``, ``output``, ``model``, ``schedule_active`` (and ``worker_image``), used in the YAML as
    ``{{ settings.NAME }}``.
    """
    try:
        settings: dict[str, Any] = {"home": _home(home), "timezone": _timezone()}
        if worker_image:
            settings["worker_image"] = _worker_image()
    except DeploySettingsError as err:
        # One line and exit 1: Prefect prints the whole traceback of a build step that raises.
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    settings |= {name: _env(var) for name, var in PARAMETERS.items()}
    unset = [var for name, var in PARAMETERS.items() if not settings[name]]
    settings["schedule_active"] = not unset
    if unset:
        _say(
            f"{', '.join(unset)} unset: stored as '', so each run needs -p for them, "
            "and the nightly schedule is created paused; set them and deploy again to schedule it"
        )
    return settings
