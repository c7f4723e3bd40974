"""Deterministic synthetic product catalog (images + labels + truth) for the demo, tests and benchmarks."""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import time
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from PIL import Image, ImageChops, ImageDraw

from catalog_tagger.config import TaskConfig, parse_tasks
from catalog_tagger.errors import UserError

log = logging.getLogger(__name__)

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

# Base RGB per colour name. Jitter stays small enough that no two colours meet; white sits above every studio
# background (<= 215) and black far below the noisy ones (mid grey, base >= 100); every item also has an outline.
_COLOR_RGB: dict[str, tuple[int, int, int]] = {
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
# Pattern shade: a darker or lighter version of the SAME hue, so a patterned item still reads as its colour.
_PATTERN_SHADE: dict[str, tuple[str, float]] = {  # (mix target, amount)
    "red": ("black", 0.55),
    "orange": ("black", 0.45),
    "yellow": ("black", 0.42),
    "green": ("black", 0.5),
    "blue": ("white", 0.5),
    "purple": ("white", 0.5),
    "black": ("white", 0.45),
    "white": ("black", 0.42),
}

# Silhouettes in unit box coordinates (x right, y down); box aspect is width / height.
_Shape = tuple[str, Any]
_GARMENT_ASPECT = {"tshirt": 1.0, "dress": 0.78, "trousers": 0.72, "shoe": 1.7, "bag": 0.95}
_SILHOUETTES: dict[str, list[_Shape]] = {
    "tshirt": [
        (
            "poly",
            [(0.36, 0.02), (0.5, 0.12), (0.64, 0.02), (0.82, 0.08), (1.0, 0.30), (0.88, 0.44), (0.78, 0.36)]
            + [(0.78, 0.98), (0.22, 0.98), (0.22, 0.36), (0.12, 0.44), (0.0, 0.30), (0.18, 0.08)],
        )
    ],
    "dress": [
        (
            "poly",
            [(0.36, 0.0), (0.42, 0.0), (0.45, 0.08), (0.55, 0.08), (0.58, 0.0), (0.64, 0.0), (0.68, 0.18)]
            + [(0.62, 0.40), (0.97, 0.99), (0.03, 0.99), (0.38, 0.40), (0.32, 0.18)],
        )
    ],
    "trousers": [
        ("poly", [(0.12, 0.0), (0.88, 0.0), (0.97, 0.99), (0.56, 0.99), (0.5, 0.30), (0.44, 0.99), (0.03, 0.99)])
    ],
    "shoe": [
        (
            "poly",
            [(0.04, 0.04), (0.30, 0.07), (0.40, 0.30), (0.68, 0.45), (0.92, 0.58), (0.99, 0.78), (0.96, 0.97)]
            + [(0.04, 0.97), (0.01, 0.5)],
        )
    ],
    "bag": [
        ("ring", ((0.27, 0.02, 0.73, 0.64), 0.065)),  # handle, drawn first so the body covers its lower half
        ("poly", [(0.12, 0.34), (0.88, 0.34), (0.97, 0.98), (0.03, 0.98)]),
    ],
}
# Where the logo emblem sits, and a point deep inside the item that no badge ever covers (tests read the
# item colour there). Both in unit box coordinates of the unmirrored item (x flips when truth says mirrored).
LOGO_ANCHOR = {
    "tshirt": (0.5, 0.4),
    "dress": (0.5, 0.6),
    "trousers": (0.7, 0.15),
    "shoe": (0.3, 0.5),
    "bag": (0.5, 0.55),
}
CORE_POINT = {
    "tshirt": (0.5, 0.76),
    "dress": (0.5, 0.86),
    "trousers": (0.26, 0.74),
    "shoe": (0.5, 0.8),
    "bag": (0.5, 0.84),
}

_FORMATS = (("JPEG", "jpg", 0.80), ("PNG", "png", 0.12), ("WEBP", "webp", 0.08))
_BADGE_P = 0.3
_GRAYSCALE_P = 0.05
_EXIF_P = 0.0625  # of JPEGs: about 5% of all images
_TEXT_BAND = 0.86  # text lines start here (fraction of height); the item always ends above it
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
    storage_options: dict | None = None  # passed to fsspec
    workers: int = 2  # rendering processes (at most 2); 1 = serial. Output never depends on it.


@dataclass(frozen=True)
class SynthResult:
    """Where everything went: image URIs in index order, and the three side files."""

    out: str  # the catalog root, resolved: an absolute local path or a full URL
    images: list[str]
    labels_uri: str
    truth_uri: str
    tasks_uri: str


@dataclass(frozen=True)
class _Plan:
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


def _mix(rgb: Sequence[float], target: str, amount: float) -> tuple[int, int, int]:
    t = 255.0 if target == "white" else 0.0
    return tuple(int(round(c + (t - c) * amount)) for c in rgb)  # type: ignore[return-value]


def _plan(rng: np.random.Generator, min_size: int, max_size: int) -> _Plan:
    width = int(rng.integers(min_size, max_size + 1))
    lo, hi = max(min_size, math.ceil(width * 3 / 4)), min(max_size, math.floor(width * 4 / 3))
    height = int(rng.integers(lo, hi + 1)) if hi >= lo else width
    garment = GARMENTS[int(rng.integers(len(GARMENTS)))]
    color = COLORS[int(rng.integers(len(COLORS)))]
    jitter = _COLOR_JITTER.get(color, 18)
    rgb = tuple(int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, 255)) for c in _COLOR_RGB[color])
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    badges = tuple(b for b, u in zip(BADGES, rng.random(len(BADGES)), strict=True) if u < _BADGE_P)
    background = "studio" if rng.random() < 0.5 else "noisy"
    u = rng.random()
    fmt, ext = _FORMATS[-1][:2]
    acc = 0.0
    for name, e, p in _FORMATS:
        acc += p
        if u < acc:
            fmt, ext = name, e
            break
    quality = int(rng.integers(85, 96))
    grayscale = bool(rng.random() < _GRAYSCALE_P)
    orientation = 1
    if fmt == "JPEG" and rng.random() < _EXIF_P:
        orientation = int(rng.choice([6, 8, 3], p=[0.4, 0.4, 0.2]))
    # Item box: its longer side is 58-74% of the image's shorter side, placed near the centre of the area above
    # the text band, so that sale stickers (top corners) and text (bottom band) cover at most its edges.
    side = min(width, height) * rng.uniform(0.58, 0.74)
    aspect = _GARMENT_ASPECT[garment]
    bw, bh = (side, side / aspect) if aspect >= 1 else (side * aspect, side)
    top, bottom = 0.04 * height, (_TEXT_BAND - 0.02) * height
    bh = min(bh, bottom - top)
    cx = width / 2 + rng.uniform(-1, 1) * min(0.08 * width, max(0.0, (0.92 * width - bw) / 2))
    cy = (top + bottom) / 2 + rng.uniform(-1, 1) * min(0.06 * height, max(0.0, (bottom - top - bh) / 2))
    box = (int(cx - bw / 2), int(cy - bh / 2), int(cx + bw / 2), int(cy + bh / 2))
    mirror = bool(rng.random() < 0.5)
    params: dict[str, float] = {"phase_x": rng.random(), "phase_y": rng.random(), "shade": rng.uniform(0.0, 0.06)}
    if pattern == "striped":
        params.update(period=side * rng.uniform(0.09, 0.12), vertical=float(rng.random() < 0.5))
    elif pattern == "checked":
        params.update(period=side * rng.uniform(0.085, 0.11))
    elif pattern == "dotted":
        params.update(period=side * rng.uniform(0.12, 0.15), radius=rng.uniform(0.27, 0.32))
        params.update(stagger=float(rng.random() < 0.5))
    return _Plan(
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
        pattern_params=params,
    )


