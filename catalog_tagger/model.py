"""The multi-head model: one shared torchvision backbone, one linear head per task, and its artifact on disk."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from catalog_tagger.config import TaskConfig, TaskSpec, parse_tasks
from catalog_tagger.errors import ArtifactError, UserError

log = logging.getLogger(__name__)

CARD_SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------- backbones
@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone: a trunk that maps (B, 3, H, W) to an embedding (B, dim)."""

    name: str
    build: Callable[[], nn.Module]  # random-init trunk ending in a flat embedding
    embedding_dim: int
    torchvision_weights: str | None = None  # torchvision weights enum entry, to find the hub cache file
    default_image_size: int = 224
    min_image_size: int = 32  # smallest input the trunk accepts


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
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown backbone {name!r}; choose one of: {', '.join(backbone_names())}") from None


class _Trunk(nn.Module):
    """torchvision ``features`` + global pooling (+ optional norm) + flatten."""

    def __init__(self, features: nn.Module, post: nn.Module | None = None) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.post = post if post is not None else nn.Identity()
        self.flatten = nn.Flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.post(self.pool(self.features(x))))


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision.models as tvm

        m = getattr(tvm, name)(weights=None)
        if name.startswith("resnet"):
            m.fc = nn.Identity()
            return m
        if name.startswith("convnext"):
            # convnext's classifier starts with a LayerNorm2d that belongs to the embedding.
            return _Trunk(m.features, post=m.classifier[0])
        return _Trunk(m.features)

    return build


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _tiny_cnn() -> nn.Module:
    # For tests: runs the whole pipeline on a CPU in milliseconds per batch.
    return _Trunk(nn.Sequential(_conv_bn(3, 8, 2), _conv_bn(8, 16, 2), _conv_bn(16, 32, 2)))


