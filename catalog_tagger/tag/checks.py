"""Refuse bad input before any work: the model, the baselines, the allowed root, the source, the output."""

from __future__ import annotations

import os
import uuid

from catalog_tagger.errors import ArtifactError, UserError
from catalog_tagger.model.artifact import check_weights, load_card
from catalog_tagger.storage import filesystem, is_local, is_transient, protocol_of, redact, retry_transient, strip
from catalog_tagger.tag.config import TagJobConfig


def validate(cfg: TagJobConfig) -> None:
    """Raise ``UserError`` (or ``ArtifactError``) for input no retry can fix; nothing is written but a probe."""
    _check_model(cfg)
    _check_baselines(cfg)
    _check_allowed_root(cfg)
    _check_source_exists(cfg)
    _check_output_writable(cfg)


def _check_model(cfg: TagJobConfig) -> None:
    """The artifact's card loads and its weights are safetensors (never a pickle)."""
    try:
        load_card(cfg.model)
    except ArtifactError:
        raise
    except FileNotFoundError:
        raise UserError(f"model {redact(cfg.model)!r} not found") from None
    check_weights(cfg.model)


def _check_baselines(cfg: TagJobConfig) -> None:
    """``--baseline`` artifacts must load and take the same input size (they are timed on the same batch)."""
    size = load_card(cfg.model).image_size
    for uri in cfg.baseline:
        card = load_card(uri)
        check_weights(uri)
        if card.image_size != size:
            raise UserError(
                f"baseline {redact(uri)!r} takes {card.image_size} px images, the model {size} px: baselines are "
                "timed on the model's own batches, so their input size must match"
            )


def _check_allowed_root(cfg: TagJobConfig) -> None:
    root = cfg.allowed_root
    if root is None:
        return
    if is_local(root) and not os.path.isdir(strip(root)):
        raise UserError(f"allowed_root {root!r} is not an existing local folder")
    if not is_local(root) and not strip(root).strip("/"):
        raise UserError(f"allowed_root {root!r} must name a bucket or prefix, not a whole store")


def _check_source_exists(cfg: TagJobConfig) -> None:
    fs = filesystem(cfg.source, cfg.storage_options)
    try:
        found = fs.exists(strip(cfg.source))
    except Exception as err:  # permission, bad bucket, bad credentials...
        if is_transient(err):
            raise
        raise UserError(f"source {redact(cfg.source)!r} cannot be read: {type(err).__name__}: {err}") from None
    if not found:
        raise UserError(f"source {redact(cfg.source)!r} does not exist or is not readable")


# Object stores whose fsspec ``makedirs`` creates a missing bucket: they have no folders to make, and a mistyped
# bucket name must be refused, not created.
_BUCKET_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def _check_output_writable(cfg: TagJobConfig) -> None:
    """Write and remove a probe object under ``_staging/`` (where the run writes first). A missing bucket is
    refused by name: a run never creates one."""
    fs = filesystem(cfg.output, cfg.storage_options)
    root = strip(cfg.output)
    probe = f"{root.rstrip('/')}/_staging/.write-probe-{uuid.uuid4().hex}"
    bucket_store = protocol_of(cfg.output) in _BUCKET_STORES

    def write_probe() -> None:
        if not bucket_store:
            fs.makedirs(os.path.dirname(probe), exist_ok=True)
        fs.pipe_file(probe, b"")
        fs.rm(probe)

    try:
        retry_transient(write_probe, f"write probe {redact(cfg.output)}")
    except Exception as err:  # any failure here means "cannot write there"
        if is_transient(err):
            raise  # a store hiccup that outlived the retries: retryable by the caller (Prefect), not bad input
        if bucket_store and isinstance(err, FileNotFoundError):
            bucket = root.split("/", 1)[0]
            raise UserError(
                f"output bucket {bucket!r} does not exist (output {redact(cfg.output)!r}): create it first, or fix "
                "its name; a run never creates buckets"
            ) from None
        raise UserError(f"output {redact(cfg.output)!r} is not writable: {type(err).__name__}: {err}") from None
