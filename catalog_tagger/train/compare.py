"""``--single-task``: one model per task on the same split, at two budgets, then quality, size and measured speed.

Two budgets, because "n single-task models match one multi-head model" means little if the single models got n
times the training:

- **equal epochs** (``single_task``): each single model gets the joint model's ``epochs`` (an upper bound; early
  stopping applies). The n models together train n times as many steps as the joint one.
- **equal compute** (``equal_compute``): the n single models together get the joint model's training budget: each
  trains ``ceil(joint epochs run / n)`` epochs (rounding up favours the single models; the steps and measured
  seconds of every model are recorded, so the real ratio is in comparison.json next to the metrics).

The inference speed is measured, not assumed: every model runs on the same batch of held-out images, interleaved, in
this process (``calibration.time_interleaved``, the timer the tagging job's calibration uses too).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
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
EQUAL_COMPUTE_DIR = "single_task_equal_compute"  # the equal-compute single models, one artifact per task


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


def steps_per_epoch(train_images: int, batch_size: int) -> int:
    """Optimiser steps of one epoch over ``train_images`` (one process; a trailing batch of 1 is folded in, as
    ``loop.fit`` does)."""
    steps = math.ceil(train_images / batch_size)
    return steps - 1 if steps > 1 and train_images - (steps - 1) * batch_size < 2 else steps


@dataclass(frozen=True)
class JointBudget:
    """What the joint (multi-head) model's fit spent: the budget the equal-compute single models share."""

    epochs: int  # epochs run (early stopping included)
    seconds: float  # wall seconds of the fit (training and per-epoch validation)


@dataclass
class _Single:
    """One task's single-head model, its test metrics and what its training cost."""

    model: MultiHeadModel
    metrics: dict[str, Any]
    epochs: int  # epochs run
    steps: int  # optimiser steps
    seconds: float  # wall seconds of the fit


def _train_single(
    cfg: TrainConfig, task: TaskSpec, data: TrainData, split: Split, device: torch.device, *, folder: str, label: str
) -> _Single:
    """One single-head model of ``task``, trained and tested like the multi-head one and saved under ``folder``."""
    model = new_model(cfg, TaskConfig(tasks=(task,)), device)
    t0 = time.perf_counter()
    res = fit(model, data, split, cfg, device, label=f"{label} {task.name}")
    seconds = time.perf_counter() - t0
    card = tested_card(model, data, split, cfg, device)
    card.training = {
        "single_task_of": cfg.out,
        "epochs": {"max": cfg.epochs, "run": res.epochs_run, "best": res.best_epoch},
    }
    save_artifact(model.cpu(), card, join(cfg.out, folder, task.name))
    model.to(device)
    steps = res.epochs_run * steps_per_epoch(split.train.size, cfg.batch_size)
    return _Single(
        model=model, metrics=card.metrics.get(task.name, {}), epochs=res.epochs_run, steps=steps, seconds=seconds
    )


def equal_compute_epochs(joint_epochs: int, n_tasks: int) -> int:
    """Epochs of each equal-compute single model: the joint model's epochs run split over the n tasks, rounded up."""
    return max(1, math.ceil(joint_epochs / n_tasks))


def compare_single_task(
    cfg: TrainConfig,
    tasks: TaskConfig,
    multi: MultiHeadModel,
    multi_metrics: dict[str, dict[str, Any]],
    data: TrainData,
    split: Split,
    device: torch.device,
    joint: JointBudget,
) -> dict[str, Any]:
    """Train one single-head model per task at equal epochs and at equal compute (same backbone and split), then
    compare quality, size and speed."""
    singles = {
        t.name: _train_single(cfg, t, data, split, device, folder=SINGLE_TASK_DIR, label="single-task")
        for t in tasks.tasks
    }
    compute_epochs = equal_compute_epochs(joint.epochs, len(tasks.tasks))
    if compute_epochs == cfg.epochs:  # the same training as equal epochs (same seed): not run twice
        budget = singles
    else:
        small = cfg.model_copy(update={"epochs": compute_epochs})
        budget = {
            t.name: _train_single(small, t, data, split, device, folder=EQUAL_COMPUTE_DIR, label="equal-compute")
            for t in tasks.tasks
        }
    batch = data.images[np.sort(split.held_out())[: cfg.batch_size]]
    models = {MULTI: multi, **{name: s.model for name, s in singles.items()}}
    ms = time_models(models, batch, device, repeats=cfg.timing_repeats)
    per_task = {
        t.name: _task_entry(t, multi_metrics.get(t.name, {}), singles[t.name], budget[t.name], ms[t.name])
        for t in tasks.tasks
    }
    comparison = _summary(cfg, tasks, multi, per_task, ms, batch.shape[0], device)
    joint_steps = joint.epochs * steps_per_epoch(split.train.size, cfg.batch_size)
    comparison["budgets"] = {
        "joint": {"epochs": joint.epochs, "steps": joint_steps, "seconds": round(joint.seconds, 2)},
        "equal_epochs": _budget(cfg.epochs, singles, joint_steps, joint.seconds),
        "equal_compute": _budget(compute_epochs, budget, joint_steps, joint.seconds),
    }
    _log_comparison(comparison)
    return comparison


