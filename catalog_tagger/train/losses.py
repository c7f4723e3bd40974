"""The multi-task loss: each kind's per-image loss, masked where a label is missing, weighted and summed over tasks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from catalog_tagger.config import TaskSpec
from catalog_tagger.kinds import kind_of

TaskLosses = dict[str, tuple[torch.Tensor, torch.Tensor]]  # task -> (sum of per-image losses, labelled images)


def task_losses(
    logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], tasks: Sequence[TaskSpec]
) -> TaskLosses:
    """Per task: (sum of per-image losses over labelled images, number of labelled images).

    The per-image loss is the kind's (cross-entropy for multiclass, BCE-with-logits summed over labels for
    multilabel). A missing label multiplies that image's loss by 0: no imputation, and exactly zero gradient from
    it. Keeping every head in the graph (rather than dropping unlabelled rows) also keeps DDP's gradient buckets
    identical on every worker.
    """
    out: TaskLosses = {}
    for task in tasks:
        per, mask = kind_of(task).loss(logits[task.name], targets[task.name])
        out[task.name] = ((per * mask).sum(), mask.sum())
    return out


def combine_losses(parts: TaskLosses, tasks: Sequence[TaskSpec]) -> torch.Tensor:
    """sum over tasks of weight x (mean loss over the batch's labelled images for that task)."""
    total = torch.zeros((), device=next(iter(parts.values()))[0].device)
    for task in tasks:
        s, c = parts[task.name]
        total = total + task.weight * s / c.clamp(min=1.0)
    return total
