"""``train(cfg)``: validate, decode once, split, fit, tune thresholds, test, and save the artifact and its side files.

Data flow: labels table + tasks.yaml are validated before any work -> every image is read and decoded ONCE
(``data.decode_all``) -> a seeded stratified split (``split``) -> epochs over the cache (``loop.fit``, or the
same loop on Ray Train workers: ``distributed``) -> best epoch restored -> thresholds tuned on val, metrics on
test (``evaluate``) -> ``save_artifact`` plus split.parquet, metrics.csv and training_report.json (``outputs``)
-> with ``--single-task``, one model per task and comparison.json (``compare``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from catalog_tagger.config import TaskConfig, load_tasks
from catalog_tagger.errors import UserError
from catalog_tagger.model.artifact import ModelCard, save_artifact
from catalog_tagger.model.backbones import backbone_provider, get_backbone
from catalog_tagger.model.inference import select_device, to_device
from catalog_tagger.model.multihead import MultiHeadModel
from catalog_tagger.model.weights import CARD_FILE
from catalog_tagger.storage import filesystem, join, strip
from catalog_tagger.train.compare import JointBudget, compare_single_task
from catalog_tagger.train.config import TrainConfig
from catalog_tagger.train.data import TrainData, colour_tasks, decode_all
from catalog_tagger.train.evaluate import tested_card
from catalog_tagger.train.labels import LabelTable, labelled_counts, load_labels, log_label_counts
from catalog_tagger.train.loop import FitResult, fit, new_model
from catalog_tagger.train.outputs import (
    COMPARISON_FILE,
    METRICS_FILE,
    REPORT_FILE,
    SPLIT_FILE,
    metrics_csv,
    split_parquet,
    write_file,
    write_json,
)
from catalog_tagger.train.progress import ProgressBar
from catalog_tagger.train.promote import check_current, promotion_gate
from catalog_tagger.train.split import Split, make_split, split_digest

log = logging.getLogger(__name__)

MIN_IMAGES = 3  # fewer decoded images than this cannot make a train/val/test split
SHOW_SKIPPED = 10  # skipped images logged one by one; all of them are in training_report.json


@dataclass
class TrainResult:
    """What a training run produced; ``card`` is the saved model card."""

    out: str  # the artifact directory
    card: ModelCard
    metrics: dict[str, dict[str, Any]]  # test metrics per task (also in card.metrics)
    history: list[dict[str, Any]]  # one row per epoch (also metrics.csv)
    best_epoch: int
    epochs_run: int
    images_used: int
    skipped: list[dict[str, str]]  # {"uri", "error"} of images that could not be read or decoded
    seconds: float
    comparison: dict[str, Any] | None = None  # --single-task: comparison.json
    promotion: dict[str, Any] | None = None  # --promote-to: the gate's decision (promote.Gate.to_dict)


@dataclass
class Decoded:
    """What decoding left to train on: the readable rows of the table and their pixels."""

    table: LabelTable  # the rows that decoded
    data: TrainData
    rows: int  # rows of the (validated, deduplicated, --max-images) table
    skipped: list[dict[str, str]]
    seconds: float

    @property
    def images(self) -> dict[str, int]:
        return {"rows": self.rows, "used": len(self.table), "skipped": len(self.skipped)}


def resolve(cfg: TrainConfig) -> TrainConfig:
    """The config with defaults that depend on other fields filled in (image size: the backbone's default)."""
    spec = get_backbone(cfg.backbone)
    size = cfg.image_size or spec.default_image_size
    if size < spec.min_image_size:
        raise UserError(f"image size {size} is below {cfg.backbone}'s minimum of {spec.min_image_size} px")
    if size > spec.max_image_size:
        raise UserError(f"image size {size} is above {cfg.backbone}'s maximum of {spec.max_image_size} px")
    return cfg if cfg.image_size == size else cfg.model_copy(update={"image_size": size})


def validate(cfg: TrainConfig) -> tuple[TaskConfig, LabelTable]:
    """Every check that needs no image: tasks, backbone, sizes, augmentation vs tasks, and the labels table."""
    tasks = load_tasks(cfg.tasks)
    resolve(cfg)
    if cfg.color_jitter > 0:
        named = colour_tasks(tasks)
        if named:
            raise UserError(
                f"colour jitter ({cfg.color_jitter}) would destroy the labels of colour task(s) {', '.join(named)}: "
                "set color_jitter to 0 (the default) for this task set"
            )
    table = load_labels(cfg.labels, tasks, cfg.storage_options)
    if cfg.max_images is not None and cfg.max_images < len(table):
        table = table.subset(np.arange(cfg.max_images))
    log_label_counts(table, tasks, cfg.labels.rsplit("/", 1)[-1])
    return tasks, table


def prepare(cfg: TrainConfig) -> tuple[TrainConfig, TaskConfig, LabelTable, torch.device]:
    """Resolve and validate ``cfg``, choose the device and torch's threads: all before any image is read."""
    cfg = resolve(cfg)
    tasks, table = validate(cfg)
    check_current(cfg)  # a current model the promotion gate could not read: refused before training
    device = select_device(cfg.device)
    if filesystem(cfg.out, cfg.storage_options).exists(strip(join(cfg.out, CARD_FILE))):
        log.warning("%s already holds a model artifact: it will be overwritten", cfg.out)
    torch.set_num_threads(cfg.torch_threads)
    log.info(
        "train: %d images, %d tasks (%s), backbone %s at %d px, device %s, %d thread(s)", len(table), len(tasks.tasks),
        ", ".join(tasks.names), cfg.backbone, cfg.size, device, torch.get_num_threads(),
    )  # fmt: skip
    return cfg, tasks, table, device


def decode(cfg: TrainConfig, table: LabelTable) -> Decoded:
    """Decode every image once, with the serving preprocessing, into memory; unreadable ones are skipped."""
    t0 = time.perf_counter()
    bar = ProgressBar(cfg.progress, "decode", len(table))
    try:
        cache, ok, skipped = decode_all(
            table.uris,
            cfg.size,
            threads=cfg.decode_threads,
            storage_options=cfg.storage_options,
            on_done=lambda k: bar.update(completed=k),
        )
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    for s in skipped[:SHOW_SKIPPED]:
        log.warning("skipped %s: %s", s["uri"], s["error"])
    if len(skipped) > SHOW_SKIPPED:
        log.warning("... and %d more skipped images (all listed in %s)", len(skipped) - SHOW_SKIPPED, REPORT_FILE)
    keep = np.flatnonzero(ok)
    if keep.size < MIN_IMAGES:
        raise UserError(f"{cfg.labels}: only {keep.size} of {len(table)} images could be read and decoded")
    kept = table.subset(keep)
    log.info(
        "decoded %d images in %.1fs (%.0f img/s); %d skipped",
        keep.size,
        seconds,
        len(ok) / max(seconds, 1e-9),
        len(skipped),
    )
    data = TrainData(images=cache[keep], targets=kept.targets)
    return Decoded(table=kept, data=data, rows=len(ok), skipped=skipped, seconds=seconds)


def fit_model(
    cfg: TrainConfig, tasks: TaskConfig, data: TrainData, split: Split, device: torch.device
) -> tuple[MultiHeadModel, FitResult]:
    """The trained model (best epoch) on ``device``, fitted here or on Ray Train; metrics.csv grows as it goes."""
    if cfg.distributed:
        from catalog_tagger.train.distributed import fit_on_ray

        model, res = fit_on_ray(cfg, tasks, data, split)
        write_file(cfg.out, METRICS_FILE, metrics_csv(res.history), cfg.storage_options)
        return to_device(model, device), res
    model = new_model(cfg, tasks, device)
    history: list[dict[str, Any]] = []

    def log_epoch(row: dict[str, Any]) -> None:
        history.append(row)
        write_file(cfg.out, METRICS_FILE, metrics_csv(history), cfg.storage_options)

    return model, fit(model, data, split, cfg, device, on_epoch=log_epoch)


def training_facts(
    cfg: TrainConfig, tasks: TaskConfig, decoded: Decoded, split: Split, res: FitResult, device: torch.device
) -> dict[str, Any]:
    """``card.training``: what the model was trained on and how, enough to reproduce or audit the run."""
    return {
        "labels": cfg.labels,
        "images": decoded.images,
        "skipped_images": len(decoded.skipped),
        "labelled": labelled_counts(decoded.table, tasks),
        "split": {
            "fractions": split.fractions,
            "seed": split.seed,
            "stratify": split.stratify,
            "counts": split.counts(),
            "file": SPLIT_FILE,
            "sha256": split_digest(decoded.table.uris, split.names(len(decoded.table))),
        },
        "epochs": {"max": cfg.epochs, "run": res.epochs_run, "best": res.best_epoch},
        "stopped_early": res.stopped_early,
        "optimizer": {"name": "AdamW", "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        "scheduler": cfg.scheduler,
        "backbone": {"name": cfg.backbone, "weights": cfg.weights, **backbone_provider(cfg.backbone)},
        "transfer": {
            "freeze_backbone_epochs": cfg.freeze_backbone_epochs,
            "backbone_lr_factor": cfg.backbone_lr_factor,
        },
        "loss_balance": cfg.loss_balance,  # the learned weights are in training_report.json, not in the artifact
        "batch_size": cfg.batch_size,
        "augment": {"crop_scale": list(cfg.crop_scale), "hflip": cfg.hflip, "color_jitter": cfg.color_jitter},
        "workers": cfg.workers,
        "device": str(device),
        "seed": cfg.seed,
    }


def train(cfg: TrainConfig) -> TrainResult:
    """Validate, decode once, split, fit, tune thresholds on val, measure on test, and save the artifact."""
    t_start = time.perf_counter()
    cfg, tasks, table, device = prepare(cfg)
    decoded = decode(cfg, table)
    split = make_split(tasks, decoded.table.targets, val=cfg.val_fraction, test=cfg.test_fraction, seed=cfg.seed)
    names = split.names(len(decoded.table))
    write_file(cfg.out, SPLIT_FILE, split_parquet(decoded.table.uris, names), cfg.storage_options)
    log.info("split %s (stratified on %s, seed %d)", split.counts(), split.stratify, split.seed)

    t0 = time.perf_counter()
    model, res = fit_model(cfg, tasks, decoded.data, split, device)
    timings = {"decode": round(decoded.seconds, 2), "fit": round(time.perf_counter() - t0, 2)}
    card = tested_card(model, decoded.data, split, cfg, device)
    metrics = card.metrics
    card.training = {**training_facts(cfg, tasks, decoded, split, res, device), "seconds": timings}
    card = save_artifact(model.cpu(), card, cfg.out)
    model.to(device)
    log.info("saved model artifact %s (version %s)", cfg.out, card.version)

    comparison = None
    if cfg.single_task:
        joint = JointBudget(epochs=res.epochs_run, seconds=timings["fit"])
        comparison = compare_single_task(cfg, tasks, model, metrics, decoded.data, split, device, joint)
        write_json(cfg.out, COMPARISON_FILE, comparison, cfg.storage_options)
    promotion = promotion_gate(cfg, card, decoded.data, split.test, device)  # after the artifact and its files
    seconds = time.perf_counter() - t_start
    report = {
        "labels": cfg.labels,
        "images": decoded.images,
        "skipped": decoded.skipped,
        "labelled": card.training["labelled"],
        "split": split.counts(),
        "epochs_run": res.epochs_run,
        "best_epoch": res.best_epoch,
        "loss_balance": res.loss_balance,  # mode, and each task's loss multiplier at the best epoch
        "test_metrics": metrics,
        "model_version": card.version,
        "promotion": promotion,
        "seconds": {**timings, "total": round(seconds, 2)},
        "config": cfg.model_dump(mode="json", exclude={"storage_options"}),
    }
    write_json(cfg.out, REPORT_FILE, report, cfg.storage_options)
    log.info("training finished in %.1fs", seconds)
    return TrainResult(
        out=cfg.out,
        card=card,
        metrics=metrics,
        history=res.history,
        best_epoch=res.best_epoch,
        epochs_run=res.epochs_run,
        images_used=len(decoded.table),
        skipped=decoded.skipped,
        seconds=seconds,
        comparison=comparison,
        promotion=promotion,
    )
