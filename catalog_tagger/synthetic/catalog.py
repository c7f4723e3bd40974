"""The synthetic catalog on disk: images, labels (some withheld), ground truth, tasks.yaml; and the bad-image set."""

from __future__ import annotations

import io
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from catalog_tagger.config import TaskConfig
from catalog_tagger.errors import UserError
from catalog_tagger.synthetic.draw import Truth, render_image
from catalog_tagger.synthetic.plan import REGRESSION_TASK, SYNTH_TASKS, SYNTH_TASKS_WITH_REGRESSION

log = logging.getLogger(__name__)

_PARALLEL_MIN = 64
_WINDOW = 256  # images in flight at once: bounds memory for large catalogs


@dataclass(frozen=True)
class SynthConfig:
    """What to generate, and where."""

    out: str  # local path or any fsspec URL (s3://bucket/prefix)
    images: int = 1000  # how many images this call writes
    seed: int = 0  # catalog seed: image i is a pure function of (seed, i)
    start: int = 0  # index of the first image: a later call with start>0 adds images to an existing catalog
    missing_fraction: float = 0.1  # per task, the fraction of labels left missing (None) in the labels file
    min_size: int = 300  # smallest image side, pixels
    max_size: int = 1600  # largest image side, pixels
    storage_options: dict[str, Any] | None = None  # passed to fsspec
    workers: int = 2  # rendering processes (at most 2); 1 = serial. Output never depends on it.
    regression: bool = False  # add the regression task (``brightness``) to labels.parquet and tasks.yaml

    @property
    def tasks(self) -> TaskConfig:
        """The tasks this catalog's labels and tasks.yaml carry."""
        return SYNTH_TASKS_WITH_REGRESSION if self.regression else SYNTH_TASKS


@dataclass(frozen=True)
class SynthResult:
    """Where everything went: image URIs in index order, and the three side files."""

    out: str  # the catalog root, resolved: an absolute local path or a full URL
    images: list[str]
    labels_uri: str
    truth_uri: str
    tasks_uri: str


def _missing(index: int, seed: int, fraction: float, tasks: TaskConfig) -> list[bool]:
    """Per task: is the label withheld? From its own stream, so images never depend on ``missing_fraction``; an
    extra task draws after the others, so theirs stay the same with it or without."""
    rng = np.random.default_rng([seed, index, 1])
    return [bool(u < fraction) for u in rng.random(len(tasks.tasks))]


