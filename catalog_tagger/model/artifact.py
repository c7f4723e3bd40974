"""The model artifact: ``model.safetensors`` + ``model.json`` (the card), on any fsspec store. Never pickle."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load

from catalog_tagger.config import TaskConfig, TaskSpec, parse_tasks
from catalog_tagger.errors import ArtifactError
from catalog_tagger.model.multihead import MultiHeadModel
from catalog_tagger.model.weights import (
    CARD_FILE,
    WEIGHTS_FILE,
    is_pickle_name,
    refuse_pickle,
    require_weights,
    state_bytes,
)

log = logging.getLogger(__name__)

CARD_SCHEMA_VERSION = 1


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


def save_artifact(model: MultiHeadModel, card: ModelCard, uri: str | os.PathLike[str]) -> ModelCard:
    """Write ``model.safetensors`` then ``model.json`` (the card last: a directory without it is incomplete)."""
    blob = state_bytes(model)
    card.version = compute_version(blob, card)
    fs, root = fsspec.core.url_to_fs(str(uri))
    fs.makedirs(root, exist_ok=True)
    with fs.open(f"{root.rstrip('/')}/{WEIGHTS_FILE}", "wb") as fh:
        fh.write(blob)
    with fs.open(f"{root.rstrip('/')}/{CARD_FILE}", "w") as fh:
        fh.write(card.to_json())
    return card


def load_card(uri: str | os.PathLike[str]) -> ModelCard:
    """Read and check ``model.json``; a folder of pickle checkpoints (or a pickle file) is refused by name."""
    uri = str(uri)
    refuse_pickle(uri)
    fs, root = fsspec.core.url_to_fs(uri)
    card_path = f"{root.rstrip('/')}/{CARD_FILE}"
    if not fs.exists(card_path):
        pickles = [Path(p).name for p in (fs.ls(root, detail=False) if fs.isdir(root) else []) if is_pickle_name(p)]
        if pickles:
            raise ArtifactError(
                f"{uri}: holds pickle checkpoint(s) {pickles} and no {CARD_FILE}; "
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


def check_weights(uri: str | os.PathLike[str]) -> None:
    """Refuse an artifact whose card has no safetensors weights beside it (before any work starts)."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    require_weights(fs, root, str(uri))


def load_artifact(
    uri: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[MultiHeadModel, ModelCard]:
    """Load a model artifact from a local path or any fsspec URL. Never unpickles anything."""
    uri = str(uri)
    card = load_card(uri)
    fs, root = fsspec.core.url_to_fs(uri)
    with fs.open(require_weights(fs, root, uri), "rb") as fh:
        blob = fh.read()
    if card.version and compute_version(blob, card) != card.version:
        raise ArtifactError(f"{uri}: weights do not match the card's version {card.version} (corrupt or edited)")
    model = MultiHeadModel(backbone=card.backbone, tasks=card.task_config(), mean=tuple(card.mean), std=tuple(card.std))
    model.load_state_dict(st_load(blob), strict=True)
    model.to(map_location)
    model.eval()
    return model, card
