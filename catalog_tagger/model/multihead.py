"""The multi-head model: one shared backbone (``forward_features``), one linear head per task (``forward_head``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from catalog_tagger.config import TaskConfig
from catalog_tagger.errors import ArtifactError
from catalog_tagger.kinds import kind_of
from catalog_tagger.model.backbones import IMAGENET_MEAN, IMAGENET_STD, get_backbone
from catalog_tagger.model.weights import adapt_state, find_pretrained

log = logging.getLogger(__name__)


@dataclass
class ModelOutput:
    """What one forward pass returns: the shared embedding and every head's logits."""

    embedding: torch.Tensor  # (B, D)
    logits: dict[str, torch.Tensor]  # task name -> (B, n_labels); (B, 1) for a regression task


class MultiHeadModel(nn.Module):
    """Shared backbone (``forward_features``) + one linear head per task (``forward_head``)."""

    mean: torch.Tensor  # (1, 3, 1, 1) buffers, registered in __init__
    std: torch.Tensor

    def __init__(
        self,
        *,
        backbone: str,
        tasks: TaskConfig,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        spec = get_backbone(backbone)
        self.backbone_name = backbone
        self.tasks = tasks
        self.embedding_dim = spec.embedding_dim
        self.backbone = spec.build()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        heads = {t.name: nn.Linear(spec.embedding_dim, kind_of(t).outputs(t)) for t in tasks.tasks}
        for t in tasks.tasks:
            kind_of(t).init_head(t, heads[t.name])
        self.heads = nn.ModuleDict(heads)
        # Normalisation lives with the model so uint8 batches travel to the device and are normalised there.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) or (B, 3, H, W) -> normalised float (B, 3, H, W) on the model's device."""
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images)
        if images.ndim != 4:
            raise ValueError(f"expected a 4-d batch, got shape {tuple(images.shape)}")
        if images.shape[-1] == 3 and images.shape[1] != 3:
            images = images.permute(0, 3, 1, 2)
        images = images.to(self.mean.device, non_blocking=True)
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The shared trunk: images (B, 3, H, W) -> embedding (B, D)."""
        emb: torch.Tensor = self.backbone(x)
        return emb

    def forward_head(self, embedding: torch.Tensor, task: str) -> torch.Tensor:
        """One task's logits from the shared embedding."""
        logits: torch.Tensor = self.heads[task](self.dropout(embedding))
        return logits

    def forward(self, x: torch.Tensor) -> ModelOutput:
        emb = self.forward_features(x)
        return ModelOutput(embedding=emb, logits={name: self.forward_head(emb, name) for name in self.heads})


def build_model(
    *,
    backbone: str,
    tasks: TaskConfig,
    weights: str | None = None,
    dropout: float = 0.0,
) -> MultiHeadModel:
    """A new model with random-init heads; backbone weights from ``weights``, the hub cache, or random init."""
    model = MultiHeadModel(backbone=backbone, tasks=tasks, dropout=dropout)
    state = find_pretrained(backbone, weights)
    if state is None:
        log.warning("backbone %s: no local pretrained weights found; using random init", backbone)
    else:
        missing, unexpected = model.backbone.load_state_dict(adapt_state(state, model.backbone), strict=False)
        if len(missing) > 0:
            raise ArtifactError(
                f"pretrained weights for {backbone}: {len(missing)} backbone tensors missing, e.g. {missing[:3]}"
            )
        log.info("backbone %s: loaded pretrained weights (%d tensors ignored)", backbone, len(unexpected))
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
