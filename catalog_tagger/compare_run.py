"""``compare``'s measurement: a seeded uniform sample of the source, each image read and decoded once, both models
run on it in this process, and both models timed on the same batch, interleaved.

- The sample: every listed uri gets a key, a keyed hash of the uri and the seed, and the ``n`` smallest keys are
  kept while the listing streams past (bounded memory: ``n`` rows). Hash keys are uniform and independent of the
  order a store lists in, so one seed names the same images on every machine, and a uri listed twice counts once.
- One decode: the tagging job's own read + decode stage (``tag.reader.DecodeStage``: the same bounded reads, the
  same error rows) at the larger of the two models' input sizes; the model with the smaller input gets those
  pixels resized with the decoder's filter (bilinear). So the larger model sees exactly what a tagging run feeds
  it; the smaller one a resize of a resize (a difference of a grey level or so), which ``notes`` says.
- A bad image is counted and listed with its reason, never a crash; a row where either model's output is not
  finite is left out of the comparison and counted.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from PIL import Image

from catalog_tagger.errors import UserError
from catalog_tagger.model_compare import MULTICLASS, Compared, TaskMatch, compare_columns, match_tasks
from catalog_tagger.schema import STATUS_OK
from catalog_tagger.storage import redact

if TYPE_CHECKING:
    import torch

    from catalog_tagger.model.artifact import ModelCard
    from catalog_tagger.model.multihead import MultiHeadModel

log = logging.getLogger(__name__)

DEFAULT_SAMPLE = 2000
TIMING_ROUNDS = 21  # interleaved rounds of both models on one batch: the median's interval drops the 5 extremes
TIMING_WARMUP = 2
ERROR_EXAMPLES = 20  # bad images listed by uri (all are counted)


@dataclass(frozen=True)
class CompareConfig:
    """What ``compare`` measures."""

    model_a: str  # artifact URI of the current model
    model_b: str  # artifact URI of the candidate
    source: str  # image prefix or .csv/.parquet manifest (as ``tag --source``)
    sample: int = DEFAULT_SAMPLE  # images compared at most (all when fewer are listed)
    seed: int = 0  # names the sample
    batch_size: int = 32  # images per forward pass (and the timing batch)
    device: str = "auto"  # auto | cpu | cuda
    timing_rounds: int = TIMING_ROUNDS
    storage_options: dict[str, Any] | None = field(default=None, repr=False)


@dataclass
class Side:
    """One model, loaded for inference."""

    uri: str
    model: MultiHeadModel
    card: ModelCard

    def describe(self) -> dict[str, Any]:
        c = self.card
        return {"uri": redact(self.uri), "version": c.version, "backbone": c.backbone, "image_size": c.image_size,
                "tasks": [{"name": t["name"], "kind": t["kind"]} for t in c.tasks]}  # fmt: skip


@dataclass
class Measurement:
    """What ``measure`` found: the tasks compared, their statistics and rows, the sample and the timing."""

    a: dict[str, Any]  # Side.describe()
    b: dict[str, Any]
    match: TaskMatch
    compared: Compared
    sample: dict[str, Any]
    decode: dict[str, Any]
    timing: dict[str, Any] | None  # None when no image of the sample decoded


# --------------------------------------------------------------------------------------------- the sample
def sample_key(uri: str, seed: int) -> int:
    """The uri's place in the seeded order: 64 bits of a keyed hash (uniform, whatever the listing order)."""
    digest = hashlib.blake2b(uri.encode("utf-8", "surrogatepass"), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little")


def bottom_k(batches: Iterator[pa.RecordBatch], n: int, seed: int) -> tuple[pa.Table, int]:
    """(the ``n`` listing rows with the smallest keys, each uri once, in key order; rows streamed)."""
    kept: pa.Table | None = None
    keys = np.zeros(0, dtype=np.uint64)
    rows = 0
    for batch in batches:
        rows += batch.num_rows
        bkeys = np.fromiter((sample_key(u, seed) for u in batch.column("uri").to_pylist()), np.uint64, batch.num_rows)
        if kept is not None and kept.num_rows >= n:  # only keys under the largest kept can enter
            take = np.flatnonzero(bkeys < keys[-1])
            batch, bkeys = batch.take(pa.array(take)), bkeys[take]
        new = pa.Table.from_batches([batch])
        table = new if kept is None else pa.concat_tables([kept, new])
        allk = np.concatenate([keys, bkeys])
        order, uris, seen, pick = np.argsort(allk, kind="stable"), table.column("uri").to_pylist(), set(), []
        for i in order.tolist():
            if uris[i] not in seen:
                seen.add(uris[i])
                pick.append(i)
                if len(pick) == n:
                    break
        kept, keys = table.take(pa.array(pick, pa.int64())), allk[pick]
    if kept is None:
        from catalog_tagger.schema import LISTING_SCHEMA

        kept = LISTING_SCHEMA.empty_table()
    return kept, rows


# --------------------------------------------------------------------------------------------- pixels and models
def resized(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (B, S, S, 3) images at ``size`` px, resized with the decoder's filter; the same array when S is."""
    if images.shape[1] == size or len(images) == 0:
        return images
    out = [
        np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None))
        for im in images
    ]
    return np.ascontiguousarray(np.stack(out))


