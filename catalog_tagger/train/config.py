"""Training configuration: ``TrainConfig``, validated before any image is read (the Prefect flow's parameter too).

Kept free of torch so that the CLI and the flow can check a configuration without loading the model stack.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from catalog_tagger.errors import ConfigError

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


class TrainConfig(BaseModel):
    """Everything ``train`` needs; every field has a default but the three locations."""

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
    weights: str | None = None  # pretrained backbone weights: a safetensors file or a folder holding one
    # (else the torch hub cache for torchvision backbones, else random init)
    freeze_backbone_epochs: int = Field(default=0, ge=0)  # transfer learning: train only the heads for N epochs
    backbone_lr_factor: float = Field(default=1.0, gt=0, le=1)  # the backbone trains at lr x this (param group)
    loss_balance: Literal["fixed", "uncertainty"] = "fixed"  # task weights of tasks.yaml, or learned (Kendall 2018)
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
    # promotion gate: the `current` model folder (what the nightly deployment's `model` reads); None: no gate
    promote_to: str | None = None
    promotion_tolerance: float = Field(default=0.01, ge=0)  # a task's headline metric may be this much worse
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
        if self.weights and self.weights.endswith(PICKLE_SUFFIXES):
            raise ValueError(f"weights: {self.weights} looks like a pickle checkpoint; give a .safetensors file")
        if self.promote_to is not None and self.promote_to.rstrip("/") == self.out.rstrip("/"):
            raise ValueError(f"promote_to: {self.promote_to} is the new model's own out folder; give the current one")
        return self

    @property
    def distributed(self) -> bool:
        """Whether the fit runs on Ray Train (several workers, or a named cluster)."""
        return self.workers > 1 or self.ray_address is not None

    @property
    def size(self) -> int:
        """The square input size, once ``pipeline.resolve`` has filled in the backbone's default."""
        if self.image_size is None:
            raise ValueError("image_size is unset: resolve the config (pipeline.resolve) before training")
        return self.image_size

    @property
    def torch_threads(self) -> int:
        """torch's CPU threads: ``threads``, else every core this process may run on."""
        return self.threads or cores()

    @classmethod
    def parse(cls, **values: Any) -> TrainConfig:
        """Build from loose values (CLI, flow params); unset (None) overrides are dropped so defaults win."""
        values = {k: v for k, v in values.items() if v is not None}
        try:
            return cls.model_validate(values)
        except ValidationError as err:
            lines = [f"train: {'.'.join(str(x) for x in e['loc']) or '(config)'}: {e['msg']}" for e in err.errors()]
            raise ConfigError("\n".join(lines)) from None


def cores() -> int:
    """CPU cores this process may use: respects taskset/cgroup pinning, unlike ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1
