"""Pixels of one synthetic image: background, garment, pattern, badges, then the encoded file (``render_image``)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from catalog_tagger.synthetic.plan import TEXT_BAND, Plan, plan_image

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

# Silhouettes in unit box coordinates (x right, y down) of a box of ``GARMENT_ASPECT``.
_Shape = tuple[str, Any]
# fmt: off
_SILHOUETTES: dict[str, list[_Shape]] = {
    "tshirt": [
        (
            "poly",
            [(0.36, 0.02), (0.5, 0.12), (0.64, 0.02), (0.82, 0.08), (1.0, 0.30), (0.88, 0.44), (0.78, 0.36),
             (0.78, 0.98), (0.22, 0.98), (0.22, 0.36), (0.12, 0.44), (0.0, 0.30), (0.18, 0.08)],
        )
    ],
    "dress": [
        (
            "poly",
            [(0.36, 0.0), (0.42, 0.0), (0.45, 0.08), (0.55, 0.08), (0.58, 0.0), (0.64, 0.0), (0.68, 0.18),
             (0.62, 0.40), (0.97, 0.99), (0.03, 0.99), (0.38, 0.40), (0.32, 0.18)],
        )
    ],
    "trousers": [
        ("poly", [(0.12, 0.0), (0.88, 0.0), (0.97, 0.99), (0.56, 0.99), (0.5, 0.30), (0.44, 0.99), (0.03, 0.99)])
    ],
    "shoe": [
        (
            "poly",
            [(0.04, 0.04), (0.30, 0.07), (0.40, 0.30), (0.68, 0.45), (0.92, 0.58), (0.99, 0.78), (0.96, 0.97),
             (0.04, 0.97), (0.01, 0.5)],
        )
    ],
    "bag": [
        ("ring", ((0.27, 0.02, 0.73, 0.64), 0.065)),  # handle, drawn first so the body covers its lower half
        ("poly", [(0.12, 0.34), (0.88, 0.34), (0.97, 0.98), (0.03, 0.98)]),
    ],
}
# fmt: on
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


def _mix(rgb: Sequence[float], target: str, amount: float) -> tuple[int, int, int]:
    t = 255.0 if target == "white" else 0.0
    return tuple(round(c + (t - c) * amount) for c in rgb)  # type: ignore[return-value]


def _background(plan: Plan, rng: np.random.Generator) -> Image.Image:
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


def _fill_layer(plan: Plan, cw: int, ch: int) -> Image.Image:
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


def _item(plan: Plan, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """The item on a transparent canvas (box plus padding for the outline); returns (canvas, padding)."""
    x0, y0, x1, y1 = plan.box
    bw, bh = x1 - x0, y1 - y0
    side = max(bw, bh)
    ow = max(2, round(side * 0.014))  # outline: separates light items from light backgrounds
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
            t = max(ow + 1, round(thick * side))
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


def _draw_sale(draw: ImageDraw.ImageDraw, plan: Plan, rng: np.random.Generator) -> None:
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


def _draw_text(draw: ImageDraw.ImageDraw, plan: Plan, rng: np.random.Generator) -> None:
    """Two or three lines of dark character blocks in the bottom band, like a caption or a price."""
    w, h = plan.width, plan.height
    lh = h * rng.uniform(0.028, 0.033)
    gap = lh * 0.45
    ink = tuple(int(v) for v in rng.integers(10, 36, size=3))
    y = h * TEXT_BAND + lh * 0.2
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


def picture(plan: Plan, rng: np.random.Generator) -> Image.Image:
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


def _encode(img: Image.Image, plan: Plan) -> bytes:
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


Truth = dict[str, Any]  # what an image really shows and how it is stored (see ``render_image``)
# What ImageOps.exif_transpose does for each orientation is undone here, so the tag makes the image upright.
_STORE_TRANSPOSE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def render_image(index: int, seed: int, *, min_size: int = 300, max_size: int = 1600) -> tuple[bytes, str, Truth]:
    """Render image ``index`` of catalog ``seed``: (encoded bytes, file extension, truth).

    A pure function of its arguments (``numpy.random.default_rng([seed, index])``), so any process renders
    the same bytes. ``truth`` holds garment, color, pattern, badges (always set), orientation (EXIF value),
    width/height as displayed, format, grayscale, background, the item box (displayed pixels) and the brightness.
    """
    rng = np.random.default_rng([seed, index])
    plan = plan_image(rng, min_size, max_size)
    img = picture(plan, rng)
    if plan.grayscale:
        img = img.convert("L")
    brightness = round(float(np.asarray(img.convert("L"), dtype=np.float32).mean()) / 255.0, 4)
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
        "brightness": brightness,  # mean luma (ITU-R 601, as Pillow's "L") of the displayed image, 0..1
    }
    return data, plan.ext, truth
