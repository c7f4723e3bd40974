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
    """Map a checkpoint's keys onto our trunk: torchvision classifier models (``features.*``, convnext's
    ``classifier.0``), timm models (their keys under the trunk's ``weights_prefix``), and our own artifacts
    (``backbone.*``). Keys the trunk lacks (a classifier) are dropped; a tensor of the wrong shape is refused."""
    own = trunk.state_dict()
    prefix = str(getattr(trunk, "weights_prefix", ""))
    out: dict[str, torch.Tensor] = {}
    for k, v in sorted(state.items()):  # sorted: the same tensor is named first every time
        k2 = k.removeprefix("backbone.").removeprefix("module.")
        if k2.startswith("classifier.0.") and isinstance(trunk, Trunk):
            k2 = "post." + k2.removeprefix("classifier.0.")
        if k2 not in own and prefix + k2 in own:
            k2 = prefix + k2
        if k2 not in own:
            continue
        if tuple(v.shape) != tuple(own[k2].shape):
            raise ArtifactError(
                f"backbone weights do not fit: tensor {k!r} is {list(v.shape)}, the backbone's {k2!r} is "
                f"{list(own[k2].shape)} (weights of another model?)"
            )
        out[k2] = v
    return out


def weights_file(weights: str) -> tuple[Any, str]:
    """(filesystem, path) of the safetensors file ``weights`` names: the file itself, or in a folder its
    ``model.safetensors`` (the Hugging Face layout), else its only ``*.safetensors``. Pickles are refused by name."""
    refuse_pickle(weights)
    fs, path = fsspec.core.url_to_fs(weights)
    if not fs.exists(path):
        raise ArtifactError(f"{weights}: weights file or folder not found")
    if not fs.isdir(path):
        return fs, path
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    found = [WEIGHTS_FILE] if WEIGHTS_FILE in names else [n for n in names if n.endswith(".safetensors")]
    if len(found) == 1:
        return fs, path.rstrip("/") + "/" + found[0]
    if found:
        raise ArtifactError(
            f"{weights}: {len(found)} .safetensors files in this folder ({', '.join(found[:3])}): name one of them, "
            f"or call the backbone's {WEIGHTS_FILE}"
        )
    pickles = [n for n in names if is_pickle_name(n)]
    why = f"; pickle checkpoint(s) {pickles[:3]} are refused (loading one can run arbitrary code)" if pickles else ""
    raise ArtifactError(f"{weights}: no .safetensors file in this folder{why}; see docs/weights.md")


def read_weights(weights: str) -> dict[str, torch.Tensor]:
    """Backbone weights from a local (or fsspec) safetensors file or folder; any failure is one ``ArtifactError``."""
    fs, path = weights_file(weights)
    try:
        with fs.open(path, "rb") as fh:
            return st_load(fh.read())
    except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
        first = str(err).splitlines()[0] if str(err) else repr(err)
        raise ArtifactError(f"{weights}: not a safetensors file ({first})") from None


def find_pretrained(backbone: str, weights: str | None) -> dict[str, torch.Tensor] | None:
    """Backbone weights from ``weights`` (a safetensors file or folder), else the local torch hub cache (torchvision
    backbones), else None. Nothing is ever downloaded."""
    if weights:
        return read_weights(str(weights))
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
