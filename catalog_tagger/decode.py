"""Image bytes -> fixed-size uint8 RGB array: the ONE preprocessing definition used by training and tagging.

Memory is bounded per image: a pixel budget refuses an image that declares more pixels before anything is
decoded, a JPEG whose bytes cannot hold the pixels its header declares is refused, JPEGs decode at the smallest
DCT scale that still covers the target, any other image over ``REDUCE_ABOVE_PIXELS`` is box-reduced in its own
mode before any mode conversion, and 16-bit images become 8-bit through a lookup table (never a float copy).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from catalog_tagger.errors import DecodeError

# Pillow's own bomb threshold (~89M pixels) is where it only warns; we refuse there instead (the default budget).
DEFAULT_MAX_PIXELS = 89_478_485
# A decoded image larger than this (4096², after JPEG DCT scaling) is box-reduced before its mode is converted;
# smaller ones take exactly the path they always took, so that outputs (and trained models) do not move.
REDUCE_ABOVE_PIXELS = 4096 * 4096
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
# EXIF orientations 5-8 swap width and height when applied.
_SWAPS_AXES = {5, 6, 7, 8}
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # as ImageOps.exif_transpose applies them
_16BIT = ("I;16", "I;16B", "I;16L", "I;16N")
# round(v / 65535 * 255) for every 16-bit value: the old float64 formula, exactly, as a 64 KiB table.
_LUT16 = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
_HUFFMAN_DCT = {0xC0, 0xC1, 0xC2}  # SOF0-2: baseline, extended sequential, progressive (Huffman-coded)

ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class Decoded:
    """A decoded image: ``array`` is (size, size, 3) uint8; width/height are the original, as displayed."""

    array: np.ndarray
    width: int
    height: int


def content_hash(data: bytes) -> str:
    """Stable identity of an object's bytes (for stores with no etag)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB: transparency composited on white (as a browser shows it), 16-bit and float scaled."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        # Palette images may carry transparency; composite on white like a browser would.
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in _16BIT or mode == "I":
        return Image.fromarray(_to_8bit(img), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = ((arr - lo) / (hi - lo or 1.0) * 255.0).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def _to_8bit(img: Image.Image) -> np.ndarray:
    """A 16-bit image, or a 32-bit integer one with values above 255, as ``round(v / 65535 * 255)`` clipped to
    0-255 (a 32-bit one whose values all fit 8 bits: clipped as they are). Through a lookup table: one uint8
    array and the image's own integers, where the float64 formula it replaces took 4 full-size float copies."""
    arr = np.asarray(img)
    if img.mode not in _16BIT:
        hi = img.getextrema()[1]  # one band: (min, max)
        if not (isinstance(hi, int | float) and hi > 255):
            small: np.ndarray = np.clip(arr, 0, 255).astype(np.uint8)
            return small
        arr = np.clip(arr, 0, 65535)
    out: np.ndarray = _LUT16[arr]
    return out


@contextmanager
def _decode_errors() -> Iterator[None]:
    """Whatever Pillow raises for bytes that are not a usable image, as a ``DecodeError`` with a reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError(f"decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except OSError as err:
        raise DecodeError(f"corrupt or truncated image: {err}") from None
    except (ValueError, SyntaxError, EOFError, IndexError, TypeError, MemoryError) as err:
        raise DecodeError(f"cannot decode image: {type(err).__name__}: {err}") from None


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header, read without decoding its pixels, after the checks every path makes first: not empty,
    within the pixel budget, and (JPEG) enough bytes for the pixels the header declares. Call within
    ``_decode_errors``."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    img: Image.Image = Image.open(io.BytesIO(data))
    width, height = img.size
    if width * height > max_pixels:
        raise DecodeError(
            f"image is {width}x{height} = {width * height:,} pixels, above the {max_pixels:,}-pixel limit "
            "(a decompression bomb, or raise --max-image-pixels)"
        )
    if img.format == "JPEG":
        _check_jpeg_payload(data, width, height)
    return img


@dataclass(frozen=True)
class Probe:
    """What the header of an image says, read without decoding it (the reader stage of the accelerator path)."""

    format: str | None  # Pillow's format name ("JPEG", "PNG", ...)
    mode: str  # Pillow's mode ("RGB", "L", "CMYK", ...)
    width: int  # as displayed (EXIF orientation applied)
    height: int
    orientation: int  # EXIF orientation, 1-8

    @property
    def accelerator_jpeg(self) -> bool:
        """A JPEG an accelerator's decoder takes (3-channel or grayscale, one frame); others go through Pillow."""
        return self.format == "JPEG" and self.mode in ("RGB", "L", "YCbCr")


def probe(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Probe:
    """The header of ``data`` with the same refusals as ``decode_image`` (empty, over the pixel budget, a
    truncated JPEG, not an image), as a ``DecodeError`` with its reason, without decoding the pixels."""
    with _decode_errors():
        img = _open_checked(data, max_pixels)
        orientation = _orientation(img)
        width, height = img.size
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return Probe(format=img.format, mode=img.mode, width=width, height=height, orientation=orientation)


def load_rgb(data: bytes, at_least: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, int, int]:
    """Decode ``data`` to an upright 8-bit RGB image, in bounded memory; (image, original width, height as
    displayed). The image keeps at least ``at_least`` px per side where the original has them: JPEGs decode at
    the smallest DCT scale that still covers ``at_least`` (2-4x faster for large photos), and a decoded image over
    ``REDUCE_ABOVE_PIXELS`` is box-reduced to at least twice that before its mode is converted.

    Raises ``DecodeError`` with a reason for anything that cannot become an image, for an image over the
    ``max_pixels`` budget, and for a JPEG whose bytes are too few for the pixels its header declares.
    """
    with _decode_errors():
        img = _open_checked(data, max_pixels)
        width, height = img.size
        if getattr(img, "is_animated", False):
            img.seek(0)
        if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
            img.draft("RGB", (at_least, at_least))
        img.load()
        orientation = _orientation(img)
        img = _reduce(img, at_least)
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        img = to_rgb(img)
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return img, width, height


def decode_image(data: bytes, size: int, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode, apply EXIF orientation, convert to RGB and resize to ``size`` x ``size`` (see ``load_rgb``).

    Raises ``DecodeError`` with a reason for anything that cannot become an image.
    """
    img, width, height = load_rgb(data, size, max_pixels=max_pixels)
    with _decode_errors():
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (size, size, 3):  # pragma: no cover - defensive: every path above yields RGB
        raise DecodeError(f"decoded to unexpected shape {arr.shape}")
    return Decoded(array=np.ascontiguousarray(arr), width=width, height=height)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation (1 when absent or unreadable: a broken EXIF block is not worth an error row)."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - see the docstring
        return 1


def _reduce(img: Image.Image, at_least: int) -> Image.Image:
    """``img`` box-reduced by the largest integer factor that keeps both sides at least ``2 * at_least``, when it
    has more than ``REDUCE_ABOVE_PIXELS`` and a mode that needs converting; else ``img`` itself.

    In its own mode (16-bit included), so that the conversion to RGB touches a small image: a 9,400² 16-bit PNG
    took 2.2 GB through float64. Palette and 1-bit pixels cannot be averaged: they are expanded first (at most
    4 bytes a pixel). RGB needs no conversion: the final resize reads it as it is.
    """
    factor = min(img.width, img.height) // (2 * at_least)
    if img.width * img.height <= REDUCE_ABOVE_PIXELS or factor < 2 or img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    size = (_ceil(img.width, factor), _ceil(img.height, factor))
    return img if img.mode == "RGB" else img.resize(size, Image.Resampling.BOX, reducing_gap=None)


def _check_jpeg_payload(data: bytes, width: int, height: int) -> None:
    """Refuse a JPEG whose scans are too short for the pixels its frame header declares.

    A Huffman-coded JPEG codes every 8x8 block of every component with at least one bit (the DC code of its first
    scan), so its scans hold at least (blocks / 8) bytes. A header declaring 9,000² over a 16² payload (truncated,
    or forged) would otherwise decode as grey filler and be tagged ok at 9,000x9,000. Other codings (arithmetic,
    lossless) and headers this walk does not follow are left to Pillow.
    """
    layout = _jpeg_layout(data)
    if layout is None:
        return
    sampling, scans_at = layout
    hmax, vmax = max(h for h, _ in sampling), max(v for _, v in sampling)
    # Component i is ceil(width * h_i / h_max) x ceil(height * v_i / v_max) pixels (ITU T.81, A.1.1).
    blocks = sum(_ceil(_ceil(width * h, hmax), 8) * _ceil(_ceil(height * v, vmax), 8) for h, v in sampling)
    have = len(data) - scans_at
    if have * 8 < blocks:
        raise DecodeError(
            f"JPEG declares {width}x{height} but its {have:,} bytes of image data cannot hold that many pixels "
            f"(at least {_ceil(blocks, 8):,} needed): truncated or forged"
        )


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _jpeg_layout(data: bytes) -> tuple[list[tuple[int, int]], int] | None:
    """(each component's sampling factors, offset where the first scan's data starts) of a Huffman-coded JPEG, by
    walking its marker segments; None for other codings or anything unexpected."""
    pos, sampling = 2, None
    while pos + 4 <= len(data):
        marker = data[pos + 1]
        if data[pos] != 0xFF:
            return None
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: its entropy-coded data follows its header
            return (sampling, end) if sampling else None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            seg = data[pos + 4 : end]
            if marker not in _HUFFMAN_DCT or len(seg) < 6 or len(seg) < 6 + 3 * seg[5]:
                return None
            sampling = [(seg[7 + 3 * i] >> 4, seg[7 + 3 * i] & 15) for i in range(seg[5])]
            if not sampling or any(h == 0 or v == 0 for h, v in sampling):
                return None
        pos = end
    return None


def decode_full(data: bytes, size: int) -> np.ndarray:
    """Reference decode without DCT scaling or reduction (for benchmarks and tests: what the bounded decode is
    compared against)."""
    img: Image.Image = Image.open(io.BytesIO(data))
    img.load()
    img = to_rgb(ImageOps.exif_transpose(img))
    return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.uint8)
