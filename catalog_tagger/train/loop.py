"""The training loop: AdamW epochs over the decoded cache, LR schedule, early stopping, best epoch restored.

The same ``fit`` runs in one process and in every Ray Train worker (``distributed``): ``Dist`` says which rank
this is, each rank trains on its own stride of the epoch's permutation, and rank 0's val loss decides for all.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from catalog_tagger.config import TaskConfig
from catalog_tagger.errors import TrainingDiverged
from catalog_tagger.kinds import kind_of
from catalog_tagger.model.inference import autocast, to_device
from catalog_tagger.model.multihead import MultiHeadModel, build_model
from catalog_tagger.train.config import TrainConfig
from catalog_tagger.train.data import Augment, TrainData, model_inputs
from catalog_tagger.train.evaluate import EVAL_BATCH, evaluate, headline_row
from catalog_tagger.train.losses import TaskLosses, make_balance, task_losses
from catalog_tagger.train.progress import ProgressBar
from catalog_tagger.train.schedule import (
    backbone_mode,
    frozen_in,
    group_lr,
    make_optimizer,
    make_scheduler,
    set_backbone_frozen,
)
from catalog_tagger.train.split import Split

log = logging.getLogger(__name__)

EpochHook = Callable[[dict[str, Any]], None]


@dataclass
class Dist:
    """This process's place in data-parallel training; the default is a single process."""

    rank: int = 0
    world: int = 1

    def broadcast(self, value: float) -> float:
        """Rank 0's value on every rank (so all ranks take the same early-stopping decision)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.broadcast(t, src=0)
        return float(t.item())

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world

    def average_grads(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Average the gradients of parameters that live outside the DDP wrapper (the learned loss balance) over
        all ranks, as DDP does for the model's: every rank then takes the same step and keeps the same values."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.world)


@dataclass
class FitResult:
    history: list[dict[str, Any]]  # one row per epoch (metrics.csv)
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    # the loss balance at the best epoch: {"mode", "weights": task -> multiplier, "log_vars": task -> s_t or None}
    loss_balance: dict[str, Any] = field(default_factory=dict)


def new_model(cfg: TrainConfig, tasks: TaskConfig, device: torch.device) -> MultiHeadModel:
    """A fresh model for ``tasks`` on ``device``, initialised from ``cfg.seed`` (the same on every rank and run)."""
    torch.manual_seed(cfg.seed)
    model = build_model(backbone=cfg.backbone, tasks=tasks, weights=cfg.weights, dropout=cfg.dropout)
    return to_device(model, device)


class _Fit:
    """The state of one ``fit`` call: optimiser, schedule, augmentation stream, and the best epoch so far."""

    def __init__(
        self,
        model: MultiHeadModel,
        net: torch.nn.Module,
        cfg: TrainConfig,
        device: torch.device,
        dist: Dist,
        label: str,
    ) -> None:
        self.model, self.net, self.cfg, self.device, self.dist, self.label = model, net, cfg, device, dist, label
        self.tasks = model.tasks.tasks
        # The learned balance is not part of the model: it never reaches the artifact (its values go to the report).
        self.balance = make_balance(cfg.loss_balance, self.tasks).to(device)
        self.opt = make_optimizer(model, self.balance, cfg)
        self.sched = make_scheduler(self.opt, cfg)
        self.frozen = False
        self.schedule_columns = cfg.freeze_backbone_epochs > 0 or cfg.backbone_lr_factor != 1.0
        self.aug = Augment.of(cfg)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + 17 + dist.rank)
        self.per_rank_batch = max(2, cfg.batch_size // dist.world)
        self.best_loss, self.best_epoch, self.bad = math.inf, 0, 0
        self.best_state = copy.deepcopy(model.state_dict())
        self.best_balance = self.balance_facts()

    def epoch(self, epoch: int, data: TrainData, split: Split, bar: ProgressBar) -> dict[str, Any]:
        """Train one epoch, validate, schedule, keep the best state; the epoch's metrics.csv row (also logged)."""
        t0 = time.perf_counter()
        cfg, has_val = self.cfg, split.val.size > 0
        self.phase(epoch)
        batches = self.batches(split.train, epoch)
        bar.reset(f"{self.label} epoch {epoch}/{cfg.epochs}", len(batches))
        train_loss = self.dist.mean(self.train_epoch(data, batches, bar, epoch))
        self.check_finite("training", train_loss, epoch)  # every rank holds the same mean: all stop together
        row: dict[str, Any] = {"epoch": epoch, "lr": float(f"{group_lr(self.opt, 'heads'):.4g}")}
        if self.schedule_columns:
            row["backbone_lr"] = 0.0 if self.frozen else float(f"{group_lr(self.opt, 'backbone'):.4g}")
        if self.cfg.loss_balance != "fixed":
            row.update({f"loss_weight_{k}": float(f"{v:.4g}") for k, v in self.balance.weights().items()})
        val_loss = train_loss
        columns: dict[str, Any] = {}
        if has_val and self.dist.rank == 0:
            val_loss, columns = self.validate(data, split.val)
        val_loss = self.dist.broadcast(val_loss)
        self.check_finite("validation", val_loss, epoch)
        improved = self.step(epoch, val_loss)
        row.update(
            seconds=round(time.perf_counter() - t0, 2),
            train_loss=round(train_loss, 5),
            val_loss=round(val_loss, 5) if has_val else None,
        )
        row.update(columns)
        log.info(
            "%s epoch %d/%d: train loss %.4f, val loss %s, lr %.2g, %.1fs%s%s", self.label, epoch, cfg.epochs,
            train_loss, f"{val_loss:.4f}" if has_val else "-", row["lr"], row["seconds"], self.headline(columns),
            " *" if improved else "",
        )  # fmt: skip
        return row

    def phase(self, epoch: int) -> None:
        """The transfer-learning schedule: freeze the backbone for the first epochs, then unfreeze it (its LR is the
        backbone group's, ``lr x backbone_lr_factor``). The unfrozen phase starts with a full early-stopping
        patience: epochs of heads-only training that stopped improving say nothing about fine-tuning."""
        frozen = frozen_in(self.cfg, epoch)
        if frozen == self.frozen:
            return
        set_backbone_frozen(self.model, frozen)
        self.frozen = frozen
        if frozen:
            log.info("%s: backbone frozen for epochs 1-%d (heads only)", self.label, self.cfg.freeze_backbone_epochs)
            return
        self.bad = 0
        log.info(
            "%s: backbone unfrozen at epoch %d (lr %.2g, %g x the heads')", self.label, epoch,
            group_lr(self.opt, "backbone"), self.cfg.backbone_lr_factor,
        )  # fmt: skip

    def balance_facts(self) -> dict[str, Any]:
        """The loss balance now: its mode, each task's multiplier and (uncertainty) log-variance."""
        return {"mode": self.cfg.loss_balance, "weights": self.balance.weights(), "log_vars": self.balance.log_vars()}

    def batches(self, train: np.ndarray, epoch: int) -> list[np.ndarray]:
        """This rank's batches of the epoch: every rank draws the same permutation and takes its own stride."""
        world, rank = self.dist.world, self.dist.rank
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(train)
        perm = perm[: (perm.size // world) * world][rank::world]
        # A trailing batch of 1 breaks BatchNorm's batch statistics; fold it into the previous batch.
        bounds = list(range(0, perm.size, self.per_rank_batch))
        if len(bounds) > 1 and perm.size - bounds[-1] < 2:
            bounds.pop()
        return np.split(perm, bounds[1:]) if bounds else []

    def train_epoch(self, data: TrainData, batches: list[np.ndarray], bar: ProgressBar, epoch: int) -> float:
        """One pass of optimiser steps; the mean training loss over this rank's images."""
        self.model.train()
        backbone_mode(self.model, self.frozen)
        loss_sum, loss_n = 0.0, 0
        for step, idx in enumerate(batches, 1):
            x, y = data.batch(idx, self.device)
            with autocast(self.device, bf16_only=True) if self.cfg.amp else nullcontext():
                out = self.net(model_inputs(self.model, x, self.aug, self.gen))
            parts = task_losses(out.logits, y, self.tasks)
            loss: torch.Tensor = self.balance(parts)
            value = float(loss.detach())  # syncs once per step, as the running mean below always did
            if self.dist.world == 1:  # one process: stop before this step spoils the weights (DDP: per epoch)
                self.check_finite("training", value, epoch, step, parts)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            self.dist.average_grads(self.balance.parameters())
            self.opt.step()
            loss_sum += value * idx.size
            loss_n += idx.size
            bar.update(advance=1, info=f"loss {loss_sum / max(loss_n, 1):.4f}")
        return loss_sum / max(loss_n, 1)

    def validate(self, data: TrainData, val: np.ndarray) -> tuple[float, dict[str, Any]]:
        """Val loss and the per-task val columns of metrics.csv (rank 0 evaluates; the loss is broadcast)."""
        bs = max(self.cfg.batch_size, EVAL_BATCH)
        ev = evaluate(self.model, data, val, self.device, batch_size=bs, amp=self.cfg.amp)
        columns = headline_row(ev.metrics(self.tasks), self.tasks, "val_")
        columns.update({f"val_{k}_loss": round(v, 5) for k, v in ev.task_loss.items()})
        return ev.loss, columns

    def step(self, epoch: int, val_loss: float) -> bool:
        """Schedule the LR and keep the best state; True when the epoch improved on the best val loss."""
        if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.sched.step(val_loss)
        else:
            self.sched.step()
        if val_loss < self.best_loss - self.cfg.min_delta:
            self.best_loss, self.best_epoch, self.bad = val_loss, epoch, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
            self.best_balance = self.balance_facts()
            return True
        self.bad += 1
        return False

    def check_finite(
        self, what: str, loss: float, epoch: int, step: int | None = None, parts: TaskLosses | None = None
    ) -> None:
        """Stop with ``TrainingDiverged`` when a loss is NaN or infinite: every later step would only spread it,
        and the "best" epoch restored at the end would be the random initialisation."""
        if math.isfinite(loss):
            return
        where = f"epoch {epoch}" + (f", step {step}" if step is not None else "")
        tasks = [t.name for t in self.tasks if parts is not None and not _finite_part(parts[t.name], t.weight)]
        named = f" (task(s) {', '.join(tasks)})" if tasks else ""
        raise TrainingDiverged(
            f"{self.label}: the {what} loss became {loss} at {where}{named}; lower --lr, check the task weights in "
            "tasks.yaml and the labels; no model artifact was written"
        )

    def headline(self, columns: dict[str, Any]) -> str:
        """The log line's tail: each task's first headline metric on val."""
        keys = [f"{t.name}_{kind_of(t).headline[0]}" for t in self.tasks]
        return "".join(f", {k} {columns[f'val_{k}']:.3f}" for k in keys if columns.get(f"val_{k}") is not None)


def _finite_part(part: tuple[torch.Tensor, torch.Tensor], weight: float) -> bool:
    """Whether one task's weighted mean loss of a batch is finite (``task_losses`` gives its sum and count)."""
    total, n = part
    return math.isfinite(float(weight * total.detach().float() / n.clamp(min=1.0)))


def fit(
    model: MultiHeadModel,
    data: TrainData,
    split: Split,
    cfg: TrainConfig,
    device: torch.device,
    *,
    net: torch.nn.Module | None = None,
    dist: Dist | None = None,
    on_epoch: EpochHook | None = None,
    label: str = "train",
) -> FitResult:
    """Train ``model`` in place on ``split.train`` and restore its best epoch (lowest val loss).

    ``net`` is what the training step calls (a DDP wrapper of ``model`` on Ray); evaluation, early stopping and
    the best-state copy use ``model``. Under DDP every rank draws the same permutation and takes its own
    stride of it, and rank 0's val loss is broadcast so all ranks stop on the same epoch.
    """
    dist = dist or Dist()
    run = _Fit(model, net or model, cfg, device, dist, label)
    if split.val.size == 0:
        log.warning("%s: no validation images; early stopping and LR cuts follow the training loss", label)
    history: list[dict[str, Any]] = []
    steps = math.ceil((split.train.size // dist.world) / run.per_rank_batch)
    bar = ProgressBar(cfg.progress and dist.rank == 0, f"{label} epoch 1/{cfg.epochs}", steps)
    epoch, stopped = 0, False
    try:
        for epoch in range(1, cfg.epochs + 1):
            history.append(run.epoch(epoch, data, split, bar))
            if on_epoch is not None:
                on_epoch(history[-1])
            if run.bad >= cfg.patience and not run.frozen:
                stopped = True
                log.info("%s: early stop after epoch %d (best epoch %d)", label, epoch, run.best_epoch)
                break
    finally:
        bar.close()
        set_backbone_frozen(model, False)  # the model leaves ``fit`` whole, whatever epoch it ended in
    model.load_state_dict(run.best_state)
    return FitResult(
        history=history,
        best_epoch=run.best_epoch,
        epochs_run=epoch,
        stopped_early=stopped,
        loss_balance=run.best_balance,
    )
