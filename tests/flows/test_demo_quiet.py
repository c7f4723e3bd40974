"""`catalog-tagger demo` (what `make demo` runs): its console shows progress, the summary and the savings, and no
library chatter that reads as a failure (issue 13, case 20)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration]  # a temporary Prefect server and a local Ray: ~1 minute

ROOT = Path(__file__).resolve().parents[2]

NOISE = {
    "httpx request log": re.compile(r"HTTP Request:"),
    "CSRF probe answered 422": re.compile(r"422 Unprocessable Entity"),
    "Prefect telemetry error": re.compile(r"telemetry", re.I),
    "Ray core_worker line": re.compile(r"core_worker"),
    "C++ error line": re.compile(r"^\[[\d\- :,]+ E \d+ \d+\]", re.M),
    "an ERROR log": re.compile(r"\bERROR\b"),
    "Ray token-auth notice": re.compile(r"Token authentication is enabled"),
    "a traceback": re.compile(r"Traceback \(most recent call last\)"),
}


def test_demo_output_is_quiet(catalog_kit, tmp_path: Path) -> None:
    # A catalog and a model left under --out are reused: the tiny ones skip training (not what is checked here).
    kit = catalog_kit(images=20, name="demo")
    out = tmp_path / "demo-out"
    shutil.copytree(Path(kit["root"]) / "cat", out / "catalog")
    shutil.copytree(kit["model"], out / "model")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_"))}
    env |= {"PREFECT_HOME": str(tmp_path / "prefect-home"), "COLUMNS": "200"}  # no wrapped lines to match across
    cmd = [sys.executable, "-m", "catalog_tagger.cli", "demo", "--out", str(out), "--images", "20"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-6000:]

    found = {name: pat.search(text).group(0) for name, pat in NOISE.items() if pat.search(text)}
    assert not found, f"{found}\n{text[-6000:]}"
    for kept in (
        "tagged 20/20 images",  # progress
        "run nightly-",  # the flows' own log lines
        "images listed",  # the run summary
        "busy time saved",  # the savings
        "busy time saved, fraction",
        "second run: 0 new image(s), 20 unchanged",
        "report: ",
    ):
        assert kept in text, f"{kept!r} missing:\n{text[-6000:]}"
