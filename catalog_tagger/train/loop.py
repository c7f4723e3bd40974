"""Train the multi-head model from a labels table: validate, decode once, split, fit, tune thresholds, test, save.

Data flow: labels table + tasks.yaml are validated before any work -> every image is read (fsspec) and decoded
ONCE with ``decode_image`` (the serving preprocessing) into an in-memory uint8 cache -> a seeded stratified
train/val/test split -> epochs over the cache with augmentation on tensors -> best epoch restored -> per-label
thresholds tuned on val -> test metrics -> ``save_artifact``. ``train_ray`` runs the same ``fit`` loop on Ray
Train workers; ``--single-task`` trains one model per task on the same split and measures the cost ratio.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from catalog_tagger.config import TaskConfig, TaskSpec, load_tasks
from catalog_tagger.decode import decode_image
from catalog_tagger.errors import ConfigError, DecodeError, UserError
from catalog_tagger.model.artifact import ModelCard, card_for, save_artifact
from catalog_tagger.model.backbones import get_backbone
from catalog_tagger.model.inference import autocast, select_device, to_device
from catalog_tagger.model.multihead import MultiHeadModel, build_model, count_parameters
from catalog_tagger.model.weights import CARD_FILE
from catalog_tagger.storage import is_local, join, strip
from catalog_tagger.metrics import multiclass_metrics, multilabel_metrics, tune_thresholds

log = logging.getLogger(__name__)

SPLIT_FILE = "split.parquet"
METRICS_FILE = "metrics.csv"
REPORT_FILE = "training_report.json"
COMPARISON_FILE = "comparison.json"
SINGLE_TASK_DIR = "single_task"
SPLITS = ("train", "val", "test")
# Colour jitter shifts brightness and saturation: it would teach a colour head that white is sometimes grey.
_COLOUR_TASK_RE = re.compile(r"colou?r|hue", re.IGNORECASE)


# --------------------------------------------------------------------------------------------- config
class TrainConfig(BaseModel):
    """Everything ``train`` needs; validated before any image is read (the Prefect flow's parameter too)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: str  # tasks.yaml: local path or fsspec URL
    labels: str  # labels table (.parquet or .csv): a ``uri`` column and one column per task
    out: str  # model artifact directory to write (local path or fsspec URL)
    backbone: str = "small_cnn"  # backbone registry name (``catalog-tagger backbones``)
    image_size: int | None = Field(default=None, ge=8, le=1024)  # square input px; default: the backbone's (128)
    epochs: int = Field(default=15, ge=1)  # upper bound (and the cosine period); early stopping may end sooner
    batch_size: int = Field(default=64, ge=2)  # global batch (split across workers on Ray)
    lr: float = Field(default=2e-3, gt=0, le=1)  # AdamW peak learning rate
    weight_decay: float = Field(default=1e-4, ge=0)  # AdamW decoupled weight decay
    scheduler: Literal["cosine", "plateau"] = "cosine"  # cosine over ``epochs``, or ReduceLROnPlateau on val loss
    plateau_patience: int = Field(default=1, ge=0)  # epochs without improvement before the LR is cut
    plateau_factor: float = Field(default=0.3, gt=0, lt=1)  # LR multiplier at each cut
    patience: int = Field(default=4, ge=1)  # early stopping: epochs without val-loss improvement
    min_delta: float = Field(default=1e-4, ge=0)  # smallest val-loss decrease that counts as improvement
    val_fraction: float = Field(default=0.15, ge=0, lt=1)  # share of images held out to tune and stop on
    test_fraction: float = Field(default=0.15, ge=0, lt=1)  # share held out for the card's test metrics
    seed: int = 0  # split, init, shuffling and augmentation
    weights: str | None = None  # safetensors file with pretrained backbone weights (else hub cache / random)
    dropout: float = Field(default=0.0, ge=0, lt=1)  # dropout on the embedding before every head
    # Random resized crop area range; (1, 1) turns it off. Not lower by default: a tighter crop can cut a corner
    # sticker or a caption band out of the image and leave its badge label wrong.
    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: bool = True  # random horizontal flip
    color_jitter: float = Field(default=0.0, ge=0, le=0.5)  # brightness/contrast/saturation strength; 0 = off
    workers: int = Field(default=1, ge=1)  # >1: data-parallel on Ray Train (gloo on CPU)
    ray_address: str | None = None  # Ray cluster to train on (implies Ray Train even with 1 worker)
    ray_storage_path: str | None = None  # Ray Train run directory (default ~/ray_results); shared on multi-node
    single_task: bool = False  # also train one model per task and write comparison.json
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    threads: int | None = Field(default=None, ge=1)  # torch CPU threads; default: all cores
    decode_threads: int | None = Field(default=None, ge=1)  # threads reading + decoding; default 2 x cores
    max_images: int | None = Field(default=None, ge=1)  # use only the first N rows of the table (demo, smoke)
    timing_repeats: int = Field(default=7, ge=1)  # --single-task: timed forward passes per model (median)
    storage_options: dict[str, Any] | None = None  # fsspec options for the table, images and output
    progress: bool = True  # rich progress bars when stderr is a terminal

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale: need 0 < low <= high <= 1, got ({lo}, {hi})")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must leave images to train on, got "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        if self.weights and self.weights.endswith((".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")):
            raise ValueError(f"weights: {self.weights} looks like a pickle checkpoint; give a .safetensors file")
        return self

    @property
    def distributed(self) -> bool:
        return self.workers > 1 or self.ray_address is not None

    @classmethod
    def parse(cls, **values: Any) -> TrainConfig:
        """Build from loose values (CLI, flow params); unset (None) overrides are dropped so defaults win."""
        values = {k: v for k, v in values.items() if v is not None}
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            lines = [f"train: {'.'.join(str(x) for x in e['loc']) or '(config)'}: {e['msg']}" for e in err.errors()]
            raise ConfigError("\n".join(lines)) from None


@dataclass
class TrainResult:
    """What a training run produced; ``card`` is the saved model card."""

    out: str  # the artifact directory
    card: ModelCard
    metrics: dict[str, dict[str, Any]]  # test metrics per task (also in card.metrics)
    history: list[dict[str, Any]]  # one row per epoch (also metrics.csv)
    best_epoch: int
    epochs_run: int
    images_used: int
    skipped: list[dict[str, str]]  # {"uri", "error"} of images that could not be read or decoded
    seconds: float
    comparison: dict[str, Any] | None = None  # --single-task: comparison.json


# --------------------------------------------------------------------------------------------- labels table
@dataclass
class LabelTable:
    """Validated labels: resolved image URIs and, per task, targets (-1 where the label is missing).

    Multiclass targets are int64 (N,) class indices; multilabel targets are float32 (N, L) 0/1 rows, and a
    whole row of -1 when the image has no label for that task.
    """

    uris: list[str]
    targets: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.uris)

    def subset(self, idx: np.ndarray) -> LabelTable:
        return LabelTable(uris=[self.uris[i] for i in idx], targets={k: v[idx] for k, v in self.targets.items()})


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return isinstance(v, str) and not v.strip()


