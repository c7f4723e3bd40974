"""Evaluation: loss and scores of a split, each kind's metrics, thresholds tuned on val, and the tested model card."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from catalog_tagger.config import TaskSpec
from catalog_tagger.kinds import kind_of
from catalog_tagger.model.artifact import ModelCard, card_for
from catalog_tagger.model.inference import autocast
from catalog_tagger.model.multihead import MultiHeadModel
from catalog_tagger.train.config import TrainConfig
from catalog_tagger.train.data import TrainData, model_inputs
from catalog_tagger.train.losses import task_losses
from catalog_tagger.train.split import Split

log = logging.getLogger(__name__)

EVAL_BATCH = 128  # smallest evaluation batch: no gradients, so larger than training's is cheap


@dataclass
class Evaluation:
    """Loss and per-task scores (softmax / sigmoid) of one split."""

    loss: float
    task_loss: dict[str, float]
    scores: dict[str, np.ndarray]  # task -> (N, L) probabilities
    targets: dict[str, np.ndarray]  # task -> targets as in LabelTable

    def metrics(
        self, tasks: Sequence[TaskSpec], thresholds: Mapping[str, Sequence[float]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Each task's metrics over its labelled rows (multilabel: at ``thresholds``, else the task's own)."""
        return {
            t.name: kind_of(t).metrics(t, self.targets[t.name], self.scores[t.name], (thresholds or {}).get(t.name))
            for t in tasks
        }


@torch.inference_mode()
def evaluate(
    model: MultiHeadModel, data: TrainData, idx: np.ndarray, device: torch.device, *, batch_size: int, amp: bool
) -> Evaluation:
    """The model on rows ``idx``, no augmentation: mean loss per task (over labelled rows) and every score."""
    model.eval()
    idx = np.sort(idx)  # scores come back in index order, aligned with the targets below
    tasks = model.tasks.tasks
    sums = {t.name: 0.0 for t in tasks}
    counts = {t.name: 0.0 for t in tasks}
    scores: dict[str, list[np.ndarray]] = {t.name: [] for t in tasks}
    gen = torch.Generator()
    for start in range(0, idx.size, batch_size):
        x, y = data.batch(idx[start : start + batch_size], device)
        with autocast(device, bf16_only=True) if amp else nullcontext():
            out = model(model_inputs(model, x, None, gen))
        for name, (s, c) in task_losses(out.logits, y, tasks).items():
            sums[name] += float(s)
            counts[name] += float(c)
        for t in tasks:
            scores[t.name].append(kind_of(t).activate(out.logits[t.name]).cpu().numpy())
    task_loss = {k: sums[k] / counts[k] if counts[k] else 0.0 for k in sums}
    return Evaluation(
        loss=float(sum(t.weight * task_loss[t.name] for t in tasks)),
        task_loss=task_loss,
        scores={
            t.name: np.concatenate(got) if (got := scores[t.name]) else np.zeros((0, kind_of(t).outputs(t)), np.float32)
            for t in tasks
        },
        targets={t.name: data.targets[t.name][idx] for t in tasks},
    )


def headline_row(metrics: dict[str, dict[str, Any]], tasks: Sequence[TaskSpec], prefix: str) -> dict[str, Any]:
    """``{prefix}{task}_{metric}`` for each kind's headline metrics (the per-epoch columns of metrics.csv)."""
    row: dict[str, Any] = {}
    for task in tasks:
        m = metrics[task.name]
        for k in kind_of(task).headline:
            row[f"{prefix}{task.name}_{k}"] = None if m.get(k) is None else round(float(m[k]), 5)
    return row


def tune_and_test(
    model: MultiHeadModel, data: TrainData, split: Split, cfg: TrainConfig, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
    """Per-label thresholds tuned on val (kinds that have them), then test metrics at those thresholds."""
    tasks = model.tasks.tasks
    bs = max(cfg.batch_size, EVAL_BATCH)
    thresholds: dict[str, list[float]] = {}
    if split.val.size:
        ev = evaluate(model, data, split.val, device, batch_size=bs, amp=cfg.amp)
        for task in tasks:
            tuned = kind_of(task).tune(ev.targets[task.name], ev.scores[task.name])
            if tuned is not None:
                thresholds[task.name] = tuned
    if split.test.size == 0:
        log.warning("no test images: the card has no test metrics")
        return thresholds, {}
    ev = evaluate(model, data, split.test, device, batch_size=bs, amp=cfg.amp)
    metrics = ev.metrics(tasks, thresholds)
    for task in tasks:
        tuned_note = f" (thresholds {thresholds[task.name]})" if task.name in thresholds else ""
        log.info("test %s: %s%s", task.name, kind_of(task).describe(metrics[task.name]), tuned_note)
    return thresholds, metrics


def tested_card(
    model: MultiHeadModel, data: TrainData, split: Split, cfg: TrainConfig, device: torch.device
) -> ModelCard:
    """The model's card with its tuned thresholds and test metrics (``card.metrics``); training facts come later."""
    thresholds, metrics = tune_and_test(model, data, split, cfg, device)
    card = card_for(model, image_size=cfg.size)
    for t in card.tasks:
        if t["name"] in thresholds:
            t["label_thresholds"] = thresholds[t["name"]]
    card.metrics = metrics
    return card
