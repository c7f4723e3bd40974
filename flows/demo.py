"""``catalog-tagger demo``: the whole product on a synthetic catalog, locally, in a few minutes."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

if TYPE_CHECKING:
    from catalog_tagger.synthetic.catalog import SynthResult

# What the demo turns down while it runs, so that its console shows our progress, summary and savings, and nothing
# that reads as a failure. Each is a library's routine chatter, not a problem of the run:
QUIET_ENV = {
    # The temporary Prefect server's telemetry service logs an ERROR when it cannot reach Prefect's endpoint.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's client asks every server for a CSRF token; the temporary server has CSRF protection off (Prefect's
    # default) and answers 422 Unprocessable Entity, which the client takes as "not needed". Don't ask.
    "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false",
    # Ray's C++ core worker prints an ERROR line to the driver's stderr for each Ray Data actor it creates (the
    # constructor arguments sit in the object store and Ray Data restarts actors by default: ray#53727), which no
    # Python logger controls. At FATAL it prints one INFO line saying so instead; the Ray processes this demo
    # starts inherit the level (their C++ logs under /tmp/ray keep FATAL only; Python's are unchanged).
    "RAY_BACKEND_LOG_LEVEL": "fatal",
    # The temporary Prefect server must answer within 20 s by default: on a loaded 2-core machine it took longer
    # (seen in CI: "Timed out while attempting to connect to ephemeral Prefect API server"). Wait up to 2 minutes.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
QUIET_LOGGERS = {
    "httpx": logging.WARNING,  # one INFO "HTTP Request: ..." line per call of Prefect's client (~70 per demo)
    "httpcore": logging.WARNING,
    "ray.data": logging.ERROR,  # "Starting execution of Dataset ...", "Progress bars disabled" (the demo's are ours)
    "ray._private.authentication": logging.ERROR,  # "Token authentication is enabled ... to opt out"
}

# ~1 minute of training on a quiet 2-core CPU (600 images); garment ~0.89, pattern ~0.96, badges F1 ~0.83.
DEMO_TRAIN: dict[str, Any] = {
    "backbone": "small_cnn",
    "image_size": 96,
    "epochs": 50,
    "batch_size": 32,
    "lr": 3e-3,
    "patience": 8,
}


def run_demo(out: Path, *, images: int = 600, console: Console) -> dict[str, Any]:
    """synth -> train -> nightly flow (twice: everything, then nothing new) -> report -> predict.

    A catalog or model left by an earlier demo under ``out`` is reused.
    """
    from catalog_tagger.render import render_run_summary
    from catalog_tagger.report import write_report
    from flows.nightly import run_local_demo

    out = out.resolve()
    t0 = time.perf_counter()
    catalog, model_dir, output = out / "catalog", out / "model", out / "output"

    console.rule("1/5 synthetic catalog")
    synth = _catalog(catalog, images, console)
    console.print(f"{len(synth.images)} images, labels {synth.labels_uri}")

    console.rule("2/5 train the multi-head model")
    _train(synth, model_dir, console)

    console.rule("3/5 nightly tagging flow (Prefect + local Ray), run twice")
    # executor="ray": the demo shows the real pipeline on the embedded local Ray, not the small-run fast path.
    with quiet_libraries():
        first, second = run_local_demo(
            source=str(catalog / "images"), output=str(output), model=str(model_dir), executor="ray"
        )
    render_run_summary(first, console)
    console.print(f"second run: {second.processed} new image(s), {second.unchanged} unchanged")

    console.rule("4/5 HTML report")
    report_uri = write_report(str(output), run_id=first.run_id)
    console.print(f"report: {report_uri}")

    console.rule("5/5 predict a few images")
    _predict(model_dir, synth.images[:3], console)

    console.rule("done")
    console.print(f"finished in {time.perf_counter() - t0:.0f}s. Outputs under {out}:")
    console.print(f"  model    {model_dir}  (model.json, model.safetensors, metrics.csv)")
    console.print(f"  output   {output}  (Delta tables predictions/ and latest/, runs/*.json)")
    console.print(f"  report   {report_uri}")
    console.print(
        f'  query    catalog-tagger query --output {output} "SELECT garment, count(*) FROM latest GROUP BY 1"'
    )
    return {"first": first, "second": second, "report": report_uri}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """``QUIET_ENV`` (a variable the user set wins) and ``QUIET_LOGGERS`` while the block runs; restored after.

    Prefect reads its settings once, at import: its global settings context is rebuilt on the way in and out so
    that every thread of this process (its log and event workers too) and the temporary server it starts see them.
    """
    import ray.data  # noqa: F401 - Ray Data sets its loggers' levels on import: ours must come after
    from prefect.context import refresh_global_settings_context
    from prefect.logging.handlers import APILogWorker

    saved_env = {name: os.environ.get(name) for name in QUIET_ENV}
    saved_levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    refresh_global_settings_context()
    try:
        yield
    finally:
        APILogWorker.drain_all(timeout=5)  # the flows' last log lines are sent now, while httpx is still quiet
        for name, old in saved_env.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        for name, level in saved_levels.items():
            logging.getLogger(name).setLevel(level)
        refresh_global_settings_context()


def _catalog(catalog: Path, images: int, console: Console) -> SynthResult:
    """The synthetic catalog under ``catalog``: made with seed 0, or the one an earlier demo left there."""
    from catalog_tagger.synthetic.catalog import SynthConfig, SynthResult, generate

    if not (catalog / "labels.parquet").exists():
        return generate(SynthConfig(out=str(catalog), images=images, seed=0, min_size=300, max_size=900))
    console.print(f"reusing {catalog}")
    return SynthResult(
        out=str(catalog),
        images=sorted(str(p) for p in (catalog / "images").iterdir()),
        labels_uri=str(catalog / "labels.parquet"),
        truth_uri=str(catalog / "truth.parquet"),
        tasks_uri=str(catalog / "tasks.yaml"),
    )


def _train(synth: SynthResult, model_dir: Path, console: Console) -> None:
    """Train the demo model into ``model_dir`` (or reuse the one there) and print its test metrics."""
    if (model_dir / "model.json").exists():
        console.print(f"reusing {model_dir}")
        from catalog_tagger.model.artifact import load_card

        metrics = load_card(str(model_dir)).metrics
    else:
        from catalog_tagger.train.config import TrainConfig
        from catalog_tagger.train.pipeline import train

        res = train(
            TrainConfig(tasks=synth.tasks_uri, labels=synth.labels_uri, out=str(model_dir), seed=0, **DEMO_TRAIN)
        )
        metrics = res.metrics
    for task, m in metrics.items():
        console.print(f"  {task}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float)))


def _predict(model_dir: Path, images: list[str], console: Console) -> None:
    """Each image's predicted label(s) per task, on one line."""
    from catalog_tagger.model.inference import predict_uris

    for r in predict_uris(str(model_dir), images, device="cpu"):
        preds = ", ".join(
            f"{t}={p['label'] if not isinstance(p['label'], list) else '+'.join(p['label']) or '-'}"
            for t, p in r.get("predictions", {}).items()
        )
        console.print(f"  {Path(r['uri']).name}: {preds}")
