"""Inference: device choice, autocast, one timed forward pass, outputs -> columns, and predicting a few images."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from catalog_tagger.decode import Decoded, decode_image
from catalog_tagger.errors import DecodeError, ReadRefused, UserError
from catalog_tagger.fetch import read_bounded
from catalog_tagger.kinds import kind_of
from catalog_tagger.model.artifact import ModelCard, load_artifact
from catalog_tagger.model.multihead import ModelOutput, MultiHeadModel
from catalog_tagger.storage import is_local

log = logging.getLogger(__name__)

# The error of a row whose model output is NaN or infinite (overflow, a bad artifact): never an ``ok`` row.
NONFINITE_ERROR = "predict: non-finite model output (NaN or inf)"


def select_device(preference: str = "auto") -> torch.device:
    """``auto``: CUDA when present, else CPU. ``cuda`` without a GPU is a user error."""
    if preference not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {preference!r}")
    if preference == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        raise UserError("--device cuda was requested but torch sees no CUDA device")
    return torch.device("cpu")


def autocast(device: torch.device, *, bf16_only: bool = False) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on GPUs that support it (fp16 otherwise, unless ``bf16_only``); plain fp32 on CPU.

    Training passes ``bf16_only``: fp16 would need a GradScaler, and every GPU worth training on has bf16.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext() if bf16_only else torch.autocast("cuda", dtype=torch.float16)


def to_device(model: MultiHeadModel, device: torch.device) -> MultiHeadModel:
    """Move a model to ``device``, channels-last on CUDA (cuDNN's fast layout; no gain measured on CPU)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if device.type == "cuda" else model


def prepare_for_inference(model: MultiHeadModel, device: torch.device) -> MultiHeadModel:
    """``to_device`` in eval mode."""
    return to_device(model, device).eval()


@dataclass
class TimedOutput:
    output: ModelOutput
    seconds: float  # busy accelerator (or CPU) seconds of the forward pass, synchronised on CUDA


def run_batch(model: MultiHeadModel, images: np.ndarray | torch.Tensor) -> TimedOutput:
    """One forward pass on uint8 (B, H, W, 3) images; outputs moved to CPU float32."""
    device = model.mean.device
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if device.type == "cuda":
        if images.device.type == "cpu":  # pinned: the copy to the GPU is asynchronous (decoded on the GPU: none)
            images = images.pin_memory()
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(device):
        x = model.prepare(images)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        out = ModelOutput(
            embedding=out.embedding.float().cpu(), logits={k: v.float().cpu() for k, v in out.logits.items()}
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return TimedOutput(output=out, seconds=time.perf_counter() - t0)


def finite_rows(out: ModelOutput) -> np.ndarray:
    """Per row: whether the embedding and every head's logits are finite (bool array of the batch's length)."""
    ok = torch.isfinite(out.embedding).all(dim=1)
    for logits in out.logits.values():
        ok &= torch.isfinite(logits).all(dim=1)
    flags: np.ndarray = ok.cpu().numpy()
    return flags


def output_columns(card: ModelCard, out: ModelOutput) -> dict[str, Any]:
    """Every task's columns (each kind says which) and the embedding."""
    cols: dict[str, Any] = {}
    for task in card.task_config().tasks:
        kind = kind_of(task)
        probs = kind.activate(out.logits[task.name]).numpy()
        cols.update(kind.columns(task, probs, card.label_thresholds(task)))
    cols["embedding"] = out.embedding.numpy().astype(np.float32)
    return cols


def read_image(uri: str, size: int, storage_options: dict[str, Any] | None = None) -> Decoded:
    """Read and decode one image named on the command line, with the tagging run's bounds (a regular file, at most
    64 MiB, a deadline: ``fetch.read_bounded``). A missing file is a user error; a refused read (a FIFO, a device,
    too large, no answer) is that image's ``DecodeError``, like an image that does not decode."""
    opts = storage_options if "://" in uri and not is_local(uri) else None
    try:
        data = read_bounded(uri, opts)
    except FileNotFoundError:
        raise UserError(f"{uri}: no such image") from None
    except ReadRefused as err:
        raise DecodeError(f"read: {err}") from None
    return decode_image(data, size)


def predict_uris(model_uri: str, uris: list[str], *, device: str = "auto") -> list[dict[str, Any]]:
    """Each image's predictions per task, or its error, in-process (no Ray). Bad images do not stop the others."""
    dev = select_device(device)
    model, card = load_artifact(model_uri)
    model = prepare_for_inference(model, dev)
    results: list[dict[str, Any]] = []
    arrays: list[np.ndarray] = []
    ok_idx: list[int] = []
    for uri in uris:
        try:
            dec = read_image(uri, card.image_size)
        except DecodeError as err:
            results.append({"uri": uri, "status": "error", "error": str(err)})
            continue
        ok_idx.append(len(results))
        results.append({"uri": uri, "status": "ok", "width": dec.width, "height": dec.height})
        arrays.append(dec.array)
    if arrays:
        out = run_batch(model, np.stack(arrays)).output
        cols, finite = output_columns(card, out), finite_rows(out)
        tasks = card.task_config().tasks
        for j, i in enumerate(ok_idx):
            if not finite[j]:
                results[i] = {"uri": results[i]["uri"], "status": "error", "error": NONFINITE_ERROR}
                continue
            results[i]["predictions"] = {t.name: kind_of(t).prediction(t, cols, j) for t in tasks}
            results[i]["model_version"] = card.version
    return results