def load_side(uri: str, device: torch.device) -> Side:
    """A model artifact ready for inference on ``device`` (a missing or bad artifact is a one-line user error)."""
    from catalog_tagger.model.artifact import load_artifact
    from catalog_tagger.model.inference import prepare_for_inference

    model, card = load_artifact(uri)
    return Side(uri, prepare_for_inference(model, device), card)


def _kept_columns(match: TaskMatch) -> list[str]:
    """The output columns the comparison reads (not the embedding)."""
    names = [p.name for p in match.shared]
    return names + [f"{p.name}_score" for p in match.shared if p.kind == MULTICLASS]


class _Acc:
    """Both models' columns over the compared rows, batch after batch."""

    def __init__(self, names: list[str]) -> None:
        self.uris: list[str] = []
        self.a: dict[str, list[Any]] = {c: [] for c in names}
        self.b: dict[str, list[Any]] = {c: [] for c in names}

    def add(self, uris: list[str], ca: dict[str, Any], cb: dict[str, Any], keep: np.ndarray) -> None:
        idx = np.flatnonzero(keep).tolist()
        self.uris.extend(uris[i] for i in idx)
        for acc, cols in ((self.a, ca), (self.b, cb)):
            for name, values in acc.items():
                values.extend(cols[name][i] for i in idx)


def _check_shared(match: TaskMatch, a: Side, b: Side) -> None:
    if match.shared:
        return
    names_a = ", ".join(t["name"] for t in a.card.tasks) or "none"
    names_b = ", ".join(t["name"] for t in b.card.tasks) or "none"
    differ = ", ".join(d["task"] for d in match.kind_differs)
    differ = f"; same name, other kind: {differ}" if differ else ""
    raise UserError(
        f"models share no task: nothing to compare (A: {names_a}; B: {names_b}{differ}); compare models that tag "
        "the same tasks"
    )


# --------------------------------------------------------------------------------------------- the run
def measure(cfg: CompareConfig) -> Measurement:
    """Sample, decode once, run both models, compare every shared task, time both models (module docstring)."""
    from catalog_tagger.model.inference import select_device
    from catalog_tagger.tag.sources import list_source

    if cfg.sample < 1:
        raise UserError(f"--sample must be at least 1, not {cfg.sample}")
    device = select_device(cfg.device)
    a, b = load_side(cfg.model_a, device), load_side(cfg.model_b, device)
    match = match_tasks(a.card.task_config().tasks, b.card.task_config().tasks)
    _check_shared(match, a, b)
    listing = list_source(cfg.source, cfg.storage_options)
    sample, listed = bottom_k(listing.batches, cfg.sample, cfg.seed)
    log.info("compare: %d of %d listed image(s) sampled (seed %d)", sample.num_rows, listed, cfg.seed)
    size = max(a.card.image_size, b.card.image_size)
    acc, errors, timing = _Acc(_kept_columns(match)), _Errors(), None
    for images, uris in _decoded(cfg, sample, size, listing.credentials, errors):
        xa, xb = resized(images, a.card.image_size), resized(images, b.card.image_size)
        if timing is None:
            timing = time_both(a, b, xa, xb, cfg)
        ca, cb = _predict(a, xa), _predict(b, xb)
        finite = ca.pop("_finite") & cb.pop("_finite")
        errors.nonfinite += int((~finite).sum())
        acc.add(uris, ca, cb, finite)
    compared = compare_columns(match, acc.uris, acc.a, acc.b)
    notes = list(listing.notes)
    if a.card.image_size != b.card.image_size:
        small = "A" if a.card.image_size < b.card.image_size else "B"
        notes.append(
            f"decoded once at {size} px; model {small}'s input is that image resized to "
            f"{min(a.card.image_size, b.card.image_size)} px (bilinear), not decoded at its own size"
        )
    sample_info = {"requested": cfg.sample, "seed": cfg.seed, "listed_rows": listed, "sampled": sample.num_rows,
                   "compared": len(acc.uris), **errors.as_dict(), "notes": notes}  # fmt: skip
    decode = {"image_size": size, "image_size_a": a.card.image_size, "image_size_b": b.card.image_size}
    return Measurement(a.describe(), b.describe(), match, compared, sample_info, decode, timing)


