"""Flow parameters as pydantic models: validated before any task runs, with the offending field named.

The flows take flat keyword parameters (so ``prefect deployment run NAME -p source=...`` works and a deployment's
defaults merge per key with a run's overrides) and build one of these models first thing. ``None`` means "not
given": it is dropped so the model's default wins, and the defaults live in one place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from catalog_tagger.accounting import DEFAULT_PRICE_PER_HOUR
from catalog_tagger.errors import ConfigError, UserError
from catalog_tagger.tag.cluster import ray_path
from catalog_tagger.tag.job import TagJobConfig

if TYPE_CHECKING:
    from catalog_tagger.train.config import TrainConfig


def _required_uri(name: str, v: str) -> str:
    v = v.strip()
    if not v:
        raise ValueError(f"{name} is empty: pass -p {name}=... (or set it in the deployment's parameters)")
    if "{{" in v:
        # prefect.yaml keeps an unset {{ $ENV_VAR }} as literal text: the deploy-time default was never filled in.
        raise ValueError(f"{name} is an unresolved template {v!r}: set the env var before `prefect deploy`, or -p")
    return v


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parse(cls, flow: str, **values: Any) -> Self:
        """Build from flow arguments; unset (None) values are dropped so defaults win. Errors name the field."""
        try:
            return cls.model_validate({k: v for k, v in values.items() if v is not None})
        except ValidationError as err:
            lines = [
                f"{flow}: parameter {'.'.join(str(x) for x in e['loc']) or '(all)'}: {e['msg']}" for e in err.errors()
            ]
            raise ConfigError("invalid parameters\n" + "\n".join(lines)) from None


class NightlyParams(_Params):
    """Parameters of ``nightly_tagging`` (and ``backfill``, which forces ``full``)."""

    source: str  # image prefix (dir, s3://bucket/prefix, any fsspec URL) or a .csv/.parquet manifest with `uri`
    output: str  # output root: predictions/ and runs/ are written under it
    model: str  # model artifact directory (path or fsspec URL)
    ray_address: str | None = None  # local (default) | auto | ray://head:10001 | head:6379 | http://head:8265 (Jobs)
    full: bool = False  # re-tag everything, not only new or changed images
    price_per_hour: float = Field(default=DEFAULT_PRICE_PER_HOUR, ge=0)  # USD per GPU-hour (savings report)
    limit: int | None = Field(default=None, ge=1)  # tag at most N images (trial runs)
    batch_size: int = Field(default=64, ge=1, le=4096)  # images per forward pass
    executor: Literal["auto", "ray", "local"] = "auto"  # auto: in-process for small local CPU runs, else Ray Data
    price_per_cpu_hour: float | None = Field(default=None, ge=0)  # USD per CPU core-hour; None: CPU runs not priced
    recalibrate: bool = False  # measure the single-task calibration again (it is stored and reused otherwise)
    decode_on: Literal["auto", "cpu", "accelerator"] = "auto"  # where JPEGs are decoded (auto: the GPU if any)
    # error budget: over it the run still commits, and the flow ends Failed naming the count
    max_error_fraction: float = Field(default=0.05, ge=0, le=1)

    @field_validator("source", "output", "model")
    @classmethod
    def _uri(cls, v: str, info: ValidationInfo) -> str:
        return _required_uri(str(info.field_name), v)

    @field_validator("ray_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        try:
            ray_path(v)
        except UserError as err:
            raise ValueError(str(err)) from None
        return v.strip() if v else None

    def job_config(self, run_id: str) -> TagJobConfig:
        """The library's job config for one run (credentials come from the environment, never from here)."""
        return TagJobConfig(run_id=run_id, **self.model_dump())


class TrainParams(_Params):
    """Parameters of ``train_model``: the subset of ``TrainConfig`` worth exposing on a deployment."""

    tasks: str  # tasks.yaml (path or fsspec URL)
    labels: str  # labels table (.parquet/.csv): uri + one column per task
    out: str  # model artifact directory to write
    backbone: str | None = None  # backbone registry name (default: TrainConfig's)
    image_size: int | None = None  # square input size in pixels
    epochs: int | None = None  # upper bound; early stopping usually ends sooner
    batch_size: int | None = None  # global batch size
    lr: float | None = None  # AdamW learning rate
    patience: int | None = None  # early-stopping patience in epochs
    workers: int | None = None  # >1: data-parallel on Ray Train
    ray_address: str | None = None  # Ray cluster to train on
    seed: int | None = None  # split, init, shuffling, augmentation
    single_task: bool = False  # also train one model per task and write comparison.json
    max_images: int | None = None  # use only the first N rows
    device: str | None = None  # auto | cpu | cuda
    weights: str | None = None  # pretrained backbone weights: a safetensors file or folder (no download)
    freeze_backbone_epochs: int | None = None  # train only the heads for N epochs, then unfreeze the backbone
    backbone_lr_factor: float | None = None  # the backbone trains at lr x this after unfreezing (e.g. 0.1)
    loss_balance: str | None = None  # fixed (tasks.yaml weights) | uncertainty (learned, Kendall et al. 2018)
    # promotion gate: the `current` model folder the nightly deployment's `model` reads; None or '' (the deployment's
    # CATALOG_TAGGER_MODEL was unset): no gate, the model is only written to `out`
    promote_to: str | None = None
    promotion_tolerance: float | None = Field(default=None, ge=0)  # default: TrainConfig's (0.01 absolute)

    @field_validator("tasks", "labels", "out")
    @classmethod
    def _uri(cls, v: str, info: ValidationInfo) -> str:
        return _required_uri(str(info.field_name), v)

    @field_validator("promote_to")
    @classmethod
    def _promote_to(cls, v: str | None) -> str | None:
        return _required_uri("promote_to", v) if v and v.strip() else None

    def train_config(self) -> TrainConfig:
        """The library's ``TrainConfig`` (its own checks run here: a bad value is a ``ConfigError``)."""
        from catalog_tagger.train.config import TrainConfig

        return TrainConfig.parse(**self.model_dump(), progress=False)