_LABEL_FIELDS = [
    pa.field("uri", pa.string()),
    pa.field("garment", pa.string()),
    pa.field("color", pa.string()),
    pa.field("pattern", pa.string()),
    pa.field("badges", pa.list_(pa.string())),
]
LABELS_SCHEMA = pa.schema(_LABEL_FIELDS)
LABELS_SCHEMA_WITH_REGRESSION = pa.schema([*_LABEL_FIELDS, pa.field(REGRESSION_TASK, pa.float64())])
TRUTH_SCHEMA = pa.schema(
    [
        *_LABEL_FIELDS,
        pa.field("orientation", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("format", pa.string()),
        pa.field("grayscale", pa.bool_()),
        pa.field("background", pa.string()),
        pa.field("item_box", pa.list_(pa.int32())),
        pa.field("mirrored", pa.bool_()),
        pa.field(REGRESSION_TASK, pa.float64()),  # mean luma of the displayed image, 0..1 (always in the truth)
        pa.field("index", pa.int64()),
    ]
)


def _check(cfg: SynthConfig) -> None:
    if cfg.images < 0 or cfg.start < 0:
        raise UserError(f"synthetic: images ({cfg.images}) and start ({cfg.start}) must be >= 0")
    if not 0.0 <= cfg.missing_fraction <= 1.0:
        raise UserError(f"synthetic: missing_fraction {cfg.missing_fraction} is outside [0, 1]")
    if not 64 <= cfg.min_size <= cfg.max_size:
        raise UserError(
            f"synthetic: need 64 <= min_size <= max_size, got min_size={cfg.min_size}, max_size={cfg.max_size}"
        )


def _render_one(index: int, seed: int, min_size: int, max_size: int) -> tuple[int, bytes, str, Truth]:
    data, ext, truth = render_image(index, seed, min_size=min_size, max_size=max_size)
    return index, data, ext, truth


def _render_all(cfg: SynthConfig) -> Iterator[list[tuple[int, bytes, str, Truth]]]:
    """Yield windows of rendered images in index order; in up to 2 processes when there are enough images."""
    indices = list(range(cfg.start, cfg.start + cfg.images))
    fn = partial(_render_one, seed=cfg.seed, min_size=cfg.min_size, max_size=cfg.max_size)
    workers = min(2, cfg.workers, os.cpu_count() or 1)
    windows = [indices[i : i + _WINDOW] for i in range(0, len(indices), _WINDOW)]
    if workers <= 1 or len(indices) < _PARALLEL_MIN:
        for window in windows:
            yield [fn(i) for i in window]
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = pool.map(fn, windows[0], chunksize=8) if windows else iter(())
        for k in range(len(windows)):
            current = list(pending)
            # Submit the next window before handing this one back, so rendering overlaps writing.
            if k + 1 < len(windows):
                pending = pool.map(fn, windows[k + 1], chunksize=8)
            yield current


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    # Same form as a listing: a bare absolute path for local files, a full URL (s3://bucket/key) elsewhere.
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _parquet_bytes(rows: list[dict[str, Any]], schema: pa.Schema) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    data: bytes = buf.getvalue().to_pybytes()
    return data


def generate(cfg: SynthConfig) -> SynthResult:
    """Write ``cfg.images`` images starting at index ``cfg.start`` under ``cfg.out``, with their labels.

    Layout under ``out``: ``images/img_NNNNNN.<jpg|png|webp>``, ``labels.parquet`` (training labels, some
    withheld), ``truth.parquet`` (every label, plus orientation, displayed width/height, format, grayscale)
    and ``tasks.yaml`` (``SYNTH_TASKS``; with ``cfg.regression`` also the ``brightness`` regression task and its
    label column). A call with ``start > 0`` adds images to an existing catalog: its
    images never collide with earlier ones, and its tables go to ``labels_<start>.parquet`` and
    ``truth_<start>.parquet`` so earlier tables are kept; ``tasks.yaml`` is rewritten identically.
    Grayscale images have no colour label (the colour is gone) but keep it in the truth table.
    """
    _check(cfg)
    t0 = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(cfg.out, **(cfg.storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(f"{root}/images", exist_ok=True)
    labels: list[dict[str, Any]] = []
    truths: list[dict[str, Any]] = []
    uris: list[str] = []
    for window in _render_all(cfg):
        files: dict[str, bytes] = {}
        for index, data, ext, truth in window:
            path = f"{root}/images/img_{index:06d}.{ext}"
            files[path] = data
            uri = _uri(fs, path)
            uris.append(uri)
            missing = _missing(index, cfg.seed, cfg.missing_fraction, cfg.tasks)
            row: dict[str, Any] = {"uri": uri}
            for task, withheld in zip(cfg.tasks.names, missing, strict=True):
                withheld = withheld or (task == "color" and truth["grayscale"])
                row[task] = None if withheld else truth[task]
            labels.append(row)
            truths.append({"uri": uri, **truth, "index": index})
        fs.pipe(files)  # one call per window: s3fs uploads the window concurrently
    suffix = "" if cfg.start == 0 else f"_{cfg.start}"
    labels_path, truth_path, tasks_path = (
        f"{root}/labels{suffix}.parquet",
        f"{root}/truth{suffix}.parquet",
        f"{root}/tasks.yaml",
    )
    fs.pipe_file(
        labels_path, _parquet_bytes(labels, LABELS_SCHEMA_WITH_REGRESSION if cfg.regression else LABELS_SCHEMA)
    )
    fs.pipe_file(truth_path, _parquet_bytes(truths, TRUTH_SCHEMA))
    fs.pipe_file(tasks_path, cfg.tasks.to_yaml().encode("utf-8"))
    log.info(
        "synthetic: wrote %d images (index %d..%d, seed %d) to %s in %.1fs",
        cfg.images,
        cfg.start,
        cfg.start + cfg.images - 1,
        cfg.seed,
        cfg.out,
        time.perf_counter() - t0,
    )
    return SynthResult(
        out=_uri(fs, root),
        images=uris,
        labels_uri=_uri(fs, labels_path),
        truth_uri=_uri(fs, truth_path),
        tasks_uri=_uri(fs, tasks_path),
    )


# ------------------------------------------------------------------------------------------------ bad images
def _png_with_size(width: int, height: int) -> bytes:
    """A tiny valid PNG whose IHDR then claims ``width`` x ``height``, with the chunk CRC fixed up."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    # Signature (8) | length (4) | b"IHDR" (4) | width (4) | height (4) | ... 13 data bytes | CRC (4)
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def write_bad_images(out_dir: str | Path) -> dict[str, str]:
    """Write the awkward-image set into local ``out_dir``; returns {filename: "ok" | "error"} for the decoder.

    "ok" files are unusual but valid (palette+alpha, 16-bit, CMYK, grayscale, animated) and must decode;
    "error" files (empty, truncated, random bytes, a 50000x50000 header) must fail with a ``DecodeError``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(12345)
    files: dict[str, tuple[bytes, str]] = {}

    def save(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kwargs)
        return buf.getvalue()

    photo, _, _ = render_image(0, 0, min_size=320, max_size=320)
    rgb = Image.open(io.BytesIO(photo)).convert("RGB")
    jpeg = save(rgb, "JPEG", quality=90)
    files["empty.jpg"] = (b"", "error")
    files["truncated.jpg"] = (jpeg[: len(jpeg) // 2], "error")
    files["random.jpg"] = (b"\x13\x37" + rng.integers(0, 256, size=4096, dtype=np.uint8).tobytes(), "error")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    files["palette_alpha.png"] = (save(pal, "PNG", transparency=0), "ok")
    ramp = (np.linspace(0, 65535, 96 * 64).reshape(64, 96)).astype(np.uint16)
    files["gray16.png"] = (save(Image.fromarray(ramp), "PNG"), "ok")
    files["cmyk.jpg"] = (save(rgb.convert("CMYK"), "JPEG", quality=90), "ok")
    files["gray.jpg"] = (save(rgb.convert("L"), "JPEG", quality=90), "ok")
    frames = [Image.new("RGB", (48, 32), c) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    files["animated.gif"] = (save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100), "ok")
    files["bomb.png"] = (_png_with_size(50_000, 50_000), "error")
    for name, (data, _) in files.items():
        (out / name).write_bytes(data)
    log.info("synthetic: wrote %d bad-image cases to %s", len(files), out)
    return {name: expect for name, (_, expect) in files.items()}