def _multilabel_values(v: Any) -> list[str] | None:
    """A multilabel cell as a list of labels; None when missing. CSV cells are ``a|b``; ``[]`` is "no labels"."""
    if isinstance(v, (list, tuple, np.ndarray)):
        return [str(x).strip() for x in v if not _is_missing(x)]
    if _is_missing(v):
        return None
    s = str(v).strip()
    if s == "[]":
        return []
    return [p.strip() for p in s.split("|") if p.strip()]


def _table_dir(uri: str) -> str:
    if is_local(uri):
        return os.path.dirname(strip(uri))
    return uri.rsplit("/", 1)[0]


def _resolve_uri(uri: str, base: str) -> str:
    if "://" in uri or os.path.isabs(uri):
        return uri
    return join(base, uri)


def read_table(uri: str, storage_options: dict[str, Any] | None = None) -> dict[str, list[Any]]:
    """Column name -> Python values, from Parquet or CSV (by extension; Parquet when in doubt)."""
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
            data = fh.read()
    except FileNotFoundError:
        raise UserError(f"{uri}: labels table not found") from None
    name = uri.lower().split("?", 1)[0]
    try:
        if name.endswith((".csv", ".csv.gz", ".tsv")):
            import pandas as pd

            sep = "\t" if name.endswith(".tsv") else ","
            compression = "gzip" if name.endswith(".gz") else None
            df = pd.read_csv(
                io.BytesIO(data), dtype=str, keep_default_na=False, na_values=[""], sep=sep, compression=compression
            )
            return {str(c): [None if _is_missing(v) else v for v in df[c].tolist()] for c in df.columns}
        return pq.read_table(pa.BufferReader(data)).to_pydict()
    except (pa.ArrowInvalid, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{uri}: cannot read the labels table ({err}); give a Parquet or CSV file") from None


def load_labels(uri: str, tasks: TaskConfig, storage_options: dict[str, Any] | None = None) -> LabelTable:
    """Read and validate the labels table against ``tasks``; every problem is reported before any work."""
    cols = read_table(uri, storage_options)
    source = uri.rsplit("/", 1)[-1]
    have = sorted(cols)
    if "uri" not in cols:
        raise UserError(
            f"{source}: no 'uri' column (columns: {', '.join(have) or 'none'}); "
            "the table needs a 'uri' column with image paths (absolute or relative to the table) or URLs"
        )
    absent = [t.name for t in tasks.tasks if t.name not in cols]
    if absent:
        raise UserError(
            f"{source}: no column for task(s) {', '.join(repr(a) for a in absent)} declared in tasks.yaml "
            f"(columns: {', '.join(have)}); add the column (values may be empty) or remove the task"
        )
    extra = [c for c in have if c != "uri" and c not in tasks.names]
    if extra:
        log.info("%s: ignoring columns not in tasks.yaml: %s", source, ", ".join(extra))
    raw_uris = cols["uri"]
    n = len(raw_uris)
    if n == 0:
        raise UserError(f"{source}: the table has no rows")
    blank = [i for i, u in enumerate(raw_uris) if _is_missing(u)]
    if blank:
        raise UserError(f"{source}: {len(blank)} row(s) have no uri (first at row {blank[0]}); fill or drop them")

    unknown: Counter[tuple[str, str]] = Counter()
    targets: dict[str, np.ndarray] = {}
    for task in tasks.tasks:
        index = task.label_index()
        values = cols[task.name]
        if task.kind == "multiclass":
            y = np.full(n, -1, dtype=np.int64)
            for i, v in enumerate(values):
                if _is_missing(v):
                    continue
                if isinstance(v, (list, tuple, np.ndarray)):
                    unknown[(task.name, f"<a list: {list(v)}>")] += 1
                    continue
                label = str(v).strip()
                if label in index:
                    y[i] = index[label]
                else:
                    unknown[(task.name, label)] += 1
        else:
            y = np.full((n, len(task.labels)), -1.0, dtype=np.float32)
            for i, v in enumerate(values):
                labels = _multilabel_values(v)
                if labels is None:
                    continue
                y[i] = 0.0
                for label in labels:
                    if label in index:
                        y[i, index[label]] = 1.0
                    else:
                        unknown[(task.name, label)] += 1
        targets[task.name] = y
    if unknown:
        pairs = sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))
        shown = ", ".join(f"{t}={label!r} ({c} row{'s' if c != 1 else ''})" for (t, label), c in pairs[:20])
        more = f" and {len(pairs) - 20} more" if len(pairs) > 20 else ""
        raise UserError(
            f"{source}: {len(pairs)} label value(s) are not in tasks.yaml: {shown}{more}; "
            "add them to the task's labels in tasks.yaml, or fix or clear them in the table"
        )

    base = _table_dir(uri)
    uris = [_resolve_uri(str(u).strip(), base) for u in raw_uris]
    seen: dict[str, int] = {}
    keep: list[int] = []
    for i, u in enumerate(uris):
        if u not in seen:
            seen[u] = i
            keep.append(i)
    table = LabelTable(uris=uris, targets=targets)
    if len(keep) < n:
        # A duplicate would sit in two splits and leak test images into training.
        log.warning("%s: %d duplicate uri row(s) dropped (the first row of each uri is kept)", source, n - len(keep))
        table = table.subset(np.asarray(keep))
    for task in tasks.tasks:
        if labelled_mask(table.targets[task.name]).sum() == 0:
            log.warning("%s: task %r has no labels at all; its head will not learn", source, task.name)
    return table