def _budget(epochs: int, singles: dict[str, _Single], joint_steps: int, joint_seconds: float) -> dict[str, Any]:
    """One budget's totals over the n single models, and their ratio to the joint model's fit."""
    steps = sum(s.steps for s in singles.values())
    seconds = sum(s.seconds for s in singles.values())
    return {
        "epochs_per_model": epochs,
        "steps": steps,
        "seconds": round(seconds, 2),
        "steps_ratio": round(steps / max(joint_steps, 1), 3),  # n single models' steps / the joint model's
        "seconds_ratio": round(seconds / max(joint_seconds, 1e-9), 3),  # measured training seconds, same ratio
    }


def _task_entry(task: TaskSpec, multi: dict[str, Any], single: _Single, budget: _Single, ms: float) -> dict[str, Any]:
    """One task in comparison.json: the kind's headline metric of the multi-head model and of the single model at
    equal epochs (``single_task``) and at equal compute (``equal_compute``); the single model's size and speed."""
    key = kind_of(task).headline[0]
    return {
        "kind": task.kind,
        "metric": key,
        "higher_is_better": kind_of(task).higher_is_better,  # False for an error (a regression task's MAE)
        "multi_head": multi.get(key),
        "single_task": single.metrics.get(key),
        "single_task_parameters": count_parameters(single.model),
        "single_task_ms_per_image": round(ms, 4),
        "single_task_epochs": single.epochs,
        "single_task_steps": single.steps,
        "single_task_train_seconds": round(single.seconds, 2),
        "equal_compute": {
            "metric": budget.metrics.get(key),
            "epochs": budget.epochs,
            "steps": budget.steps,
            "train_seconds": round(budget.seconds, 2),
            "metrics": _headline_metrics(budget.metrics),
        },
        "multi_head_metrics": _headline_metrics(multi),
        "single_task_metrics": _headline_metrics(single.metrics),
    }


def _headline_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "per_label"}


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


def _log_comparison(c: dict[str, Any]) -> None:
    """Both budgets in the log: each task's metric, then the training cost of each budget against the joint fit."""
    b = c["budgets"]
    for name, t in c["tasks"].items():
        log.info(
            "single-task %s %s: multi-head %s, single at equal epochs %s, single at equal compute %s",
            name, t["metric"], format_metric(t["multi_head"]), format_metric(t["single_task"]),
            format_metric(t["equal_compute"]["metric"]),
        )  # fmt: skip
    for key in ("equal_epochs", "equal_compute"):
        log.info(
            "single-task %s: %d epoch(s) per model, %d steps and %.1fs in all = %.2fx the joint model's steps, "
            "%.2fx its measured training seconds",
            key.replace("_", " "), b[key]["epochs_per_model"], b[key]["steps"], b[key]["seconds"],
            b[key]["steps_ratio"], b[key]["seconds_ratio"],
        )  # fmt: skip
    log.info(
        "single-task comparison: %d tasks, measured inference cost ratio %.2f (sum of single-task ms / multi-head ms)",
        c["n_tasks"],
        c["cost_ratio"],
    )


def iter_comparison_rows(comparison: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """Rows for the console table: task, metric, multi-head, single-task (equal epochs, then equal compute),
    single-task params, ms/image."""
    for name, t in comparison["tasks"].items():
        compute = (t.get("equal_compute") or {}).get("metric")
        yield (
            name,
            t["metric"],
            format_metric(t["multi_head"]),
            f"{format_metric(t['single_task'])} (equal compute {format_metric(compute)})",
            f"{t['single_task_parameters']:,}",
            f"{t['single_task_ms_per_image']:.3f}",
        )
