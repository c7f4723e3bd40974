"""Training as a Prefect flow: validate ``TrainParams``, call ``catalog_tagger.train``, publish the metrics."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from flows.artifacts import publish_training
from flows.params import TrainParams
from flows.runtime import TRANSIENT_RETRY, flow_run_namer

# A retry restarts training from scratch: one is enough for a storage hiccup while reading labels or images.
TRAIN_RETRY = {**TRANSIENT_RETRY, "retries": 1}


@task(name="train", **TRAIN_RETRY)
def train_task(params: TrainParams) -> dict[str, Any]:
    """Train and save the artifact; return a JSON-able summary (the artifact itself is the result)."""
    from catalog_tagger.train.pipeline import train

    res = train(params.train_config())
    return {
        "out": res.out,
        "model_version": res.card.version,
        "metrics": res.metrics,
        "best_epoch": res.best_epoch,
        "epochs_run": res.epochs_run,
        "images_used": res.images_used,
        "skipped": len(res.skipped),
        "seconds": round(res.seconds, 1),
        "comparison": res.comparison,
    }


@flow(name="train-model", flow_run_name=flow_run_namer("train"), persist_result=False)
def train_model(
    tasks: str,
    labels: str,
    out: str,
    backbone: str | None = None,
    image_size: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    patience: int | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    seed: int | None = None,
    single_task: bool = False,
    max_images: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Train the multi-head model on a labels table and write the artifact; metrics become Prefect artifacts."""
    params = TrainParams.parse("train_model", **locals())  # read first thing: exactly the flat parameters
    params.train_config()  # the library's own checks, before any image is read
    result = train_task(params)
    publish_training(result)
    get_run_logger().info("trained %s (version %s)", result["out"], result["model_version"])
    return result