def labelled_mask(y: np.ndarray) -> np.ndarray:
    """Rows that carry a label for this task."""
    return y >= 0 if y.ndim == 1 else y[:, 0] >= 0


# --------------------------------------------------------------------------------------------- decode once
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
    from catalog_tagger.tag.predictor import read_with_retries

    n = len(uris)
    cache = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    errors: dict[int, str] = {}

    def one(i: int) -> None:
        try:
            data = read_with_retries(uris[i], storage_options)
        except Exception as err:  # noqa: BLE001 - any read failure skips the image, counted and reported
            errors[i] = f"unreadable: {type(err).__name__}: {err}"
            return
        try:
            cache[i] = decode_image(data, image_size).array
            ok[i] = True
        except DecodeError as err:
            errors[i] = f"undecodable: {err}"

    workers = threads or 2 * _cores()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        for k, _ in enumerate(pool.map(one, range(n)), 1):
            if on_done is not None and (k % 32 == 0 or k == n):
                on_done(k)
    failures = [{"uri": uris[i], "error": errors[i]} for i in sorted(errors)]
    return cache, ok, failures


# --------------------------------------------------------------------------------------------- split
@dataclass
class Split:
    """Index arrays into the decoded data; ``stratify`` is the task the split was stratified on."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    stratify: str | None
    fractions: dict[str, float]
    seed: int

    def counts(self) -> dict[str, int]:
        return {"train": int(self.train.size), "val": int(self.val.size), "test": int(self.test.size)}

    def names(self, n: int) -> list[str]:
        out = [""] * n
        for name in SPLITS:
            for i in getattr(self, name):
                out[int(i)] = name
        return out


def make_split(tasks: TaskConfig, targets: dict[str, np.ndarray], *, val: float, test: float, seed: int) -> Split:
    """Seeded split, stratified on the first multiclass task (images without that label form their own stratum)."""
    first = next((t for t in tasks.tasks if t.kind == "multiclass"), None)
    n = len(next(iter(targets.values())))
    strata = targets[first.name] if first is not None else np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5EED])
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for value in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == value))
        m = members.size
        n_test = int(math.floor(m * test + 0.5))
        n_val = int(math.floor(m * val + 0.5))
        if m > 1 and n_test + n_val >= m:  # tiny stratum: keep at least one image to train on
            n_test = min(n_test, m - 1)
            n_val = min(n_val, m - 1 - n_test)
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test : n_test + n_val])
        parts["train"].append(members[n_test + n_val :])
    arrays = {k: np.sort(np.concatenate(v)) if v else np.zeros(0, dtype=np.int64) for k, v in parts.items()}
    return Split(
        train=arrays["train"],
        val=arrays["val"],
        test=arrays["test"],
        stratify=first.name if first is not None else None,
        fractions={"train": round(1 - val - test, 6), "val": val, "test": test},
        seed=seed,
    )


def split_digest(uris: Sequence[str], names: Sequence[str]) -> str:
    h = hashlib.sha256()
    for u, s in sorted(zip(uris, names, strict=True)):
        h.update(f"{u}\t{s}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class Augment:
    """Augmentation on float (B, 3, H, W) batches in [0, 1]: one batched affine resample + optional colour."""

    crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: bool = True
    color_jitter: float = 0.0

    @property
    def geometric(self) -> bool:
        return self.hflip or self.crop_scale != (1.0, 1.0)

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        b = x.shape[0]
        if self.geometric:
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
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.color_jitter > 0:
            j = self.color_jitter
            shape = (b, 1, 1, 1)
            bright = torch.empty(shape).uniform_(1 - j, 1 + j, generator=gen).to(x.device)
            contrast = torch.empty(shape).uniform_(1 - j, 1 + j, generator=gen).to(x.device)
            sat = torch.empty(shape).uniform_(1 - j, 1 + j, generator=gen).to(x.device)
            x = x * bright
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * contrast + mean
            gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
            x = ((x - gray) * sat + gray).clamp(0, 1)
        return x


def colour_tasks(tasks: TaskConfig) -> list[str]:
    """Tasks whose name says they are about colour (colour jitter would destroy their labels)."""
    return [t.name for t in tasks.tasks if _COLOUR_TASK_RE.search(t.name)]


# --------------------------------------------------------------------------------------------- loss
def task_losses(
    logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], tasks: Sequence[TaskSpec]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per task: (sum of per-image losses over labelled images, number of labelled images).

    Cross-entropy for multiclass, BCE-with-logits summed over labels for multilabel. A missing label multiplies
    that image's loss by 0: no imputation, and exactly zero gradient from it. Keeping every head in the graph
    (rather than dropping unlabelled rows) also keeps DDP's gradient buckets identical on every worker.
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for task in tasks:
        z = logits[task.name].float()
        y = targets[task.name]
        if task.kind == "multiclass":
            mask = (y >= 0).float()
            per = F.cross_entropy(z, y.clamp(min=0), reduction="none")
        else:
            mask = (y[:, 0] >= 0).float()
            # Summed over labels: each label is its own binary decision, and a mean would shrink every label's
            # gradient as labels are added (with 3 badges, to a third of a multiclass task's).
            per = F.binary_cross_entropy_with_logits(z, y.clamp(min=0), reduction="none").sum(1)
        out[task.name] = ((per * mask).sum(), mask.sum())
    return out


def combine_losses(parts: dict[str, tuple[torch.Tensor, torch.Tensor]], tasks: Sequence[TaskSpec]) -> torch.Tensor:
    """sum over tasks of weight x (mean loss over the batch's labelled images for that task)."""
    total = torch.zeros((), device=next(iter(parts.values()))[0].device)
    for task in tasks:
        s, c = parts[task.name]
        total = total + task.weight * s / c.clamp(min=1.0)
    return total


# --------------------------------------------------------------------------------------------- data on tensors
@dataclass
class TrainData:
    """The decoded cache and targets the loop trains from (index arrays from ``Split`` point into them)."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    targets: dict[str, np.ndarray]

    def batch(self, idx: np.ndarray, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        idx = np.sort(idx)  # sorted gathers are faster; order within a batch does not matter
        x = torch.from_numpy(self.images[idx])
        y = {k: torch.from_numpy(v[idx]) for k, v in self.targets.items()}
        if device.type == "cuda":
            x = x.pin_memory()
        return x.to(device, non_blocking=True), {k: v.to(device, non_blocking=True) for k, v in y.items()}


def _inputs(model: MultiHeadModel, x_uint8: torch.Tensor, aug: Augment | None, gen: torch.Generator) -> torch.Tensor:
    """uint8 NHWC -> (augmented) normalised NCHW, exactly ``model.prepare`` when there is no augmentation."""
    if aug is None:
        x = model.prepare(x_uint8)
    else:
        x = x_uint8.permute(0, 3, 1, 2).float().div_(255.0)
        x = model.prepare(aug(x, gen))
    # channels_last helps cuDNN; on CPU (oneDNN) it measured no faster for these small convs.
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


# --------------------------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    """Loss and per-task scores (softmax / sigmoid) of one split."""

    loss: float
    task_loss: dict[str, float]
    scores: dict[str, np.ndarray]  # task -> (N, L) probabilities
    targets: dict[str, np.ndarray]  # task -> targets as in LabelTable

    def metrics(self, tasks: Sequence[TaskSpec], thresholds: dict[str, Sequence[float]] | None = None) -> dict:
        out: dict[str, dict[str, Any]] = {}
        for task in tasks:
            y, s = self.targets[task.name], self.scores[task.name]
            m = labelled_mask(y)
            if task.kind == "multiclass":
                out[task.name] = multiclass_metrics(y[m], s[m].argmax(1), len(task.labels))
            else:
                thr = (thresholds or {}).get(task.name) or [task.effective_threshold] * len(task.labels)
                out[task.name] = multilabel_metrics(y[m] > 0.5, s[m], thr, labels=task.labels)
        return out


@torch.inference_mode()
def evaluate(
    model: MultiHeadModel, data: TrainData, idx: np.ndarray, device: torch.device, *, batch_size: int, amp: bool
) -> Evaluation:
    model.eval()
    idx = np.sort(idx)  # scores come back in index order, aligned with the targets below
    tasks = model.tasks.tasks
    sums = {t.name: 0.0 for t in tasks}
    counts = {t.name: 0.0 for t in tasks}
    scores: dict[str, list[np.ndarray]] = {t.name: [] for t in tasks}
    gen = torch.Generator()
    for start in range(0, idx.size, batch_size):
        chunk = idx[start : start + batch_size]
        x, y = data.batch(chunk, device)
        with autocast(device, bf16_only=True) if amp else nullcontext():
            out = model(_inputs(model, x, None, gen))
        for name, (s, c) in task_losses(out.logits, y, tasks).items():
            sums[name] += float(s)
            counts[name] += float(c)
        for t in tasks:
            z = out.logits[t.name].float()
            scores[t.name].append((z.softmax(-1) if t.kind == "multiclass" else z.sigmoid()).cpu().numpy())
    task_loss = {k: sums[k] / counts[k] if counts[k] else 0.0 for k in sums}
    return Evaluation(
        loss=float(sum(t.weight * task_loss[t.name] for t in tasks)),
        task_loss=task_loss,
        scores={
            k: np.concatenate(v) if v else np.zeros((0, len(model.tasks.task(k).labels)), np.float32)
            for k, v in scores.items()
        },
        targets={t.name: data.targets[t.name][idx] for t in tasks},
    )


def _headline(metrics: dict[str, dict[str, Any]], tasks: Sequence[TaskSpec], prefix: str) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for task in tasks:
        m = metrics[task.name]
        keys = ("accuracy", "macro_f1") if task.kind == "multiclass" else ("micro_f1", "macro_f1", "map")
        for k in keys:
            row[f"{prefix}{task.name}_{k}"] = None if m.get(k) is None else round(float(m[k]), 5)
    return row


# --------------------------------------------------------------------------------------------- the loop
@dataclass
class Dist:
    """This process's place in data-parallel training; the default is a single process."""

    rank: int = 0
    world: int = 1

    def broadcast(self, value: float) -> float:
        """Rank 0's value on every rank (so all ranks take the same early-stopping decision)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.broadcast(t, src=0)
        return float(t.item())

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    epochs_run: int
    stopped_early: bool


class _Bar:
    """A rich progress bar when stderr is a terminal; nothing otherwise (epochs are logged either way)."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self._progress = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self._task = self._progress.add_task(description, total=total, info="")
            self._progress.start()

    def update(self, completed: int | None = None, *, advance: int = 0, info: str | None = None) -> None:
        if self._progress is not None:
            kw: dict[str, Any] = {"advance": advance}
            if completed is not None:
                kw = {"completed": completed}
            if info is not None:
                kw["info"] = info
            self._progress.update(self._task, **kw)

    def reset(self, description: str, total: int) -> None:
        if self._progress is not None:
            self._progress.reset(self._task, total=total, description=description, info="")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


def fit(
    model: MultiHeadModel,
    data: TrainData,
    split: Split,
    cfg: TrainConfig,
    device: torch.device,
    *,
    net: torch.nn.Module | None = None,
    dist: Dist | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    label: str = "train",
) -> FitResult:
    """Train ``model`` in place on ``split.train`` and restore its best epoch (lowest val loss).

    ``net`` is what the training step calls (a DDP wrapper of ``model`` on Ray); evaluation, early stopping and
    the best-state copy use ``model``. Under DDP every rank draws the same permutation and takes its own
    stride of it, and rank 0's val loss is broadcast so all ranks stop on the same epoch.
    """
    dist = dist or Dist()
    net = net or model
    tasks = model.tasks.tasks
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.scheduler == "plateau":
        sched: Any = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt,
            mode="min",
            factor=cfg.plateau_factor,
            patience=cfg.plateau_patience,
            threshold=cfg.min_delta,
            threshold_mode="abs",
        )
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr * 0.01)
    aug = Augment(crop_scale=cfg.crop_scale, hflip=cfg.hflip, color_jitter=cfg.color_jitter)
    aug_or_none = aug if (aug.geometric or aug.color_jitter > 0) else None
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 17 + dist.rank)
    per_rank_batch = max(2, cfg.batch_size // dist.world)
    has_val = split.val.size > 0
    if not has_val:
        log.warning("%s: no validation images; early stopping and LR cuts follow the training loss", label)
    best_loss, best_epoch, bad, stopped = math.inf, 0, 0, False
    best_state = copy.deepcopy(model.state_dict())
    history: list[dict[str, Any]] = []
    steps = math.ceil((split.train.size // dist.world) / per_rank_batch)
    bar = _Bar(cfg.progress and dist.rank == 0, f"{label} epoch 1/{cfg.epochs}", steps)
    epoch = 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            perm = np.random.default_rng([cfg.seed, epoch]).permutation(split.train)
            perm = perm[: (perm.size // dist.world) * dist.world][dist.rank :: dist.world]
            # A trailing batch of 1 breaks BatchNorm's batch statistics; fold it into the previous batch.
            bounds = list(range(0, perm.size, per_rank_batch))
            if len(bounds) > 1 and perm.size - bounds[-1] < 2:
                bounds.pop()
            bar.reset(f"{label} epoch {epoch}/{cfg.epochs}", len(bounds))
            loss_sum, loss_n = 0.0, 0
            for b, start in enumerate(bounds):
                end = bounds[b + 1] if b + 1 < len(bounds) else perm.size
                x, y = data.batch(perm[start:end], device)
                with autocast(device, bf16_only=True) if cfg.amp else nullcontext():
                    out = net(_inputs(model, x, aug_or_none, gen))
                loss = combine_losses(task_losses(out.logits, y, tasks), tasks)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * (end - start)
                loss_n += end - start
                bar.update(advance=1, info=f"loss {loss_sum / max(loss_n, 1):.4f}")
            train_loss = dist.mean(loss_sum / max(loss_n, 1))
            row: dict[str, Any] = {"epoch": epoch, "lr": float(f"{opt.param_groups[0]['lr']:.4g}")}
            val_metrics: dict[str, Any] = {}
            val_loss = train_loss
            if has_val and dist.rank == 0:
                ev = evaluate(model, data, split.val, device, batch_size=max(cfg.batch_size, 128), amp=cfg.amp)
                val_loss = ev.loss
                val_metrics = _headline(ev.metrics(tasks), tasks, "val_")
                val_metrics.update({f"val_{k}_loss": round(v, 5) for k, v in ev.task_loss.items()})
            val_loss = dist.broadcast(val_loss)
            if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                sched.step(val_loss)
            else:
                sched.step()
            improved = val_loss < best_loss - cfg.min_delta
            if improved:
                best_loss, best_epoch, bad = val_loss, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
            row.update(
                seconds=round(time.perf_counter() - t0, 2),
                train_loss=round(train_loss, 5),
                val_loss=round(val_loss, 5) if has_val else None,
            )
            row.update(val_metrics)
            history.append(row)
            log.info(
                "%s epoch %d/%d: train loss %.4f, val loss %s, lr %.2g, %.1fs%s%s",
                label,
                epoch,
                cfg.epochs,
                train_loss,
                f"{val_loss:.4f}" if has_val else "-",
                row["lr"],
                row["seconds"],
                "".join(f", {k.removeprefix('val_')} {v:.3f}" for k, v in val_metrics.items() if _is_headline(k, v)),
                " *" if improved else "",
            )
            if on_epoch is not None:
                on_epoch(row)
            if bad >= cfg.patience:
                stopped = True
                log.info("%s: early stop after epoch %d (best epoch %d)", label, epoch, best_epoch)
                break
    finally:
        bar.close()
    model.load_state_dict(best_state)
    return FitResult(history=history, best_epoch=best_epoch, epochs_run=epoch, stopped_early=stopped)


def _is_headline(key: str, value: Any) -> bool:
    return value is not None and key.endswith(("_accuracy", "_micro_f1"))


# --------------------------------------------------------------------------------------------- outputs
def _write_bytes(out: str, name: str, data: bytes, storage_options: dict[str, Any] | None) -> None:
    fs, root = fsspec.core.url_to_fs(out, **(storage_options or {}))
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(root.rstrip("/") + "/" + name, data)


def metrics_csv(history: list[dict[str, Any]]) -> bytes:
    """The per-epoch log: fixed leading columns, then every per-task val column in first-seen order."""
    lead = ["epoch", "lr", "seconds", "train_loss", "val_loss"]
    cols = list(lead)
    for row in history:
        cols.extend(k for k in row if k not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, restval="", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue().encode()


def split_parquet(uris: Sequence[str], names: Sequence[str]) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"uri": pa.array(uris, pa.string()), "split": pa.array(names, pa.string())}), buf)
    return buf.getvalue().to_pybytes()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # respects taskset/cgroup pinning, unlike os.cpu_count()
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def _thread_count(cfg: TrainConfig) -> int:
    return cfg.threads or _cores()


# --------------------------------------------------------------------------------------------- entry point
def resolve(cfg: TrainConfig) -> TrainConfig:
    """The config with defaults that depend on other fields filled in (image size: the backbone's default)."""
    spec = get_backbone(cfg.backbone)
    size = cfg.image_size or spec.default_image_size
    if size < spec.min_image_size:
        raise UserError(f"image size {size} is below {cfg.backbone}'s minimum of {spec.min_image_size} px")
    return cfg if cfg.image_size == size else cfg.model_copy(update={"image_size": size})


def validate(cfg: TrainConfig) -> tuple[TaskConfig, LabelTable]:
    """Every check that needs no image: tasks, backbone, sizes, augmentation vs tasks, and the labels table."""
    tasks = load_tasks(cfg.tasks)
    resolve(cfg)
    if cfg.color_jitter > 0:
        named = colour_tasks(tasks)
        if named:
            raise UserError(
                f"colour jitter ({cfg.color_jitter}) would destroy the labels of colour task(s) {', '.join(named)}: "
                "set color_jitter to 0 (the default) for this task set"
            )
    table = load_labels(cfg.labels, tasks, cfg.storage_options)
    if cfg.max_images is not None and cfg.max_images < len(table):
        table = table.subset(np.arange(cfg.max_images))
    return tasks, table


def train(cfg: TrainConfig) -> TrainResult:
    """Validate, decode once, split, fit, tune thresholds on val, measure on test, and save the artifact."""
    t_start = time.perf_counter()
    cfg = resolve(cfg)
    tasks, table = validate(cfg)
    device = select_device(cfg.device)
    fs, root = fsspec.core.url_to_fs(cfg.out, **(cfg.storage_options or {}))
    if fs.exists(root.rstrip("/") + "/" + CARD_FILE):
        log.warning("%s already holds a model artifact: it will be overwritten", cfg.out)
    torch.set_num_threads(_thread_count(cfg))
    log.info(
        "train: %d images, %d tasks (%s), backbone %s at %d px, device %s, %d thread(s)",
        len(table),
        len(tasks.tasks),
        ", ".join(tasks.names),
        cfg.backbone,
        cfg.image_size,
        device,
        torch.get_num_threads(),
    )

    # Decode every image once, with the serving preprocessing, into memory.
    t0 = time.perf_counter()
    bar = _Bar(cfg.progress, "decode", len(table))
    try:
        cache, ok, skipped = decode_all(
            table.uris,
            cfg.image_size,
            threads=cfg.decode_threads,
            storage_options=cfg.storage_options,
            on_done=lambda k: bar.update(completed=k),
        )
    finally:
        bar.close()
    decode_s = time.perf_counter() - t0
    for s in skipped[:10]:
        log.warning("skipped %s: %s", s["uri"], s["error"])
    if len(skipped) > 10:
        log.warning("... and %d more skipped images (all listed in %s)", len(skipped) - 10, REPORT_FILE)
    keep = np.flatnonzero(ok)
    if keep.size < 3:
        raise UserError(f"{cfg.labels}: only {keep.size} of {len(table)} images could be read and decoded")
    table = table.subset(keep)
    data = TrainData(images=cache[keep], targets=table.targets)
    del cache
    log.info(
        "decoded %d images in %.1fs (%.0f img/s); %d skipped",
        keep.size,
        decode_s,
        len(ok) / max(decode_s, 1e-9),
        len(skipped),
    )

    split = make_split(tasks, table.targets, val=cfg.val_fraction, test=cfg.test_fraction, seed=cfg.seed)
    names = split.names(len(table))
    _write_bytes(cfg.out, SPLIT_FILE, split_parquet(table.uris, names), cfg.storage_options)
    log.info("split %s (stratified on %s, seed %d)", split.counts(), split.stratify, split.seed)

    # Train.
    t0 = time.perf_counter()
    if cfg.distributed:
        from catalog_tagger.train.distributed import fit_on_ray

        model, fit_res = fit_on_ray(cfg, tasks, data, split)
        to_device(model, device)
        _write_bytes(cfg.out, METRICS_FILE, metrics_csv(fit_res.history), cfg.storage_options)
    else:
        torch.manual_seed(cfg.seed)
        model = build_model(backbone=cfg.backbone, tasks=tasks, weights=cfg.weights, dropout=cfg.dropout)
        to_device(model, device)
        history: list[dict[str, Any]] = []

        def log_epoch(row: dict[str, Any]) -> None:
            history.append(row)
            _write_bytes(cfg.out, METRICS_FILE, metrics_csv(history), cfg.storage_options)

        fit_res = fit(model, data, split, cfg, device, on_epoch=log_epoch)
    fit_s = time.perf_counter() - t0

    thresholds, metrics = tune_and_test(model, data, split, cfg, device)
    card = card_for(model, image_size=cfg.image_size)
    for t in card.tasks:
        if t["name"] in thresholds:
            t["label_thresholds"] = thresholds[t["name"]]
    card.metrics = metrics
    label_counts = {name: int(labelled_mask(y).sum()) for name, y in table.targets.items()}
    card.training = {
        "labels": cfg.labels,
        "images": {"rows": len(ok), "used": int(keep.size), "skipped": len(skipped)},
        "skipped_images": len(skipped),
        "labelled": label_counts,
        "split": {
            "fractions": split.fractions,
            "seed": split.seed,
            "stratify": split.stratify,
            "counts": split.counts(),
            "file": SPLIT_FILE,
            "sha256": split_digest(table.uris, names),
        },
        "epochs": {"max": cfg.epochs, "run": fit_res.epochs_run, "best": fit_res.best_epoch},
        "stopped_early": fit_res.stopped_early,
        "optimizer": {"name": "AdamW", "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        "scheduler": cfg.scheduler,
        "batch_size": cfg.batch_size,
        "augment": {"crop_scale": list(cfg.crop_scale), "hflip": cfg.hflip, "color_jitter": cfg.color_jitter},
        "workers": cfg.workers,
        "device": str(device),
        "seed": cfg.seed,
        "seconds": {"decode": round(decode_s, 2), "fit": round(fit_s, 2)},
    }
    card = save_artifact(model.cpu(), card, cfg.out)
    model.to(device)
    log.info("saved model artifact %s (version %s)", cfg.out, card.version)

    comparison = None
    if cfg.single_task:
        comparison = compare_single_task(cfg, tasks, model, metrics, data, split, device)
        _write_bytes(cfg.out, COMPARISON_FILE, json.dumps(comparison, indent=2).encode(), cfg.storage_options)

    seconds = time.perf_counter() - t_start
    report = {
        "labels": cfg.labels,
        "images": {"rows": len(ok), "used": int(keep.size), "skipped": len(skipped)},
        "skipped": skipped,
        "labelled": label_counts,
        "split": split.counts(),
        "epochs_run": fit_res.epochs_run,
        "best_epoch": fit_res.best_epoch,
        "test_metrics": metrics,
        "model_version": card.version,
        "seconds": {"decode": round(decode_s, 2), "fit": round(fit_s, 2), "total": round(seconds, 2)},
        "config": cfg.model_dump(mode="json", exclude={"storage_options"}),
    }
    _write_bytes(cfg.out, REPORT_FILE, json.dumps(report, indent=2).encode(), cfg.storage_options)
    log.info("training finished in %.1fs", seconds)
    return TrainResult(
        out=cfg.out,
        card=card,
        metrics=metrics,
        history=fit_res.history,
        best_epoch=fit_res.best_epoch,
        epochs_run=fit_res.epochs_run,
        images_used=int(keep.size),
        skipped=skipped,
        seconds=seconds,
        comparison=comparison,
    )


def tune_and_test(
    model: MultiHeadModel, data: TrainData, split: Split, cfg: TrainConfig, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
    """Per-label thresholds of multilabel tasks tuned on val, then test metrics at those thresholds."""
    tasks = model.tasks.tasks
    bs = max(cfg.batch_size, 128)
    thresholds: dict[str, list[float]] = {}
    if split.val.size:
        ev = evaluate(model, data, split.val, device, batch_size=bs, amp=cfg.amp)
        for task in tasks:
            if task.kind == "multilabel":
                y = ev.targets[task.name]
                m = labelled_mask(y)
                thresholds[task.name] = tune_thresholds(y[m] > 0.5, ev.scores[task.name][m], default=0.5)
    if split.test.size == 0:
        log.warning("no test images: the card has no test metrics")
        return thresholds, {}
    ev = evaluate(model, data, split.test, device, batch_size=bs, amp=cfg.amp)
    metrics = ev.metrics(tasks, thresholds)
    for task in tasks:
        m = metrics[task.name]
        if task.kind == "multiclass":
            log.info(
                "test %s: accuracy %s, macro-F1 %s (n=%d)", task.name, _f(m["accuracy"]), _f(m["macro_f1"]), m["n"]
            )
        else:
            log.info(
                "test %s: micro-F1 %s, macro-F1 %s, mAP %s (n=%d, thresholds %s)",
                task.name,
                _f(m["micro_f1"]),
                _f(m["macro_f1"]),
                _f(m["map"]),
                m["n"],
                thresholds.get(task.name),
            )
    return thresholds, metrics


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


# --------------------------------------------------------------------------------------------- single-task
HEADLINE = {"multiclass": "accuracy", "multilabel": "micro_f1"}


def _sample_ms_per_image(fn: Callable[[], Any], n_images: int, samples: list[float]) -> None:
    t0 = time.perf_counter()
    fn()
    samples.append((time.perf_counter() - t0) * 1000 / n_images)


def time_models(
    models: dict[str, MultiHeadModel], images: np.ndarray, device: torch.device, *, repeats: int
) -> dict[str, float]:
    """Median ms/image of each model's forward pass on the same batch, measured interleaved in this process.

    Interleaving (multi, single_1, ..., single_n, multi, ...) spreads any background load on a shared machine
    over all models instead of biasing whichever ran during a busy spell.
    """
    samples: dict[str, list[float]] = {k: [] for k in models}
    x = torch.from_numpy(images).to(device)
    prepared = {k: _inputs(m.eval(), x, None, torch.Generator()) for k, m in models.items()}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        for k, m in models.items():  # warm-up: allocator, kernels, oneDNN primitive caches
            m(prepared[k])
            m(prepared[k])
        sync()
        for _ in range(repeats):
            for k, m in models.items():

                def run(k: str = k, m: MultiHeadModel = m) -> None:
                    m(prepared[k])
                    sync()

                _sample_ms_per_image(run, images.shape[0], samples[k])
    return {k: statistics.median(v) for k, v in samples.items()}


def compare_single_task(
    cfg: TrainConfig,
    tasks: TaskConfig,
    multi: MultiHeadModel,
    multi_metrics: dict[str, dict[str, Any]],
    data: TrainData,
    split: Split,
    device: torch.device,
) -> dict[str, Any]:
    """Train one single-head model per task (same backbone, budget, split), then compare quality, size and speed."""
    singles: dict[str, MultiHeadModel] = {}
    single_metrics: dict[str, dict[str, Any]] = {}
    single_epochs: dict[str, int] = {}
    for task in tasks.tasks:
        sub = TaskConfig(tasks=(task,))
        torch.manual_seed(cfg.seed)
        m = build_model(backbone=cfg.backbone, tasks=sub, weights=cfg.weights, dropout=cfg.dropout)
        to_device(m, device)
        res = fit(m, data, split, cfg, device, label=f"single-task {task.name}")
        thr, met = tune_and_test(m, data, split, cfg, device)
        card = card_for(m, image_size=cfg.image_size)
        for t in card.tasks:
            if t["name"] in thr:
                t["label_thresholds"] = thr[t["name"]]
        card.metrics = met
        card.training = {"single_task_of": cfg.out, "epochs": {"run": res.epochs_run, "best": res.best_epoch}}
        save_artifact(m.cpu(), card, join(cfg.out, SINGLE_TASK_DIR, task.name))
        m.to(device)
        singles[task.name] = m
        single_metrics[task.name] = met.get(task.name, {})
        single_epochs[task.name] = res.epochs_run

    # Time every model on the same batch of held-out images.
    pool = split.test if split.test.size else (split.val if split.val.size else split.train)
    batch = data.images[np.sort(pool)[: cfg.batch_size]]
    models: dict[str, MultiHeadModel] = {"__multi__": multi, **singles}
    ms = time_models(models, batch, device, repeats=cfg.timing_repeats)
    multi_params = count_parameters(multi)
    per_task: dict[str, Any] = {}
    for task in tasks.tasks:
        key = HEADLINE[task.kind]
        mm, sm = multi_metrics.get(task.name, {}), single_metrics[task.name]
        per_task[task.name] = {
            "kind": task.kind,
            "metric": key,
            "multi_head": mm.get(key),
            "single_task": sm.get(key),
            "single_task_parameters": count_parameters(singles[task.name]),
            "single_task_ms_per_image": round(ms[task.name], 4),
            "single_task_epochs": single_epochs[task.name],
            "multi_head_metrics": {k: v for k, v in mm.items() if k != "per_label"},
            "single_task_metrics": {k: v for k, v in sm.items() if k != "per_label"},
        }
    single_ms = sum(ms[t.name] for t in tasks.tasks)
    single_params = sum(v["single_task_parameters"] for v in per_task.values())
    comparison = {
        "n_tasks": len(tasks.tasks),
        "backbone": cfg.backbone,
        "image_size": cfg.image_size,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "timing": {"batch_size": int(batch.shape[0]), "repeats": cfg.timing_repeats, "statistic": "median"},
        "multi_head": {"parameters": multi_params, "ms_per_image": round(ms["__multi__"], 4)},
        "single_task_total": {"parameters": single_params, "ms_per_image": round(single_ms, 4)},
        "cost_ratio": round(single_ms / ms["__multi__"], 3),
        "parameter_ratio": round(single_params / multi_params, 3),
        "tasks": per_task,
    }
    log.info(
        "single-task comparison: %d tasks, measured cost ratio %.2f (sum of single-task ms / multi-head ms)",
        len(tasks.tasks),
        comparison["cost_ratio"],
    )
    return comparison


def iter_comparison_rows(comparison: dict[str, Any]) -> Iterator[tuple[str, ...]]:
    """Rows for the console table: task, metric, multi-head, single-task, single-task params, ms/image."""
    for name, t in comparison["tasks"].items():
        yield (
            name,
            t["metric"],
            _f(t["multi_head"]),
            _f(t["single_task"]),
            f"{t['single_task_parameters']:,}",
            f"{t['single_task_ms_per_image']:.3f}",
        )


__all__ = [
    "TrainConfig",
    "TrainResult",
    "train",
    "validate",
    "load_labels",
    "make_split",
    "fit",
    "evaluate",
    "task_losses",
    "combine_losses",
    "Augment",
]
