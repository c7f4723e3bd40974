"""Training as a Prefect flow: validate ``TrainParams``, call ``catalog_tagger.train``, publish the metrics, and gate
the promotion of the new model to the ``current`` location the nightly deployment reads.

With ``promote_to`` set, the training library compares the new model with the current one on the new run's test
split (``catalog_tagger.train.promote``) and copies it there only when no task is worse by more than
``promotion_tolerance``. The comparison is published either way (``train-promotion-<slug>``); a refusal ends the
flow Failed with a message naming the worse task(s), after the new artifact and its artifacts are written.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.client.schemas.objects import State
from prefect.states import Failed

from flows.artifacts import publish_promotion, publish_training
from flows.params import TrainParams
from flows.runtime import TRANSIENT_RETRY, flow_run_namer

# A retry restarts training from scratch: one is enough for a storage hiccup while reading labels or images.
TRAIN_RETRY = {**TRANSIENT_RETRY, "retries": 1}


@task(name="train", **TRAIN_RETRY)
def train_task(params: TrainParams) -> dict[str, Any]:
    """Train and save the artifact (and pass the promotion gate when asked); return a JSON-able summary."""
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
        "promotion": res.promotion,
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
    weights: str | None = None,
    freeze_backbone_epochs: int | None = None,
    backbone_lr_factor: float | None = None,
    loss_balance: str | None = None,
    promote_to: str | None = None,
    promotion_tolerance: float | None = None,
) -> dict[str, Any] | State:
    """Train the multi-head model on a labels table and write the artifact; metrics become Prefect artifacts.

    ``promote_to``: the current model folder (what the nightly deployment's ``model`` reads); the new model is
    copied there only when it is not worse on the same test split, else the flow ends Failed.
    """
    params = TrainParams.parse("train_model", **locals())  # read first thing: exactly the flat parameters
    params.train_config()  # the library's own checks, before any image is read
    logger = get_run_logger()
    if params.promote_to is None:
        logger.info("no promote_to: the model is written to %s only (no promotion gate)", params.out)
    result = train_task(params)
    publish_training(result)
    logger.info("trained %s (version %s)", result["out"], result["model_version"])
    promotion = result["promotion"]
    if promotion is None:
        return result
    publish_promotion(promotion)
    if not promotion["promoted"]:
        logger.error("%s", promotion["message"])
        return Failed(message=promotion["message"])
    logger.info("%s", promotion["message"])
    return result
