"""Training data: every image read and decoded once into a uint8 cache, batches from it, and their augmentation.

Images are decoded by ``decode_image``, the function the tagging job serves with, so training and serving see the
same pixels; augmentation then runs on tensors, batched, on the training device.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from catalog_tagger.config import TaskConfig
from catalog_tagger.decode import decode_image
from catalog_tagger.errors import DecodeError
from catalog_tagger.fetch import read_bounded
from catalog_tagger.model.multihead import MultiHeadModel
from catalog_tagger.train.config import TrainConfig, cores

# Colour jitter shifts brightness and saturation: it would teach a colour head that white is sometimes grey.
COLOUR_TASK_RE = re.compile(r"colou?r|hue", re.IGNORECASE)
PROGRESS_EVERY = 32  # decoded images between progress callbacks


def decode_all(
    uris: Sequence[str],
    image_size: int,
    *,
    threads: int | None = None,
    storage_options: dict[str, Any] | None = None,
    on_done: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Read and decode every image once: (uint8 (N, S, S, 3) cache, ok mask (N,), [{"uri", "error"}] failures).

    Threads overlap object-store latency, and Pillow releases the GIL while it decodes and resizes.
    """
    n = len(uris)
    cache = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    errors: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            data = read_bounded(uris[i], storage_options)  # the tag reader's bounds: size cap, deadline
        except Exception as err:  # noqa: BLE001 - any read failure skips the image, counted and reported
            errors[i] = f"unreadable: {type(err).__name__}: {err}"
            return
        try:
            cache[i] = decode_image(data, image_size).array
            ok[i] = True
        except DecodeError as err:
            errors[i] = f"undecodable: {err}"

    with ThreadPoolExecutor(max_workers=threads or 2 * cores(), thread_name_prefix="decode") as pool:
        for k, _ in enumerate(pool.map(one, range(n)), 1):
            if on_done is not None and (k % PROGRESS_EVERY == 0 or k == n):
                on_done(k)
    failures = [{"uri": uris[i], "error": errors[i]} for i in sorted(errors)]
    return cache, ok, failures


@dataclass
class TrainData:
    """The decoded cache and targets the loop trains from (index arrays from ``Split`` point into them)."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    targets: dict[str, np.ndarray]

    def batch(self, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Images (uint8 NHWC) and targets of rows ``idx``, on ``device``."""
        idx = np.sort(idx)  # sorted gathers are faster; order within a batch does not matter
        x = torch.from_numpy(self.images[idx])
        y = {k: torch.from_numpy(v[idx]) for k, v in self.targets.items()}
        if device.type == "cuda":
            x = x.pin_memory()
        return x.to(device, non_blocking=True), {k: v.to(device, non_blocking=True) for k, v in y.items()}


@dataclass(frozen=True)
class Augment:
    """Augmentation on float (B, 3, H, W) batches in [0, 1]: one batched affine resample + optional colour."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: bool = True
    color_jitter: float = 0.0

    @classmethod
    def of(cls, cfg: TrainConfig) -> Augment | None:
        """The augmentation ``cfg`` asks for; None when it asks for none."""
        aug = cls(crop_scale=cfg.crop_scale, hflip=cfg.hflip, color_jitter=cfg.color_jitter)
        return aug if aug.geometric or aug.color_jitter > 0 else None

    @property
    def geometric(self) -> bool:
        return self.hflip or self.crop_scale != (1.0, 1.0)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.geometric:
            x = self._crop_and_flip(x, gen)
        if self.color_jitter > 0:
            x = self._jitter(x, gen)
        return x

    def _crop_and_flip(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        lo, hi = self.crop_scale
        area = torch.empty(b).uniform_(lo, hi, generator=gen)
        # Aspect ratio in [3/4, 4/3], narrowed so that the crop fits: area 1 means ratio 1 (no distortion).
        lo_r = torch.clamp(area.log(), min=math.log(3 / 4))
        hi_r = torch.clamp(-area.log(), max=math.log(4 / 3))
        ratio = (lo_r + torch.rand(b, generator=gen) * (hi_r - lo_r)).exp()
        w = (area * ratio).sqrt().clamp(max=1.0)  # crop size as a fraction of the image side
        h = (area / ratio).sqrt().clamp(max=1.0)
        tx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - w)  # crop centre, in [-1, 1] grid units
        ty = (torch.rand(b, generator=gen) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0) if self.hflip else torch.ones(b)
        theta = torch.zeros(b, 2, 3)
        theta[:, 0, 0] = w * flip
        theta[:, 0, 2] = tx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = ty
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _jitter(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        j = self.color_jitter
        shape = (x.shape[0], 1, 1, 1)
        bright = torch.empty(shape).uniform_(1 - j, 1 + j, generator=gen).to(x.device)
        contrast = torch.empty(shape).uniform_(1 - j, 1 + j, generator=gen).to(x.device)
        sat = torch.empty(shape).uniform_(1 - j, 1 + j, generator=gen).to(x.device)
        x = x * bright
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * contrast + mean
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
        return ((x - gray) * sat + gray).clamp(0, 1)


def colour_tasks(tasks: TaskConfig) -> list[str]:
    """Tasks whose name says they are about colour (colour jitter would destroy their labels)."""
    return [t.name for t in tasks.tasks if COLOUR_TASK_RE.search(t.name)]


def model_inputs(
    model: MultiHeadModel, x_uint8: torch.Tensor, aug: Augment | None, gen: torch.Generator
) -> torch.Tensor:
    """uint8 NHWC -> (augmented) normalised NCHW, exactly ``model.prepare`` when there is no augmentation."""
    if aug is None:
        x = model.prepare(x_uint8)
    else:
        x = x_uint8.permute(0, 3, 1, 2).float().div_(255.0)
        x = model.prepare(aug(x, gen))
    # channels_last helps cuDNN; on CPU (oneDNN) it measured no faster for these small convs.
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x