# ------------------------------------------------------------------------------------------------ drawing
def _background(plan: _Plan, rng: np.random.Generator) -> Image.Image:
    w, h = plan.width, plan.height
    if plan.background == "studio":
        # Light vertical gradient with a faint tint; kept <= 215 so white items stand out (plus their outline).
        top = rng.uniform(180, 215)
        bottom = top - rng.uniform(5, 30)
        tint = rng.uniform(-5, 5, size=3)
        ramp = np.linspace(top, bottom, h, dtype=np.float32)[:, None, None] + tint.astype(np.float32)
        column = Image.fromarray(np.clip(ramp, 0, 255).astype(np.uint8), "RGB")  # (h, 1): widen in C
        return column.resize((w, h), Image.Resampling.NEAREST)
    # Noisy: a desaturated mid grey with low-frequency blobs and fine grain. Grey enough not to look like any
    # item colour, and never dark enough to hide a black item or the dark text lines.
    base = rng.uniform(100, 165) + rng.uniform(-10, 10, size=3)
    gx, gy = int(rng.integers(4, 9)), int(rng.integers(4, 9))
    blobs = base + rng.uniform(-30, 30, size=(gy, gx, 1)) + rng.uniform(-8, 8, size=(gy, gx, 3))
    small = Image.fromarray(np.clip(blobs, 0, 255).astype(np.uint8), "RGB")
    # Grain in 2x2 cells: half the random numbers, and finer grain would not survive any downscale anyway.
    cells = rng.integers(0, 29, size=((h + 1) // 2, (w + 1) // 2), dtype=np.uint8)
    grain = Image.fromarray(cells, "L").resize((w, h), Image.Resampling.NEAREST).convert("RGB")
    return ImageChops.add(small.resize((w, h), Image.Resampling.BICUBIC), grain, scale=1.0, offset=-14)


def _fill_layer(plan: _Plan, cw: int, ch: int) -> Image.Image:
    """The item's cloth: base colour, pattern in a same-hue shade, and a faint top-to-bottom shading."""
    p = plan.pattern_params
    base = np.array(plan.rgb, dtype=np.float32)
    shade = np.array(_mix(plan.rgb, *_PATTERN_SHADE[plan.color]), dtype=np.float32)
    ys = np.arange(ch, dtype=np.float32)[:, None]
    xs = np.arange(cw, dtype=np.float32)[None, :]
    if plan.pattern == "plain":
        mask = np.zeros((ch, 1), dtype=bool)
    elif plan.pattern == "striped":
        period = p["period"]
        coord = xs if p["vertical"] else ys
        mask = ((coord + p["phase_x"] * period) % period) < 0.45 * period
    elif plan.pattern == "checked":
        q = p["period"]
        mask = (np.floor((xs + p["phase_x"] * q) / q) % 2 == 0) ^ (np.floor((ys + p["phase_y"] * q) / q) % 2 == 0)
    else:  # dotted; separable per row and column, with odd rows shifted by half a period when staggered
        d = p["period"]
        odd = np.floor((ys + p["phase_y"] * d) / d) % 2 == 1  # (ch, 1)
        fx2 = (((xs + p["phase_x"] * d) % d) - d / 2) ** 2
        fx2_odd = (((xs + p["phase_x"] * d + p["stagger"] * d / 2) % d) - d / 2) ** 2
        fy2 = (((ys + p["phase_y"] * d) % d) - d / 2) ** 2
        mask = np.where(odd, fx2_odd, fx2) + fy2 < (p["radius"] * d) ** 2
    # Shading is per row, so shade the two colours once per row and pick per pixel: no full-size float maths.
    shading = 1.0 - p["shade"] * (ys / max(ch - 1, 1))  # (ch, 1)
    base_img = Image.fromarray(np.clip(base * shading[..., None], 0, 255).astype(np.uint8), "RGB")  # (ch, 1)
    base_img = base_img.resize((cw, ch), Image.Resampling.NEAREST)
    if plan.pattern == "plain":
        return base_img
    shade_img = Image.fromarray(np.clip(shade * shading[..., None], 0, 255).astype(np.uint8), "RGB")
    shade_img = shade_img.resize((cw, ch), Image.Resampling.NEAREST)
    mask_img = Image.fromarray(np.broadcast_to(mask, (ch, cw)).astype(np.uint8) * 255, "L")
    return Image.composite(shade_img, base_img, mask_img)


def _luma(rgb: Sequence[int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _draw_logo(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, item_rgb: Sequence[int], kind: int) -> None:
    """A two-tone emblem that contrasts with any item colour: dark on light items, light on dark ones."""
    dark, light = (22, 22, 28), (248, 248, 248)
    outer, inner = (dark, light) if _luma(item_rgb) > 140 else (light, dark)
    if kind == 0:  # disc with a triangle
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=outer)
        draw.polygon([(cx, cy - 0.6 * r), (cx + 0.55 * r, cy + 0.4 * r), (cx - 0.55 * r, cy + 0.4 * r)], fill=inner)
    elif kind == 1:  # diamond with a disc
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=outer)
        draw.ellipse((cx - 0.38 * r, cy - 0.38 * r, cx + 0.38 * r, cy + 0.38 * r), fill=inner)
    else:  # hexagon with a bar
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 7)[:-1]]
        draw.polygon(pts, fill=outer)
        draw.rectangle((cx - 0.55 * r, cy - 0.16 * r, cx + 0.55 * r, cy + 0.16 * r), fill=inner)


