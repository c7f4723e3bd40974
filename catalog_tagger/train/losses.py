"""The multi-task loss: each kind's per-image loss, masked where a label is missing, then balanced over tasks.

Two balances: ``fixed`` (each task's ``weight`` from tasks.yaml times its mean loss, summed) and ``uncertainty``
(Kendall, Gal & Cipolla 2018: one learned log-variance per task; trained with the model, never saved in it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from catalog_tagger.config import TaskSpec
from catalog_tagger.kinds import kind_of

TaskLosses = dict[str, tuple[torch.Tensor, torch.Tensor]]  # task -> (sum of per-image losses, labelled images)
LossBalanceName = Literal["fixed", "uncertainty"]
# Kinds whose loss is a squared error under a Gaussian likelihood: 1/(2 sigma^2) in front (Kendall et al. eq. 7).
GAUSSIAN_KINDS = frozenset({"regression"})


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
        per, mask = kind_of(task).loss(task, logits[task.name], targets[task.name])
        out[task.name] = ((per * mask).sum(), mask.sum())
    return out


def _mean(part: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One task's mean loss over the batch's labelled images (0 when none is labelled)."""
    s, c = part
    return s / c.clamp(min=1.0)


def combine_losses(parts: TaskLosses, tasks: Sequence[TaskSpec]) -> torch.Tensor:
    """sum over tasks of weight x (mean loss over the batch's labelled images for that task)."""
    total = torch.zeros((), device=next(iter(parts.values()))[0].device)
    for task in tasks:
        total = total + task.weight * _mean(parts[task.name])
    return total


class FixedBalance(nn.Module):
    """The fixed weights of tasks.yaml: ``combine_losses``. No parameters."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.tasks = list(tasks)

    def forward(self, parts: TaskLosses) -> torch.Tensor:
        return combine_losses(parts, self.tasks)

    def weights(self) -> dict[str, float]:
        """The multiplier of each task's mean loss."""
        return {t.name: float(t.weight) for t in self.tasks}

    def log_vars(self) -> dict[str, float] | None:
        return None


class UncertaintyBalance(nn.Module):
    """Uncertainty weighting (Kendall, Gal & Cipolla 2018): per task a learned log-variance s_t, and the loss

        sum_t  c_t * exp(-s_t) * L_t  +  0.5 * s_t

    with c_t = 1 for classification (multiclass, multilabel: a softmax/sigmoid scaled by 1/sigma^2 gives
    approximately (1/sigma^2) CE + log sigma, the paper's eq. 10) and c_t = 0.5 for regression (a Gaussian
    likelihood gives 1/(2 sigma^2) ||y - f||^2 + log sigma, eq. 7); log sigma = 0.5 s_t in both.

    Why the factors matter little: setting d/ds_t = 0 gives c_t exp(-s_t) = 1 / (2 L_t), whatever c_t is. At the
    balance every task's loss is multiplied by 1 / (2 L_t): c_t only moves s_t (by log c_t) and the starting
    point. We use that freedom to start where ``fixed`` starts: s_t is initialised to log(c_t / weight_t), so the
    first steps use the tasks.yaml weights, and the learned balance takes over from there.

    A task with no labelled image in a batch contributes nothing, its regulariser included: otherwise the 0.5 s_t
    term alone would push s_t down (and that task's weight up) on every batch that lacks its labels.
    """

    factor: torch.Tensor  # (T,) c_t, a buffer

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        c = [0.5 if t.kind in GAUSSIAN_KINDS else 1.0 for t in self.tasks]
        self.register_buffer("factor", torch.tensor(c, dtype=torch.float32), persistent=False)
        init = [math.log(ci / t.weight) for ci, t in zip(c, self.tasks, strict=True)]
        self.log_var = nn.Parameter(torch.tensor(init, dtype=torch.float32))

    def forward(self, parts: TaskLosses) -> torch.Tensor:
        total = torch.zeros((), device=self.log_var.device)
        for i, task in enumerate(self.tasks):
            s = self.log_var[i]
            present = (parts[task.name][1] > 0).to(s.dtype)
            total = total + present * (self.factor[i] * torch.exp(-s) * _mean(parts[task.name]).float() + 0.5 * s)
        return total

    def weights(self) -> dict[str, float]:
        """The learned multiplier of each task's mean loss, c_t * exp(-s_t)."""
        w = (self.factor * torch.exp(-self.log_var.detach())).cpu().tolist()
        return {t.name: float(x) for t, x in zip(self.tasks, w, strict=True)}

    def log_vars(self) -> dict[str, float] | None:
        """The learned s_t per task."""
        return {t.name: float(x) for t, x in zip(self.tasks, self.log_var.detach().cpu().tolist(), strict=True)}


LossBalance = FixedBalance | UncertaintyBalance


def make_balance(name: LossBalanceName, tasks: Sequence[TaskSpec]) -> LossBalance:
    """The loss balance ``name`` for ``tasks`` (``uncertainty`` has trainable parameters: optimise them too)."""
    return UncertaintyBalance(tasks) if name == "uncertainty" else FixedBalance(tasks)