@dataclass
class _Errors:
    """Images left out of the comparison: unreadable or undecodable (with reasons), or a non-finite output."""

    count: int = 0
    examples: list[dict[str, str]] = field(default_factory=list)
    nonfinite: int = 0

    def add(self, uri: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < ERROR_EXAMPLES:
            self.examples.append({"uri": redact(uri), "error": reason})

    def as_dict(self) -> dict[str, Any]:
        return {"errors": self.count, "error_examples": self.examples, "non_finite": self.nonfinite}


def _decoded(
    cfg: CompareConfig, sample: pa.Table, size: int, credentials: dict[str, str], errors: _Errors
) -> Iterator[tuple[np.ndarray, list[str]]]:
    """The sample read and decoded once, ``batch_size`` rows at a time: (ok images, their uris); bad images are
    reported to ``errors`` (the tagging job's read + decode stage, its bounds and its error reasons)."""
    from catalog_tagger.tag.reader import DecodeStage

    stage = DecodeStage(image_size=size, storage_options=cfg.storage_options, credentials=credentials)
    for start in range(0, sample.num_rows, cfg.batch_size):
        out = stage(sample.slice(start, cfg.batch_size))
        ok = out["status"] == STATUS_OK
        uris = [str(u) for u in out["uri"]]
        for i in np.flatnonzero(~ok).tolist():
            errors.add(uris[i], str(out["error"][i]))
        if ok.any():
            yield np.ascontiguousarray(out["image"][ok]), [u for u, k in zip(uris, ok.tolist(), strict=True) if k]


def _predict(side: Side, images: np.ndarray) -> dict[str, Any]:
    """The tagging job's output columns for ``images``, plus ``_finite`` (rows whose outputs are all finite)."""
    from catalog_tagger.model.inference import finite_rows, output_columns, run_batch

    out = run_batch(side.model, images).output
    return {**output_columns(side.card, out), "_finite": finite_rows(out)}


def time_both(a: Side, b: Side, xa: np.ndarray, xb: np.ndarray, cfg: CompareConfig) -> dict[str, Any]:
    """Both models' seconds per image on one batch of ``batch_size`` sample images (tiled when fewer decoded),
    timed interleaved round after round on this device, so that machine noise hits both alike; B/A is the median
    of the per-round ratios with its interval (``calibration.median_interval``)."""
    import torch

    from catalog_tagger.calibration import device_name, median_interval, precision, time_interleaved
    from catalog_tagger.model.inference import run_batch

    n = cfg.batch_size
    xa, xb = (np.ascontiguousarray(np.resize(x, (n, *x.shape[1:]))) for x in (xa, xb))
    device = a.model.mean.device

    def call(side: Side, x: np.ndarray) -> Callable[[], object]:
        return lambda: run_batch(side.model, x)

    times = time_interleaved([call(a, xa), call(b, xb)], device, repeats=cfg.timing_rounds, warmup=TIMING_WARMUP)
    ratio = median_interval([tb / ta for ta, tb in zip(times[0], times[1], strict=True)])
    per_b = median_interval(times[1]).map(lambda s: s / n)
    return {
        "device": device_name(device),
        "precision": precision(device),
        "threads": torch.get_num_threads(),
        "batch": n,
        "rounds": len(times[0]),
        "a_s_per_image": float(np.median(times[0])) / n,
        "b_s_per_image": per_b.value,
        "b_s_per_image_low": per_b.low,
        "b_s_per_image_high": per_b.high,
        "ratio": ratio.value,  # B's time over A's, per round
        "ratio_low": ratio.low,
        "ratio_high": ratio.high,
    }


COMPARISON_VERSION = 1  # of the comparison JSON (``--json-out``, ``ROWS/comparison.json``, ``--format json``)


def comparison_json(m: Measurement, source: str, cost: dict[str, Any]) -> dict[str, Any]:
    """The comparison as one JSON-able document: what the terminal, the page and ``--format json`` show."""
    from datetime import UTC, datetime

    return {
        "comparison_version": COMPARISON_VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": redact(source),
        "model_a": m.a,
        "model_b": m.b,
        "sample": m.sample,
        "decode": m.decode,
        "tasks": m.compared.tasks,
        "only_in_a": m.match.only_a,
        "only_in_b": m.match.only_b,
        "kind_differs": m.match.kind_differs,
        "changed_rows": m.compared.changes.num_rows,
        "timing": m.timing,
        "cost": cost,
    }
