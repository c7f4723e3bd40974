"""Training as a Prefect flow: validate ``TrainParams``, call ``catalog_tagger.train``, publish the metrics."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.nightly import TRANSIENT_RETRY, flow_run_namer
from flows.params import TrainParams

# A retry restarts training from scratch: one is enough for a storage hiccup while reading labels or images.
TRAIN_RETRY = {**TRANSIENT_RETRY, "retries": 1}


@task(name="train", **TRAIN_RETRY)
def train_task(params: TrainParams) -> dict[str, Any]:
    """Train and save the artifact; return a JSON-able summary (the artifact itself is the result)."""
    from catalog_tagger.train.loop import train

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


def metrics_table(metrics: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    keys = ("accuracy", "macro_f1", "micro_f1", "map")
    return [
        {"task": name, "metric": k, "value": m[k]} for name, m in metrics.items() for k in keys if m.get(k) is not None
    ]


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
    params = TrainParams.parse(
        "train_model",
        tasks=tasks,
        labels=labels,
        out=out,
        backbone=backbone,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        patience=patience,
        workers=workers,
        ray_address=ray_address,
        seed=seed,
        single_task=single_task,
        max_images=max_images,
        device=device,
    )
    params.train_config()  # the library's own checks, before any image is read
    result = train_task(params)
    create_table_artifact(
        key="train-metrics", table=metrics_table(result["metrics"]), description=f"Test metrics of {result['out']}"
    )
    md = [
        f"# Trained `{result['out']}` (version `{result['model_version']}`)",
        "",
        f"{result['images_used']:,} images ({result['skipped']} skipped), best epoch {result['best_epoch']}/"
        f"{result['epochs_run']}, {result['seconds']:.0f} s.",
    ]
    if result["comparison"]:
        c = result["comparison"]
        md.append(f"Measured multi-head vs {c['n_tasks']} single-task models: cost ratio {c['cost_ratio']:.2f}x.")
    create_markdown_artifact(key="train-summary", markdown="\n".join(md) + "\n")
    get_run_logger().info("trained %s (version %s)", result["out"], result["model_version"])
    return result
