"""``--single-task``: one model per task on the same split and budget, then quality, size and measured speed compared.

The speed is measured, not assumed: every model runs on the same batch of held-out images, interleaved, in this
process (``calibration.time_interleaved``, the timer the tagging job's calibration uses too).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from catalog_tagger.calibration import time_interleaved
from catalog_tagger.config import TaskConfig, TaskSpec
from catalog_tagger.kinds import format_metric, kind_of
from catalog_tagger.model.artifact import save_artifact
from catalog_tagger.model.multihead import MultiHeadModel, count_parameters
from catalog_tagger.storage import join
from catalog_tagger.train.config import TrainConfig
from catalog_tagger.train.data import TrainData, model_inputs
from catalog_tagger.train.evaluate import tested_card
from catalog_tagger.train.loop import fit, new_model
from catalog_tagger.train.outputs import SINGLE_TASK_DIR
from catalog_tagger.train.split import Split

log = logging.getLogger(__name__)

MULTI = "__multi__"  # the multi-head model's key among the timed models (task names are identifiers)
TIMING_WARMUP = 2  # untimed passes per model first: allocator, kernels, oneDNN primitive caches


def time_models(
    models: dict[str, MultiHeadModel], images: np.ndarray, device: torch.device, *, repeats: int
) -> dict[str, float]:
    """Median ms/image of each model's forward pass on the same batch, measured interleaved in this process."""
    x = torch.from_numpy(images).to(device)
    gen = torch.Generator()
    runs: list[Callable[[], object]] = [partial(m, model_inputs(m.eval(), x, None, gen)) for m in models.values()]
    with torch.inference_mode():
        seconds = time_interleaved(runs, device, repeats=repeats, warmup=TIMING_WARMUP)
    return {k: statistics.median(s) * 1000 / images.shape[0] for k, s in zip(models, seconds, strict=True)}


@dataclass
class _Single:
    """One task's single-head model, its test metrics and the epochs it trained."""

    model: MultiHeadModel
    metrics: dict[str, Any]
    epochs: int


def _train_single(cfg: TrainConfig, task: TaskSpec, data: TrainData, split: Split, device: torch.device) -> _Single:
    """One single-head model of ``task``, trained and tested like the multi-head one and saved beside it."""
    model = new_model(cfg, TaskConfig(tasks=(task,)), device)
    res = fit(model, data, split, cfg, device, label=f"single-task {task.name}")
    card = tested_card(model, data, split, cfg, device)
    card.training = {"single_task_of": cfg.out, "epochs": {"run": res.epochs_run, "best": res.best_epoch}}
    save_artifact(model.cpu(), card, join(cfg.out, SINGLE_TASK_DIR, task.name))
    model.to(device)
    return _Single(model=model, metrics=card.metrics.get(task.name, {}), epochs=res.epochs_run)


def compare_single_task(
    cfg: TrainConfig,
    tasks: TaskConfig,
    multi: MultiHeadModel,
    multi_metrics: dict[str, dict[str, Any]],
    data: TrainData,
    split: Split,
    device: torch.device,
) -> dict[str, Any]:
    """Train one single-head model per task (same backbone, budget, split), then compare quality, size and speed."""
    singles = {t.name: _train_single(cfg, t, data, split, device) for t in tasks.tasks}
    batch = data.images[np.sort(split.held_out())[: cfg.batch_size]]
    models = {MULTI: multi, **{name: s.model for name, s in singles.items()}}
    ms = time_models(models, batch, device, repeats=cfg.timing_repeats)
    per_task = {t.name: _task_entry(t, multi_metrics.get(t.name, {}), singles[t.name], ms[t.name]) for t in tasks.tasks}
    comparison = _summary(cfg, tasks, multi, per_task, ms, batch.shape[0], device)
    log.info(
        "single-task comparison: %d tasks, measured cost ratio %.2f (sum of single-task ms / multi-head ms)",
        len(tasks.tasks),
        comparison["cost_ratio"],
    )
    return comparison


def _task_entry(task: TaskSpec, multi: dict[str, Any], single: _Single, ms: float) -> dict[str, Any]:
    """One task in comparison.json: the kind's headline metric of both models, the single model's size and speed."""
    key = kind_of(task).headline[0]
    return {
        "kind": task.kind,
        "metric": key,
        "multi_head": multi.get(key),
        "single_task": single.metrics.get(key),
        "single_task_parameters": count_parameters(single.model),
        "single_task_ms_per_image": round(ms, 4),
        "single_task_epochs": single.epochs,
        "multi_head_metrics": {k: v for k, v in multi.items() if k != "per_label"},
        "single_task_metrics": {k: v for k, v in single.metrics.items() if k != "per_label"},
    }


def _summary(
    cfg: TrainConfig,
    tasks: TaskConfig,
    multi: MultiHeadModel,
    per_task: dict[str, Any],
    ms: dict[str, float],
    batch: int,
    device: torch.device,
) -> dict[str, Any]:
    """comparison.json: sizes and measured speeds of the multi-head model vs all single-task models together."""
    multi_params = count_parameters(multi)
    single_ms = sum(ms[t.name] for t in tasks.tasks)
    single_params = sum(v["single_task_parameters"] for v in per_task.values())
    return {
        "n_tasks": len(tasks.tasks),
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "timing": {"batch_size": batch, "repeats": cfg.timing_repeats, "statistic": "median"},
        "multi_head": {"parameters": multi_params, "ms_per_image": round(ms[MULTI], 4)},
        "single_task_total": {"parameters": single_params, "ms_per_image": round(single_ms, 4)},
        "cost_ratio": round(single_ms / ms[MULTI], 3),
        "parameter_ratio": round(single_params / multi_params, 3),
        "tasks": per_task,
    }


def iter_comparison_rows(comparison: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """Rows for the console table: task, metric, multi-head, single-task, single-task params, ms/image."""
    for name, t in comparison["tasks"].items():
        yield (
            name,
            t["metric"],
            format_metric(t["multi_head"]),
            format_metric(t["single_task"]),
            f"{t['single_task_parameters']:,}",
            f"{t['single_task_ms_per_image']:.3f}",
        )
