"""The model artifact: ``model.safetensors`` + ``model.json`` (the card), on any fsspec store. Never pickle."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import fsspec
import torch
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError
from safetensors.torch import load as st_load

from catalog_tagger.config import TaskConfig, TaskSpec, parse_tasks
from catalog_tagger.errors import ArtifactError, ConfigError, UserError
from catalog_tagger.model.backbones import MAX_IMAGE_SIZE, get_backbone
from catalog_tagger.model.multihead import MultiHeadModel
from catalog_tagger.model.weights import (
    CARD_FILE,
    WEIGHTS_FILE,
    check_finite,
    check_shapes,
    is_pickle_name,
    read_shapes,
    refuse_pickle,
    require_weights,
    state_bytes,
)

log = logging.getLogger(__name__)

CARD_SCHEMA_VERSION = 1
MAX_CARD_BYTES = 16 << 20  # a card is kilobytes (tasks, metrics, training facts); this bounds a wrong file


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


_Finite = Annotated[StrictFloat, Field(allow_inf_nan=False)]
_Positive = Annotated[StrictFloat, Field(allow_inf_nan=False, gt=0)]


class _CardFields(BaseModel):
    """The types and ranges of ``model.json``'s fields (checked before a ``ModelCard`` is built from them)."""

    model_config = ConfigDict(extra="ignore")

    backbone: StrictStr
    image_size: StrictInt
    mean: list[_Finite] = Field(min_length=3, max_length=3)
    std: list[_Positive] = Field(min_length=3, max_length=3)  # divides every pixel: 0 would make NaN scores
    embedding_dim: StrictInt
    tasks: list[dict[StrictStr, Any]]
    created_at: StrictStr = ""
    metrics: dict[StrictStr, Any] = Field(default_factory=dict)
    training: dict[StrictStr, Any] = Field(default_factory=dict)
    schema_version: StrictInt = Field(default=CARD_SCHEMA_VERSION, ge=1, le=CARD_SCHEMA_VERSION)
    version: StrictStr = ""


def _check_card(raw: Any, where: str) -> None:
    """Validate a parsed ``model.json``: types, ranges, the backbone's own numbers and the tasks; else one line."""
    if not isinstance(raw, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(raw), "a number")
        raise ArtifactError(f"{where}: not a model card: a JSON object is expected, this is {kind}")
    try:
        card = _CardFields.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(x) for x in e["loc"])
        more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        raise ArtifactError(f"{where}: field {field!r}: {e['msg']}{more}") from None
    try:
        spec = get_backbone(card.backbone)
    except UserError as err:
        raise ArtifactError(f"{where}: field 'backbone': {err}") from None
    if not spec.min_image_size <= card.image_size <= min(spec.max_image_size, MAX_IMAGE_SIZE):
        raise ArtifactError(
            f"{where}: field 'image_size': {card.image_size} is outside {spec.min_image_size}.."
            f"{spec.max_image_size} px ({card.backbone}'s range)"
        )
    if card.embedding_dim != spec.embedding_dim:
        raise ArtifactError(
            f"{where}: field 'embedding_dim': {card.embedding_dim} does not match backbone {card.backbone} "
            f"({spec.embedding_dim})"
        )
    _check_card_tasks(card.tasks, where)


