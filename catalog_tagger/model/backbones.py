"""Backbone registry: trunks that map (B, 3, H, W) images to a flat embedding, refusing duplicate names.

Two providers besides the registered names: torchvision's models (registered here, with their hub-cache weights)
and timm (``timm/<name>``, optional: ``timm_backbone``), resolved on demand by ``get_backbone``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from catalog_tagger.errors import UserError
from catalog_tagger.model.timm_backbone import build_timm, is_timm, timm_facts, timm_version

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Largest square input a card may ask for: one 1024 px float image is 12 MiB, a batch of 64 is 0.8 GiB already.
MAX_IMAGE_SIZE = 1024


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: a trunk that maps (B, 3, H, W) to an embedding (B, dim)."""

    name: str
    build: Callable[[], nn.Module]  # random-init trunk ending in a flat embedding
    embedding_dim: int
    torchvision_weights: str | None = None  # torchvision weights enum entry, to find the hub cache file
    default_image_size: int = 224
    min_image_size: int = 32  # smallest input the trunk accepts
    max_image_size: int = MAX_IMAGE_SIZE  # largest input the trunk accepts (its own size for a fixed-size ViT)
    provider: str = "catalog_tagger"  # where the architecture comes from: catalog_tagger | torchvision | timm


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry; a duplicate name is refused."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def backbone_names() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    """The spec of a registered backbone, or of ``timm/<name>`` (needs timm); else a one-line ``UserError``."""
    if is_timm(name):
        return _timm_spec(name)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"unknown backbone {name!r}; choose one of: {', '.join(backbone_names())}, or timm/<name>"
        ) from None


def _timm_spec(name: str) -> BackboneSpec:
    """The spec of ``timm/<name>``: its embedding width, input size and limits from timm's own config."""
    facts = timm_facts(name)
    return BackboneSpec(
        name,
        lambda: build_timm(name, IMAGENET_MEAN, IMAGENET_STD),
        facts.embedding_dim,
        default_image_size=facts.image_size,
        min_image_size=facts.image_size if facts.fixed_size else 32,
        max_image_size=facts.image_size if facts.fixed_size else MAX_IMAGE_SIZE,
        provider="timm",
    )


def backbone_provider(name: str) -> dict[str, str]:
    """Where a backbone's architecture comes from, for the training facts (``timm`` with its version)."""
    spec = get_backbone(name)
    if spec.provider == "timm":
        return {"provider": "timm", "timm_version": timm_version() or "?"}
    return {"provider": spec.provider}


class Trunk(nn.Module):
    """torchvision ``features`` + global pooling (+ optional norm) + flatten."""

    weights_prefix = ""  # torchvision's keys (``features.*``) are the trunk's own

    def __init__(self, features: nn.Module, post: nn.Module | None = None) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.post = post if post is not None else nn.Identity()
        self.flatten = nn.Flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.flatten(self.post(self.pool(self.features(x))))
        return out


def _tv(name: str) -> Callable[[], nn.Module]:
    """A builder of torchvision's ``name`` (random init) cut before its classifier."""

    def build() -> nn.Module:
        import torchvision.models as tvm

        m: Any = getattr(tvm, name)(weights=None)  # torchvision models differ in their attributes
        if name.startswith("resnet"):
            m.fc = nn.Identity()
            trunk: nn.Module = m
            return trunk
        if name.startswith("convnext"):
            # convnext's classifier starts with a LayerNorm2d that belongs to the embedding.
            return Trunk(m.features, post=m.classifier[0])
        return Trunk(m.features)

    return build


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _tiny_cnn() -> nn.Module:
    # For tests: runs the whole pipeline on a CPU in milliseconds per batch.
    return Trunk(nn.Sequential(_conv_bn(3, 8, 2), _conv_bn(8, 16, 2), _conv_bn(16, 32, 2)))


def _small_cnn() -> nn.Module:
    # A compact from-scratch CNN: learns the synthetic catalog on a 2-core CPU in minutes.
    return Trunk(
        nn.Sequential(
            _conv_bn(3, 24, 2),
            _conv_bn(24, 32, 1),
            _conv_bn(32, 48, 2),
            _conv_bn(48, 64, 1),
            _conv_bn(64, 96, 2),
            _conv_bn(96, 128, 2),
            _conv_bn(128, 128, 1),
        )
    )


def _tv_spec(name: str, dim: int, weights: str) -> BackboneSpec:
    """A torchvision backbone: its architecture, embedding width and weights enum entry (for the hub cache)."""
    return BackboneSpec(name, _tv(name), dim, weights, provider="torchvision")


for _spec in (
    BackboneSpec("tiny_cnn", _tiny_cnn, 32, default_image_size=64, min_image_size=8),
    BackboneSpec("small_cnn", _small_cnn, 128, default_image_size=128, min_image_size=16),
    _tv_spec("mobilenet_v3_small", 576, "MobileNet_V3_Small_Weights.IMAGENET1K_V1"),
    _tv_spec("mobilenet_v3_large", 960, "MobileNet_V3_Large_Weights.IMAGENET1K_V1"),
    _tv_spec("resnet18", 512, "ResNet18_Weights.IMAGENET1K_V1"),
    _tv_spec("resnet50", 2048, "ResNet50_Weights.IMAGENET1K_V1"),
    _tv_spec("efficientnet_b0", 1280, "EfficientNet_B0_Weights.IMAGENET1K_V1"),
    _tv_spec("convnext_tiny", 768, "ConvNeXt_Tiny_Weights.IMAGENET1K_V1"),
):
    register_backbone(_spec)