def _item(plan: _Plan, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """The item on a transparent canvas (box plus padding for the outline); returns (canvas, padding)."""
    x0, y0, x1, y1 = plan.box
    bw, bh = x1 - x0, y1 - y0
    side = max(bw, bh)
    ow = max(2, int(round(side * 0.014)))  # outline: separates light items from light backgrounds
    pad = ow + 1
    cw, ch = bw + 2 * pad, bh + 2 * pad
    fill = _fill_layer(plan, cw, ch)
    canvas = Image.new("RGBA", (cw, ch), (0, 0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    outline = (45, 45, 50, 255) if plan.color != "black" else (90, 90, 95, 255)

    def pt(u: float, v: float) -> tuple[float, float]:
        if plan.mirror:
            u = 1.0 - u
        return pad + u * bw, pad + v * bh

    for kind, spec in _SILHOUETTES[plan.garment]:
        mask = Image.new("L", (cw, ch), 0)
        mdraw = ImageDraw.Draw(mask)
        if kind == "poly":
            pts = [pt(u, v) for u, v in spec]
            mdraw.polygon(pts, fill=255)
            canvas.paste(fill, (0, 0), mask)
            draw.line([*pts, pts[0]], fill=outline, width=ow, joint="curve")
        else:  # ring: an elliptical handle of the given thickness (fraction of the box's longer side)
            (u0, v0, u1, v1), thick = spec
            (ax, ay), (bx, by) = pt(u0, v0), pt(u1, v1)
            bbox = (min(ax, bx), ay, max(ax, bx), by)
            t = max(ow + 1, int(round(thick * side)))
            mdraw.ellipse(bbox, outline=255, width=t)
            canvas.paste(fill, (0, 0), mask)
            draw.ellipse(bbox, outline=outline, width=ow)
            inner = (bbox[0] + t, bbox[1] + t, bbox[2] - t, bbox[3] - t)
            draw.ellipse(inner, outline=outline, width=ow)
    if "logo" in plan.badges:
        u, v = LOGO_ANCHOR[plan.garment]
        cx, cy = pt(u, v)
        r = max(0.06 * min(plan.width, plan.height), 0.095 * side)
        _draw_logo(draw, cx, cy, r, plan.rgb, int(rng.integers(3)))
    return canvas, pad


def _draw_sale(draw: ImageDraw.ImageDraw, plan: _Plan, rng: np.random.Generator) -> None:
    m = min(plan.width, plan.height)
    r = m * rng.uniform(0.075, 0.095)
    margin = r * 1.08 + 0.015 * m
    cx = margin if rng.random() < 0.5 else plan.width - margin
    cy = margin
    base = (225, 35, 30) if rng.random() < 0.5 else (245, 120, 20)
    color = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in base)
    if rng.random() < 0.5:
        n = int(rng.integers(12, 19))
        ratio = rng.uniform(0.72, 0.82)
        rot = rng.uniform(0, math.pi)
        pts = [
            (cx + rr * math.cos(a), cy + rr * math.sin(a))
            for k in range(2 * n)
            for a, rr in [(rot + k * math.pi / n, r if k % 2 == 0 else r * ratio)]
        ]
        draw.polygon(pts, fill=color)
    else:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color, outline=(255, 255, 255), width=max(1, int(r * 0.08)))
    # White "SALE / -30%" bars across the sticker.
    bar_h = 0.2 * r
    draw.rectangle((cx - 0.55 * r, cy - 0.32 * r, cx + 0.55 * r, cy - 0.32 * r + bar_h), fill=(255, 255, 255))
    draw.rectangle((cx - 0.38 * r, cy + 0.12 * r, cx + 0.38 * r, cy + 0.12 * r + bar_h), fill=(255, 255, 255))


def _draw_text(draw: ImageDraw.ImageDraw, plan: _Plan, rng: np.random.Generator) -> None:
    """Two or three lines of dark character blocks in the bottom band, like a caption or a price."""
    w, h = plan.width, plan.height
    lh = h * rng.uniform(0.028, 0.033)
    gap = lh * 0.45
    ink = tuple(int(v) for v in rng.integers(10, 36, size=3))
    y = h * _TEXT_BAND + lh * 0.2
    for _ in range(int(rng.integers(2, 4))):
        x = w * rng.uniform(0.05, 0.25)
        end = x + w * rng.uniform(0.4, 0.65)
        while x < end:
            for _c in range(int(rng.integers(2, 8))):
                cwid = lh * rng.uniform(0.45, 0.7)
                top = y + lh * rng.uniform(0.0, 0.25)
                draw.rectangle((x, top, x + cwid, y + lh), fill=ink)
                x += cwid + lh * 0.18
                if x >= end:
                    break
            x += lh * 0.6
        y += lh + gap


def _draw(plan: _Plan, rng: np.random.Generator) -> Image.Image:
    """The upright RGB picture: background, item (with its logo), then sale sticker and text on top."""
    img = _background(plan, rng)
    canvas, pad = _item(plan, rng)
    img.paste(canvas, (plan.box[0] - pad, plan.box[1] - pad), canvas)
    draw = ImageDraw.Draw(img)
    if "sale" in plan.badges:
        _draw_sale(draw, plan, rng)
    if "text" in plan.badges:
        _draw_text(draw, plan, rng)
    return img


def _encode(img: Image.Image, plan: _Plan) -> bytes:
    buf = io.BytesIO()
    if plan.fmt == "JPEG":
        kwargs: dict[str, Any] = {"quality": plan.quality}
        if plan.orientation != 1:
            exif = Image.Exif()
            exif[0x0112] = plan.orientation
            kwargs["exif"] = exif
        img.save(buf, "JPEG", **kwargs)
    elif plan.fmt == "PNG":
        # Level 1: the noisy backgrounds barely compress anyway, and level 6 is ~5x slower.
        img.save(buf, "PNG", compress_level=1)
    else:
        img.save(buf, "WEBP", quality=plan.quality, method=2)
    return buf.getvalue()


# What ImageOps.exif_transpose does for each orientation is undone here, so the tag makes the image upright.
_STORE_TRANSPOSE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def render_image(index: int, seed: int, *, min_size: int = 300, max_size: int = 1600) -> tuple[bytes, str, dict]:
    """Render image ``index`` of catalog ``seed``: (encoded bytes, file extension, truth).

    A pure function of its arguments (``numpy.random.default_rng([seed, index])``), so any process renders
    the same bytes. ``truth`` holds garment, color, pattern, badges (always set), orientation (EXIF value),
    width/height as displayed, format, grayscale, background and the item box (displayed pixels).
    """
    rng = np.random.default_rng([seed, index])
    plan = _plan(rng, min_size, max_size)
    img = _draw(plan, rng)
    if plan.grayscale:
        img = img.convert("L")
    if plan.orientation != 1:
        img = img.transpose(_STORE_TRANSPOSE[plan.orientation])
    data = _encode(img, plan)
    truth = {
        "garment": plan.garment,
        "color": plan.color,
        "pattern": plan.pattern,
        "badges": list(plan.badges),
        "orientation": plan.orientation,
        "width": plan.width,
        "height": plan.height,
        "format": plan.fmt.lower(),
        "grayscale": plan.grayscale,
        "background": plan.background,
        "item_box": list(plan.box),
        "mirrored": plan.mirror,
    }
    return data, plan.ext, truth


def _missing(index: int, seed: int, fraction: float) -> list[bool]:
    """Per task: is the label withheld? From its own stream, so images never depend on ``missing_fraction``."""
    rng = np.random.default_rng([seed, index, 1])
    return [bool(u < fraction) for u in rng.random(len(SYNTH_TASKS.tasks))]


# ------------------------------------------------------------------------------------------------ catalog
_LABEL_FIELDS = [
    pa.field("uri", pa.string()),
    pa.field("garment", pa.string()),
    pa.field("color", pa.string()),
    pa.field("pattern", pa.string()),
    pa.field("badges", pa.list_(pa.string())),
]
LABELS_SCHEMA = pa.schema(_LABEL_FIELDS)
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


def _render_one(index: int, seed: int, min_size: int, max_size: int) -> tuple[int, bytes, str, dict]:
    data, ext, truth = render_image(index, seed, min_size=min_size, max_size=max_size)
    return index, data, ext, truth


def _render_all(cfg: SynthConfig) -> Iterator[list[tuple[int, bytes, str, dict]]]:
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


def _parquet_bytes(rows: list[dict], schema: pa.Schema) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue().to_pybytes()


def generate(cfg: SynthConfig) -> SynthResult:
    """Write ``cfg.images`` images starting at index ``cfg.start`` under ``cfg.out``, with their labels.

    Layout under ``out``: ``images/img_NNNNNN.<jpg|png|webp>``, ``labels.parquet`` (training labels, some
    withheld), ``truth.parquet`` (every label, plus orientation, displayed width/height, format, grayscale)
    and ``tasks.yaml`` (``SYNTH_TASKS``). A call with ``start > 0`` adds images to an existing catalog: its
    images never collide with earlier ones, and its tables go to ``labels_<start>.parquet`` and
    ``truth_<start>.parquet`` so earlier tables are kept; ``tasks.yaml`` is rewritten identically.
    Grayscale images have no colour label (the colour is gone) but keep it in the truth table.
    """
    _check(cfg)
    t0 = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(cfg.out, **(cfg.storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(f"{root}/images", exist_ok=True)
    labels: list[dict] = []
    truths: list[dict] = []
    uris: list[str] = []
    for window in _render_all(cfg):
        files: dict[str, bytes] = {}
        for index, data, ext, truth in window:
            path = f"{root}/images/img_{index:06d}.{ext}"
            files[path] = data
            uri = _uri(fs, path)
            uris.append(uri)
            missing = _missing(index, cfg.seed, cfg.missing_fraction)
            row = {"uri": uri}
            for task, withheld in zip(SYNTH_TASKS.names, missing, strict=True):
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
    fs.pipe_file(labels_path, _parquet_bytes(labels, LABELS_SCHEMA))
    fs.pipe_file(truth_path, _parquet_bytes(truths, TRUTH_SCHEMA))
    fs.pipe_file(tasks_path, SYNTH_TASKS.to_yaml().encode("utf-8"))
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