def _check_card_tasks(tasks: list[dict[str, Any]], where: str) -> None:
    """The card's tasks are valid task specs; a multilabel task's tuned thresholds are one per label, in [0, 1]."""
    plain = [{k: v for k, v in t.items() if k != "label_thresholds"} for t in tasks]
    try:
        config = parse_tasks({"tasks": plain}, source=f"{where}: field 'tasks'")
    except ConfigError as err:
        lines = str(err).splitlines()
        raise ArtifactError(lines[0] + (f" (and {len(lines) - 1} more)" if len(lines) > 1 else "")) from None
    for t, spec in zip(tasks, config.tasks, strict=True):
        thresholds = t.get("label_thresholds")
        if thresholds is None:
            continue
        ok = isinstance(thresholds, list) and len(thresholds) == len(spec.labels)
        if not ok or not all(type(x) in (int, float) and 0.0 <= x <= 1.0 for x in thresholds):
            raise ArtifactError(
                f"{where}: field 'tasks': task {spec.name!r}: label_thresholds must be {len(spec.labels)} "
                "numbers in [0, 1], one per label"
            )


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
    """Write ``model.safetensors`` then ``model.json`` (the card last: a directory without it is incomplete).
    A card that ``load_card`` would refuse (``init-model --image-size 60000``) is refused before anything is written."""
    _check_card(asdict(card), f"{uri}/{CARD_FILE}")
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
    raw = _read_card_json(fs, card_path)
    _check_card(raw, card_path)
    known = set(ModelCard.__dataclass_fields__)
    unknown = set(raw) - known
    if unknown:
        log.warning("%s: ignoring unknown card fields %s", card_path, sorted(unknown))
    # Built from the raw values (not the validated copies): the version hash covers the card as written.
    return ModelCard(**{k: v for k, v in raw.items() if k in known})


def _read_card_json(fs: Any, card_path: str) -> Any:
    """``model.json`` parsed; a file too large, not UTF-8 or not JSON is an ``ArtifactError``."""
    with fs.open(card_path, "rb") as fh:
        data = fh.read(MAX_CARD_BYTES + 1)
    if len(data) > MAX_CARD_BYTES:
        raise ArtifactError(f"{card_path}: larger than {MAX_CARD_BYTES >> 20} MiB: not a model card")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ArtifactError(f"{card_path}: not UTF-8 text: not a model card") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{card_path}: not valid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise ArtifactError(f"{card_path}: JSON nested too deeply: not a model card") from None


def expected_shapes(card: ModelCard) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor the card's model has (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        model = MultiHeadModel(backbone=card.backbone, tasks=card.task_config())
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_state(uri: str | os.PathLike[str], card: ModelCard) -> dict[str, torch.Tensor]:
    """The artifact's weights, checked: safetensors, the card's shapes (from the header, before reading the
    rest), the card's version hash, and finite values. Any failure is an ``ArtifactError``."""
    uri = str(uri)
    fs, root = fsspec.core.url_to_fs(uri)
    path = require_weights(fs, root, uri)
    shapes, size = read_shapes(fs, path, uri)
    check_shapes(shapes, expected_shapes(card), uri)
    if fs.size(path) != size:
        raise ArtifactError(f"{uri}: {WEIGHTS_FILE} is {fs.size(path)} bytes, its header says {size}: corrupt")
    with fs.open(path, "rb") as fh:
        blob = fh.read(size)
    if card.version and compute_version(blob, card) != card.version:
        raise ArtifactError(f"{uri}: weights do not match the card's version {card.version} (corrupt or edited)")
    try:
        state = st_load(blob)
    except Exception as err:  # noqa: BLE001 - safetensors' own error types: the file is not valid
        raise ArtifactError(f"{uri}: {WEIGHTS_FILE} is not a valid safetensors file ({err})") from None
    check_finite(state, uri)
    return state


def check_weights(uri: str | os.PathLike[str]) -> None:
    """Refuse an artifact whose weights are missing, pickled, of another model, edited or not finite (before any
    work starts: a run would otherwise fail in every predictor, or tag every row ``ok`` with NaN scores)."""
    load_state(uri, load_card(uri))


def load_artifact(
    uri: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> tuple[MultiHeadModel, ModelCard]:
    """Load a model artifact from a local path or any fsspec URL. Never unpickles anything."""
    uri = str(uri)
    card = load_card(uri)
    state = load_state(uri, card)
    model = MultiHeadModel(backbone=card.backbone, tasks=card.task_config(), mean=tuple(card.mean), std=tuple(card.std))
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.eval()
    return model, card
