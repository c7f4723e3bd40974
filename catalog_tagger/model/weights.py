"""Weights on disk: safetensors only. The one place that refuses pickle, and the pretrained-backbone lookup."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from catalog_tagger.errors import ArtifactError
from catalog_tagger.model.backbones import Trunk, get_backbone

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")
_WHY = "pickle is refused (loading one can run arbitrary code)"
MAX_HEADER_BYTES = 100 << 20  # safetensors' own bound on the JSON header


def is_pickle_name(name: str) -> bool:
    """A file name with a pickle checkpoint suffix (``.pt``, ``.pth``, ``.ckpt``, ...)."""
    return name.rstrip("/").endswith(PICKLE_SUFFIXES)


def refuse_pickle(uri: str) -> None:
    """Refuse a uri that names a pickle checkpoint, before anything opens it."""
    if is_pickle_name(str(uri)):
        raise ArtifactError(
            f"{uri}: {_WHY}; a model artifact is a directory with {WEIGHTS_FILE} and {CARD_FILE}, and backbone "
            "weights are a safetensors file: safetensors.torch.save_file(state_dict, 'weights.safetensors')"
        )


def require_weights(fs: Any, root: str, uri: str) -> str:
    """The path of ``model.safetensors`` in an artifact folder; an error naming any pickle found instead."""
    wpath = root.rstrip("/") + "/" + WEIGHTS_FILE
    if fs.exists(wpath):
        return wpath
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        names = []
    pickles = sorted(n for n in names if is_pickle_name(n))
    found = f"; it holds pickle checkpoint(s) {pickles}, and {_WHY}" if pickles else ""
    raise ArtifactError(
        f"{uri}: no {WEIGHTS_FILE}{found}. A model artifact is safetensors weights + {CARD_FILE} "
        "(catalog-tagger train and init-model write that)"
    )


def read_shapes(fs: Any, path: str, uri: str) -> tuple[dict[str, tuple[int, ...]], int]:
    """Every tensor's shape in a safetensors file, and the file's size its header implies, from the header alone.

    Read before the weights themselves: a file for another model (or not safetensors at all) is refused without
    reading (or holding) more than its header.
    """
    bad = f"{uri}: {WEIGHTS_FILE} is not a safetensors file"
    with fs.open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= MAX_HEADER_BYTES:
            raise ArtifactError(f"{bad} (no valid header)")
        try:
            header = json.loads(fh.read(n))
            entries = {k: v for k, v in header.items() if k != "__metadata__"}
            shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in entries.items()}
            end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError):
            raise ArtifactError(f"{bad} (unreadable header)") from None
    return shapes, 8 + n + end


def check_shapes(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], uri: str) -> None:
    """The weights hold exactly the tensors the card's model has, each of its shape."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        raise ArtifactError(
            f"{uri}: {WEIGHTS_FILE} does not fit the card's model: {len(missing)} tensor(s) missing "
            f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}"
        )
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ArtifactError(
                f"{uri}: {WEIGHTS_FILE} does not fit the card's model: tensor {name!r} is {list(found[name])}, "
                f"the card's backbone and tasks need {list(shape)}"
            )


def check_finite(state: Mapping[str, torch.Tensor], uri: str) -> None:
    """Refuse weights holding NaN or inf: every prediction would be NaN, and every row would still say ``ok``."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactError(f"{uri}: {WEIGHTS_FILE}: tensor {name!r} holds NaN or infinite values")


def state_bytes(model: nn.Module) -> bytes:
    """A module's state dict as safetensors bytes (CPU, contiguous)."""
    return st_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, metadata={"format": "pt"})


def adapt_state(state: Mapping[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Map torchvision classifier-model keys onto our trunk (``features.*`` and convnext's ``classifier.0``)."""
    own = set(trunk.state_dict())
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        k2 = k.removeprefix("backbone.")
        if k2.startswith("classifier.0.") and isinstance(trunk, Trunk):
            k2 = "post." + k2.removeprefix("classifier.0.")
        if k2 in own:
            out[k2] = v
    return out


def find_pretrained(backbone: str, weights: str | None) -> dict[str, torch.Tensor] | None:
    """Backbone weights from ``weights`` (a safetensors file), else the local torch hub cache, else None."""
    if weights:
        path = str(weights)
        refuse_pickle(path)
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
        state: dict[str, torch.Tensor] = torch.load(cached, map_location="cpu", weights_only=True)
        return state
    return None
