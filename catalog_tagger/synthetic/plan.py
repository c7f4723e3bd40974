"""The synthetic catalog's vocabulary and every random choice for one image, drawn before any pixel is touched."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from catalog_tagger.config import TaskConfig, parse_tasks

GARMENTS = ("tshirt", "dress", "trousers", "shoe", "bag")
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "black", "white")
PATTERNS = ("plain", "striped", "dotted", "checked")
BADGES = ("sale", "logo", "text")

SYNTH_TASKS: TaskConfig = parse_tasks(
    {
        "tasks": [
            {"name": "garment", "kind": "multiclass", "labels": list(GARMENTS)},
            {"name": "color", "kind": "multiclass", "labels": list(COLORS)},
            {"name": "pattern", "kind": "multiclass", "labels": list(PATTERNS)},
            {"name": "badges", "kind": "multilabel", "labels": list(BADGES)},
        ]
    },
    source="synthetic tasks",
)
# The regression target, opt-in (``SynthConfig.regression``): the mean luma of the image as displayed, in [0, 1]. It
# is computed from the rendered pixels (background, item colour and size, pattern, stickers), so a model can only
# learn it from them. Opt-in because the four tasks above are what every pipeline test and benchmark is built on.
# Weight 30: its loss (Huber on [0, 1], values spread ~0.09) is ~1000x smaller than a cross-entropy, and at weight 1
# the classification heads drown it (tiny_cnn, 32 px, 200 images, 12 epochs: test MAE 0.62x the mean predictor's at
# weight 1, 0.39x at weight 10; tests/train/test_regression.py measures ~0.3-0.4x at weight 30).
REGRESSION_TASK = "brightness"
SYNTH_TASKS_WITH_REGRESSION: TaskConfig = parse_tasks(
    {
        "tasks": [
            *SYNTH_TASKS.to_dict()["tasks"],
            {"name": REGRESSION_TASK, "kind": "regression", "range": [0.0, 1.0], "weight": 30.0},
        ]
    },
    source="synthetic tasks",
)

# Base RGB per colour name. Jitter stays small enough that no two colours meet; white sits above every studio
# background (<= 215) and black far below the noisy ones (mid grey, base >= 100); every item also has an outline.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "orange": (240, 135, 25),
    "yellow": (235, 215, 45),
    "green": (45, 150, 65),
    "blue": (40, 80, 205),
    "purple": (125, 50, 165),
    "black": (28, 28, 30),
    "white": (246, 246, 244),
}
_COLOR_JITTER = {"white": 9, "black": 14}  # default 18; white/black are clipped into a narrow band
GARMENT_ASPECT = {"tshirt": 1.0, "dress": 0.78, "trousers": 0.72, "shoe": 1.7, "bag": 0.95}  # item box width / height
_FORMATS = (("JPEG", "jpg", 0.80), ("PNG", "png", 0.12), ("WEBP", "webp", 0.08))
_BADGE_P = 0.3
_GRAYSCALE_P = 0.05
_EXIF_P = 0.0625  # of JPEGs: about 5% of all images
TEXT_BAND = 0.86  # text lines start here (fraction of height); the item always ends above it


@dataclass(frozen=True)
class Plan:
    """Every random choice for one image, drawn before any pixel is touched."""

    width: int
    height: int
    garment: str
    color: str
    rgb: tuple[int, int, int]
    pattern: str
    badges: tuple[str, ...]
    background: str
    fmt: str
    ext: str
    quality: int
    grayscale: bool
    orientation: int
    box: tuple[int, int, int, int]  # item box x0, y0, x1, y1 in displayed pixels
    mirror: bool
    pattern_params: dict[str, float] = field(default_factory=dict)


def plan_image(rng: np.random.Generator, min_size: int, max_size: int) -> Plan:
    """Draw every random choice of one image from ``rng``. The order of the draws is part of the output: a new
    choice goes after the others, or every image of every seed changes."""
    width = int(rng.integers(min_size, max_size + 1))
    lo, hi = max(min_size, math.ceil(width * 3 / 4)), min(max_size, math.floor(width * 4 / 3))
    height = int(rng.integers(lo, hi + 1)) if hi >= lo else width
    garment = GARMENTS[int(rng.integers(len(GARMENTS)))]
    color = COLORS[int(rng.integers(len(COLORS)))]
    jitter = _COLOR_JITTER.get(color, 18)
    rgb = tuple(int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, 255)) for c in COLOR_RGB[color])
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    badges = tuple(b for b, u in zip(BADGES, rng.random(len(BADGES)), strict=True) if u < _BADGE_P)
    background = "studio" if rng.random() < 0.5 else "noisy"
    fmt, ext = _file_format(rng.random())
    quality = int(rng.integers(85, 96))
    grayscale = bool(rng.random() < _GRAYSCALE_P)
    orientation = 1
    if fmt == "JPEG" and rng.random() < _EXIF_P:
        orientation = int(rng.choice([6, 8, 3], p=[0.4, 0.4, 0.2]))
    box, side = _item_box(rng, width, height, GARMENT_ASPECT[garment])
    mirror = bool(rng.random() < 0.5)
    return Plan(
        width=width,
        height=height,
        garment=garment,
        color=color,
        rgb=rgb,  # type: ignore[arg-type]
        pattern=pattern,
        badges=badges,
        background=background,
        fmt=fmt,
        ext=ext,
        quality=quality,
        grayscale=grayscale,
        orientation=orientation,
        box=box,
        mirror=mirror,
        pattern_params=_pattern_params(rng, pattern, side),
    )


def _file_format(u: float) -> tuple[str, str]:
    """(Pillow format, file extension) for a uniform draw ``u``, with the shares of ``_FORMATS``."""
    acc = 0.0
    for name, ext, p in _FORMATS:
        acc += p
        if u < acc:
            return name, ext
    return _FORMATS[-1][0], _FORMATS[-1][1]


def _item_box(
    rng: np.random.Generator, width: int, height: int, aspect: float
) -> tuple[tuple[int, int, int, int], float]:
    """(item box, its longer side before clipping). The longer side is 58-74% of the image's shorter side, near
    the centre of the area above the text band, so that sale stickers (top corners) and text (bottom band) cover
    at most its edges."""
    side = min(width, height) * rng.uniform(0.58, 0.74)
    bw, bh = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    top, bottom = 0.04 * height, (TEXT_BAND - 0.02) * height
    bh = min(bh, bottom - top)
    cx = width / 2 + rng.uniform(-1, 1) * min(0.08 * width, max(0.0, (0.92 * width - bw) / 2))
    cy = (top + bottom) / 2 + rng.uniform(-1, 1) * min(0.06 * height, max(0.0, (bottom - top - bh) / 2))
    return (int(cx - bw / 2), int(cy - bh / 2), int(cx + bw / 2), int(cy + bh / 2)), side


def _pattern_params(rng: np.random.Generator, pattern: str, side: float) -> dict[str, float]:
    """Phases and shading of the cloth, and the period (and dot size) of its pattern, in pixels."""
    params: dict[str, float] = {"phase_x": rng.random(), "phase_y": rng.random(), "shade": rng.uniform(0.0, 0.06)}
    if pattern == "striped":
        params.update(period=side * rng.uniform(0.09, 0.12), vertical=float(rng.random() < 0.5))
    elif pattern == "checked":
        params.update(period=side * rng.uniform(0.085, 0.11))
    elif pattern == "dotted":
        params.update(period=side * rng.uniform(0.12, 0.15), radius=rng.uniform(0.27, 0.32))
        params.update(stagger=float(rng.random() < 0.5))
    return params
