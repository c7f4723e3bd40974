"""Device choice, one timed forward pass, and model outputs -> output columns (shared by predict, tag, similar)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from catalog_tagger.errors import UserError
from catalog_tagger.model import ModelCard, ModelOutput, MultiHeadModel

log = logging.getLogger(__name__)


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


def autocast(device: torch.device) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on GPUs that support it (fp16 otherwise); plain fp32 on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def prepare_for_inference(model: MultiHeadModel, device: torch.device) -> MultiHeadModel:
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


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


def output_columns(card: ModelCard, out: ModelOutput) -> dict[str, list | np.ndarray]:
    """Per-task columns (label + score, or labels over threshold + scores) and the embedding."""
    cols: dict[str, list | np.ndarray] = {}
    for task in card.task_config().tasks:
        logits = out.logits[task.name].float()
        labels = task.labels
        if task.kind == "multiclass":
            probs = logits.softmax(-1)
            score, idx = probs.max(-1)
            cols[task.name] = [labels[i] for i in idx.tolist()]
            cols[f"{task.name}_score"] = score.numpy().astype(np.float32)
        else:
            probs = logits.sigmoid().numpy().astype(np.float32)
            thr = np.asarray(card.label_thresholds(task), dtype=np.float32)
            on = probs >= thr
            cols[task.name] = [[labels[j] for j in np.flatnonzero(row)] for row in on]
            cols[f"{task.name}_scores"] = [row for row in probs]
    cols["embedding"] = out.embedding.numpy().astype(np.float32)
    return cols


def iter_rows(cols: dict[str, list | np.ndarray], n: int) -> Iterator[dict[str, object]]:
    for i in range(n):
        yield {k: v[i] for k, v in cols.items()}
