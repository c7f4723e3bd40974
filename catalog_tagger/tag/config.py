"""TagJobConfig: everything one tagging run needs, validated before any work starts (read by every stage)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from catalog_tagger.accounting import DEFAULT_PRICE_PER_HOUR
from catalog_tagger.decode import DEFAULT_MAX_PIXELS
from catalog_tagger.fetch import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_READ_DEADLINE_S, DEFAULT_READ_TIMEOUT_S


class TagJobConfig(BaseModel):
    """Everything one tagging run needs. Validated before any work starts."""

    model_config = ConfigDict(extra="forbid")

    model: str  # model artifact directory (path or fsspec URL)
    source: str  # image prefix, or a .csv/.parquet manifest with a `uri` column
    output: str  # output root (path or fsspec URL)
    run_id: str | None = None  # default: UTC timestamp + random suffix; reuse an id to resume a crashed run
    ray_address: str | None = None  # None/"local": in-process Ray; "auto" or "ray://host:10001": connect
    batch_size: int = Field(default=64, ge=1, le=4096)  # images per model forward pass
    actors: int | None = Field(default=None, ge=1)  # predictor actors (default: one per GPU, else 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    full: bool = False  # re-tag everything, not only new/changed images
    limit: int | None = Field(default=None, ge=1)  # tag at most N images (trial runs)
    rows_per_shard: int = Field(default=20_000, ge=1)  # rows per data file = unit of resume
    write_tasks: int | None = Field(default=None, ge=1)  # Ray: data files written at once at most (None: Ray's)
    allow_task_change: bool = False  # tag an output whose table holds other tasks (adds columns; see docs)
    # ...and a part file at least this often (seconds): bounds what an interrupt loses; small runs resume too
    shard_seconds: float = Field(default=60.0, gt=0)
    price_per_hour: float = Field(default=DEFAULT_PRICE_PER_HOUR, ge=0)  # USD per GPU-hour (savings of GPU runs)
    price_per_cpu_hour: float | None = Field(default=None, ge=0)  # USD per CPU core-hour; None: CPU runs not priced
    calibrate: bool = True  # single-task figures from the stored calibration (measured once per key; calibrate.py)
    recalibrate: bool = False  # measure the calibration again (and store it) even when one is stored
    baseline: list[str] = Field(default_factory=list)  # the user's own single-task artifacts to compare against
    storage_options: dict[str, Any] | None = Field(default=None, repr=False)  # fsspec options (never logged)
    decode_cpus: float | None = Field(default=None, gt=0)  # CPUs per decode task (default: machine-sized)
    # where JPEGs are decoded: "accelerator" = in the Predictor on its device (nvJPEG on a GPU; torchvision's
    # libjpeg-turbo on CPU), the read stage only reading bytes; "cpu" = Pillow in the read stage (every other format
    # always is, and so is every JPEG the accelerator's decoder refuses); "auto" = accelerator on a GPU, else cpu
    decode_on: Literal["auto", "cpu", "accelerator"] = "auto"
    allowed_root: str | None = None  # if set, every image uri must resolve inside it, else the run is refused
    max_image_bytes: int = Field(default=DEFAULT_MAX_IMAGE_BYTES, ge=1)  # a larger image is an error row (streamed)
    read_timeout_s: float = Field(default=DEFAULT_READ_TIMEOUT_S, gt=0)  # HTTP(S) connect, and silence mid-body
    read_deadline_s: float = Field(default=DEFAULT_READ_DEADLINE_S, gt=0)  # one image's read, all retries included
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS, ge=1)  # a larger image is an error row, not decoded
    # "ray": Ray Data pipeline; "local": the same stages in this process (no Ray); "auto": local for small runs
    # on the embedded default (no cluster address, no CUDA GPU, at most local_max_images to tag), else ray.
    executor: Literal["auto", "ray", "local"] = "auto"
    local_max_images: int = Field(default=2000, ge=0)
    # error budget: a run whose error rows exceed this fraction of its committed rows still commits, but its health
    # is "failed" (the CLI exits 3, the nightly flow ends Failed)
    max_error_fraction: float = Field(default=0.05, ge=0, le=1)

    @field_validator("run_id")
    @classmethod
    def _run_id_safe(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c in v for c in "/\\ =*?[]") or v.startswith((".", "_"))):
            raise ValueError(
                f"run_id {v!r} must be non-empty, without '/', '\\\\', '=', '*', '?', '[', ']' or spaces, "
                "and must not start with '.' or '_'"
            )
        return v
