"""timm as an optional backbone provider: ``timm/<name>`` is ``timm.create_model(name, pretrained=False,
num_classes=0)``, a trunk that ends in its pooled embedding (``num_features`` wide).

Weights never come from the network: the model is built random-init, and pretrained weights are loaded from a
local safetensors file (``--weights``, see docs/weights.md). ``HF_HUB_OFFLINE=1`` is set before timm is imported,
so even a timm code path that would reach for the Hugging Face Hub fails fast instead of downloading.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from catalog_tagger.errors import UserError

TIMM_PREFIX = "timm/"
INSTALL_HINT = "pip install 'catalog-tagger[timm]'"


def is_timm(backbone: str) -> bool:
    """Whether a backbone name belongs to the timm provider."""
    return backbone.startswith(TIMM_PREFIX)


def import_timm(backbone: str | None = None) -> ModuleType:
    """The timm module, imported offline; a one-line ``UserError`` naming the extra to install when it is absent."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import timm
    except ImportError:
        what = f"backbone {backbone!r} needs" if backbone else "the timm backbones need"
        raise UserError(f"{what} timm, which is not installed: {INSTALL_HINT}") from None
    return timm


@dataclass(frozen=True)
class TimmFacts:
    """What the registry needs to know about one timm model, read from a model built on the meta device."""

    name: str  # timm's model name (without the ``timm/`` prefix)
    embedding_dim: int  # ``num_features``: the pooled embedding with ``num_classes=0``
    image_size: int  # the pretrained config's input size
    fixed_size: bool  # the model only accepts ``image_size`` (ViT, Swin, ...)
    mean: tuple[float, ...]  # the normalisation its weights were trained with
    std: tuple[float, ...]


@functools.lru_cache(maxsize=64)
def timm_facts(backbone: str) -> TimmFacts:
    """The facts of ``timm/<name>``; an unknown name is a one-line ``UserError``."""
    timm = import_timm(backbone)
    name = backbone.removeprefix(TIMM_PREFIX)
    if not name or not timm.is_model(name):
        raise UserError(
            f"timm has no model {name!r} (backbone {backbone!r}); list them with: "
            f"python -c \"import timm; print(timm.list_models('{name[:6] or 'resnet'}*'))\""
        )
    # The meta device allocates nothing and draws no random numbers: looking a model up leaves the seed alone.
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, num_classes=0)
    cfg: dict[str, Any] = dict(model.pretrained_cfg or {})
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return TimmFacts(
        name=name,
        embedding_dim=int(model.num_features),
        image_size=size,
        fixed_size=bool(cfg.get("fixed_input_size", False)),
        mean=tuple(float(x) for x in cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(float(x) for x in cfg.get("std", (0.229, 0.224, 0.225))),
    )


class TimmTrunk(nn.Module):
    """A timm model without classifier, fed with images normalised the way our models are (the card's mean/std).

    timm models are trained with their own normalisation (0.5/0.5 for many); the trunk maps our normalised input
    to theirs with one per-channel affine map (exact: both are affine in the pixels), so the card stays as every
    other model's and the pretrained weights see the inputs they were trained on. Its buffers are not saved.
    """

    weights_prefix = "model."  # timm's state-dict keys live under ``model.`` here (``weights.adapt_state``)
    scale: torch.Tensor  # (1, 3, 1, 1)
    shift: torch.Tensor

    def __init__(self, model: nn.Module, facts: TimmFacts, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.renorm = (tuple(mean), tuple(std)) != (facts.mean, facts.std)
        scale = [o / t for o, t in zip(std, facts.std, strict=True)]
        shift = [(om - tm) / ts for om, tm, ts in zip(mean, facts.mean, facts.std, strict=True)]
        self.register_buffer("scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renorm:
            x = x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
        out: torch.Tensor = self.model(x)
        return out


def build_timm(backbone: str, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """A random-init ``timm/<name>`` trunk (never ``pretrained=True``: weights come from a local file)."""
    facts = timm_facts(backbone)
    model = import_timm(backbone).create_model(facts.name, pretrained=False, num_classes=0)
    return TimmTrunk(model, facts, mean, std)


def timm_version() -> str | None:
    """The installed timm's version, or None when timm is not installed."""
    try:
        return str(import_timm().__version__)
    except UserError:
        return None


def timm_listing() -> str:
    """One line for ``catalog-tagger backbones``: how to use the timm provider here."""
    version = timm_version()
    if version is None:
        return f"timm/<name>: any timm model, e.g. timm/resnet18 (timm is not installed: {INSTALL_HINT})"
    n = len(import_timm().list_models())
    return (
        f"timm/<name>: any of timm {version}'s {n} models, e.g. timm/resnet18 or timm/mobilenetv3_small_100; "
        "pretrained weights from a local safetensors file (--weights; docs/weights.md)"
    )
