"""The optimiser's parameter groups, the LR schedule, and the transfer-learning schedule (frozen, then unfrozen).

Groups: ``heads`` at ``lr``, ``backbone`` at ``lr x backbone_lr_factor`` (lower when fine-tuning pretrained
weights), and ``balance`` (the learned loss balance, without weight decay). The LR schedules scale every group by
the same factor, so the backbone keeps its ratio to the heads through cosine decay and plateau cuts.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from catalog_tagger.model.multihead import MultiHeadModel
from catalog_tagger.train.config import TrainConfig

log = logging.getLogger(__name__)

COSINE_FLOOR = 0.01  # cosine decays each group's LR to 1% of its start
# The learned log-variances' LR. They are log-weights: an Adam step moves a task's weight by about this fraction,
# whatever the model's LR. At the model's LR (2e-3) a few hundred steps move a weight by less than 2x, short of
# the balance (1 / (2 L_t): 100x apart for a regression loss of 0.005 next to a cross-entropy of 0.5).
BALANCE_LR = 0.02


def make_optimizer(model: MultiHeadModel, balance: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over three named groups: heads (and anything else outside the backbone), backbone, loss balance."""
    backbone = list(model.backbone.parameters())
    mine = {id(p) for p in backbone}
    heads = [p for p in model.parameters() if id(p) not in mine]
    groups: list[dict[str, Any]] = [
        {"params": heads, "lr": cfg.lr, "name": "heads"},
        {"params": backbone, "lr": cfg.lr * cfg.backbone_lr_factor, "name": "backbone"},
    ]
    extra = list(balance.parameters())
    if extra:
        # Weight decay would pull every log-variance towards 0, i.e. towards weight 1: not a prior we want.
        groups.append({"params": extra, "lr": BALANCE_LR, "weight_decay": 0.0, "name": "balance"})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing over ``cfg.epochs`` down to 1% of each group's LR (default), or ReduceLROnPlateau on val
    loss. Cosine is written as a factor (LambdaLR) rather than CosineAnnealingLR, whose single ``eta_min`` would sit
    above a backbone group started at less than 1% of the heads' LR, and make its LR rise."""
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt,
            mode="min",
            factor=cfg.plateau_factor,
            patience=cfg.plateau_patience,
            threshold=cfg.min_delta,
            threshold_mode="abs",
        )
    period = cfg.epochs

    def cosine(step: int) -> float:
        return COSINE_FLOOR + (1 - COSINE_FLOOR) * (1 + math.cos(math.pi * min(step, period) / period)) / 2

    return torch.optim.lr_scheduler.LambdaLR(opt, cosine)


def group_lr(opt: torch.optim.Optimizer, name: str) -> float:
    """The current LR of the group ``name``."""
    return float(next(g["lr"] for g in opt.param_groups if g.get("name") == name))


def frozen_in(cfg: TrainConfig, epoch: int) -> bool:
    """Whether the backbone is frozen during ``epoch`` (1-based): the first ``freeze_backbone_epochs``."""
    return epoch <= cfg.freeze_backbone_epochs


def set_backbone_frozen(model: MultiHeadModel, frozen: bool) -> None:
    """Freeze (or unfreeze) the backbone's parameters: no gradient, so AdamW leaves them (and its state) untouched,
    and no backward pass through the trunk (the point of the frozen phase: it is cheap). Under DDP the model is
    wrapped with ``find_unused_parameters`` so the reducer accepts the parameters without gradients."""
    for p in model.backbone.parameters():
        p.requires_grad_(not frozen)


def backbone_mode(model: MultiHeadModel, frozen: bool) -> None:
    """Put a frozen backbone in eval mode after ``model.train()``: BatchNorm keeps its running statistics (the
    pretrained ones) instead of drifting to the new data, as Keras does for a frozen base model."""
    if frozen:
        model.backbone.eval()