def _small_cnn() -> nn.Module:
    # A compact from-scratch CNN: learns the synthetic catalog on a 2-core CPU in minutes.
    return _Trunk(
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


for _spec in (
    BackboneSpec("tiny_cnn", _tiny_cnn, 32, default_image_size=64, min_image_size=8),
    BackboneSpec("small_cnn", _small_cnn, 128, default_image_size=128, min_image_size=16),
    BackboneSpec("mobilenet_v3_small", _tv("mobilenet_v3_small"), 576, "MobileNet_V3_Small_Weights.IMAGENET1K_V1"),
    BackboneSpec("mobilenet_v3_large", _tv("mobilenet_v3_large"), 960, "MobileNet_V3_Large_Weights.IMAGENET1K_V1"),
    BackboneSpec("resnet18", _tv("resnet18"), 512, "ResNet18_Weights.IMAGENET1K_V1"),
    BackboneSpec("resnet50", _tv("resnet50"), 2048, "ResNet50_Weights.IMAGENET1K_V1"),
    BackboneSpec("efficientnet_b0", _tv("efficientnet_b0"), 1280, "EfficientNet_B0_Weights.IMAGENET1K_V1"),
    BackboneSpec("convnext_tiny", _tv("convnext_tiny"), 768, "ConvNeXt_Tiny_Weights.IMAGENET1K_V1"),
):
    register_backbone(_spec)


# --------------------------------------------------------------------------------------------- model
@dataclass
class ModelOutput:
    """What one forward pass returns: the shared embedding and every head's logits."""

    embedding: torch.Tensor  # (B, D)
    logits: dict[str, torch.Tensor]  # task name -> (B, n_labels)


class MultiHeadModel(nn.Module):
    """Shared backbone (``forward_features``) + one linear head per task (``forward_head``)."""

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
        self.heads = nn.ModuleDict({t.name: nn.Linear(spec.embedding_dim, len(t.labels)) for t in tasks.tasks})
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
        return self.backbone(x)

    def forward_head(self, embedding: torch.Tensor, task: str) -> torch.Tensor:
        return self.heads[task](self.dropout(embedding))

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
    state = _find_pretrained(backbone, weights)
    if state is None:
        log.warning("backbone %s: no local pretrained weights found; using random init", backbone)
    else:
        missing, unexpected = model.backbone.load_state_dict(_adapt_state(state, model.backbone), strict=False)
        if len(missing) > 0:
            raise ArtifactError(
                f"pretrained weights for {backbone}: {len(missing)} backbone tensors missing, e.g. {missing[:3]}"
            )
        log.info("backbone %s: loaded pretrained weights (%d tensors ignored)", backbone, len(unexpected))
    return model


def _adapt_state(state: Mapping[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Map torchvision classifier-model keys onto our trunk (``features.*`` and convnext's ``classifier.0``)."""
    own = set(trunk.state_dict())
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        k2 = k.removeprefix("backbone.")
        if k2.startswith("classifier.0.") and isinstance(trunk, _Trunk):
            k2 = "post." + k2.removeprefix("classifier.0.")
        if k2 in own:
            out[k2] = v
    return out


def _find_pretrained(backbone: str, weights: str | None) -> dict[str, torch.Tensor] | None:
    if weights:
        path = str(weights)
        if path.endswith(PICKLE_SUFFIXES):
            raise ArtifactError(
                f"{path}: pickle checkpoints are refused (they can run code when loaded); "
                "convert it to safetensors: safetensors.torch.save_file(state_dict, 'weights.safetensors')"
            )
        try:
            with fsspec.open(path, "rb") as fh:
                return st_load(fh.read())
        except FileNotFoundError:
            raise ArtifactError(f"{path}: weights file not found") from None
        except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
            raise ArtifactError(f"{path}: not a safetensors file ({err})") from None
    spec = get_backbone(backbone)
    if spec.torchvision_weights is None:
        return None
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    # torchvision names cache files after the URL; a safetensors copy next to them wins.
    import torchvision.models as tvm

    enum_name, member = spec.torchvision_weights.split(".")
    url = getattr(getattr(tvm, enum_name), member).url
    cached = hub / Path(url).name
    st_copy = cached.with_suffix(".safetensors")
    if st_copy.exists():
        with open(st_copy, "rb") as fh:
            return st_load(fh.read())
    if cached.exists():
        # torchvision's own cache file: read with torch's allow-list loader (weights_only=True), which
        # refuses arbitrary objects, so no code from the file can run.
        return torch.load(cached, map_location="cpu", weights_only=True)
    return None


# --------------------------------------------------------------------------------------------- artifact
@dataclass
class ModelCard:
    """``model.json``: everything needed to use the weights, with no network and no code from the artifact."""

    backbone: str  # registry name
    image_size: int  # square input size in pixels
    mean: list[float]  # per-channel normalisation mean (RGB, 0..1 scale)
    std: list[float]  # per-channel normalisation std
    embedding_dim: int  # width of the shared embedding
    tasks: list[dict[str, Any]]  # TaskSpec dicts; multilabel tasks also carry per-label thresholds
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    metrics: dict[str, Any] = field(default_factory=dict)  # test metrics per task, when trained
    training: dict[str, Any] = field(default_factory=dict)  # split, epochs, seed, data counts
    schema_version: int = CARD_SCHEMA_VERSION
    version: str = ""  # content hash of weights + the behavioural part of the card

    def task_config(self) -> TaskConfig:
        tasks = [{k: v for k, v in t.items() if k != "label_thresholds"} for t in self.tasks]
        return parse_tasks({"tasks": tasks}, source="model.json")

    def label_thresholds(self, task: TaskSpec) -> list[float]:
        """Per-label thresholds of a multilabel task (tuned on val when trained, else the task's threshold)."""
        for t in self.tasks:
            if t["name"] == task.name and t.get("label_thresholds"):
                return [float(x) for x in t["label_thresholds"]]
        return [task.effective_threshold] * len(task.labels)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    def behaviour(self) -> dict[str, Any]:
        """The fields that change predictions: hashed into ``version``."""
        d = asdict(self)
        return {k: d[k] for k in ("backbone", "image_size", "mean", "std", "embedding_dim", "tasks", "schema_version")}


def card_for(model: MultiHeadModel, *, image_size: int) -> ModelCard:
    return ModelCard(
        backbone=model.backbone_name,
        image_size=image_size,
        mean=[float(x) for x in model.mean.flatten().tolist()],
        std=[float(x) for x in model.std.flatten().tolist()],
        embedding_dim=model.embedding_dim,
        tasks=[t.model_dump(mode="json") for t in model.tasks.tasks],
    )


def compute_version(weights: bytes, card: ModelCard) -> str:
    h = hashlib.sha256()
    h.update(weights)
    h.update(json.dumps(card.behaviour(), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _join(uri: str, name: str) -> str:
    return uri.rstrip("/") + "/" + name


def save_artifact(model: MultiHeadModel, card: ModelCard, uri: str | os.PathLike[str]) -> ModelCard:
    """Write ``model.safetensors`` then ``model.json`` (the card last: a directory without it is incomplete)."""
    uri = str(uri)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = st_save(state, metadata={"format": "pt"})
    card.version = compute_version(blob, card)
    fs, root = fsspec.core.url_to_fs(uri)
    fs.makedirs(root, exist_ok=True)
    with fs.open(_join(root, WEIGHTS_FILE), "wb") as fh:
        fh.write(blob)
    with fs.open(_join(root, CARD_FILE), "w") as fh:
        fh.write(card.to_json())
    return card


def refuse_pickle(uri: str) -> None:
    if uri.rstrip("/").endswith(PICKLE_SUFFIXES):
        raise ArtifactError(
            f"{uri}: pickle checkpoints are refused (loading one can run arbitrary code); "
            f"a model artifact is a directory with {WEIGHTS_FILE} and {CARD_FILE}"
        )


def load_card(uri: str | os.PathLike[str]) -> ModelCard:
    uri = str(uri)
    refuse_pickle(uri)
    fs, root = fsspec.core.url_to_fs(uri)
    card_path = _join(root, CARD_FILE)
    if not fs.exists(card_path):
        pickles = [p for p in (fs.ls(root, detail=False) if fs.isdir(root) else []) if p.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ArtifactError(
                f"{uri}: holds pickle checkpoint(s) {[Path(p).name for p in pickles]} and no {CARD_FILE}; "
                "pickle is refused: save the model as safetensors + JSON (catalog-tagger train writes that)"
            )
        raise ArtifactError(f"{uri}: not a model artifact ({CARD_FILE} not found)")
    with fs.open(card_path, "r") as fh:
        raw = json.load(fh)
    known = set(ModelCard.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        log.warning("%s: ignoring unknown card fields %s", card_path, sorted(unknown))
    try:
        return ModelCard(**{k: v for k, v in raw.items() if k in known})
    except TypeError as err:
        raise ArtifactError(f"{card_path}: invalid model card ({err})") from None


def load_artifact(
    uri: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[MultiHeadModel, ModelCard]:
    """Load a model artifact from a local path or any fsspec URL. Never unpickles anything."""
    uri = str(uri)
    card = load_card(uri)
    fs, root = fsspec.core.url_to_fs(uri)
    wpath = _join(root, WEIGHTS_FILE)
    if not fs.exists(wpath):
        pickles = [Path(p).name for p in fs.ls(root, detail=False) if p.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise ArtifactError(
                f"{uri}: has no {WEIGHTS_FILE}, only pickle checkpoint(s) {pickles}; pickle is refused (it can run "
                "code when loaded): save the weights as safetensors"
            )
        raise ArtifactError(f"{uri}: {WEIGHTS_FILE} not found")
    with fs.open(wpath, "rb") as fh:
        blob = fh.read()
    if card.version and compute_version(blob, card) != card.version:
        raise ArtifactError(f"{uri}: weights do not match the card's version {card.version} (corrupt or edited)")
    model = MultiHeadModel(backbone=card.backbone, tasks=card.task_config(), mean=tuple(card.mean), std=tuple(card.std))
    state = st_load(blob)
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.eval()
    return model, card


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def iter_task_outputs(card: ModelCard, out: ModelOutput) -> Iterator[tuple[TaskSpec, torch.Tensor]]:
    """(task, probabilities) for every head: softmax for multiclass, sigmoid for multilabel."""
    for task in card.task_config().tasks:
        logits = out.logits[task.name].float()
        yield task, (logits.softmax(-1) if task.kind == "multiclass" else logits.sigmoid())


def state_bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    buf.write(st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))
    return buf.getvalue()
