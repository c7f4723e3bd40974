"""Decode memory bounds (issue 13, case 4): huge images are reduced before any mode conversion, 16-bit images
take a uint8 path, a per-image pixel budget holds, a JPEG whose header lies about its size is an error, and the
report's thumbnails use the same bounded decode. Normal images decode exactly as before.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from catalog_tagger.decode import decode_full, decode_image, to_rgb
from catalog_tagger.errors import DecodeError

HUGE = 9400  # 88.4 M pixels: inside the default pixel budget (89.5 M), ~190 KB on disk as a constant 16-bit PNG


def gray16_png(width: int, height: int, value: int = 1000) -> bytes:
    """A constant 16-bit grey PNG, compressed row by row (never ``width * height`` values in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + struct.pack(">H", value) * width  # filter byte 0, then big-endian samples
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def forged_jpeg(width: int, height: int) -> bytes:
    """A valid 16x16 JPEG whose frame header (SOF0) then declares ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    i = 2
    while data[i + 1] != 0xC0:
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    data[i + 5 : i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# The child's own peak: VmHWM belongs to the process image exec made. ``ru_maxrss`` would not do: Linux carries
# the forked parent's peak (pytest's, with torch and Ray loaded) over into the child.
_PEAK = (
    "\nimport resource\n"
    "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
    "print(int(hwm[0].split()[1]) // 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
)


def peak_mib(code: str, *args: str) -> tuple[str, int]:
    """Run ``code`` in a fresh interpreter: its last stdout line, and its peak resident memory in MiB."""
    proc = subprocess.run([sys.executable, "-c", code + _PEAK, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *lines, peak = proc.stdout.splitlines()
    return (lines[-1] if lines else ""), int(peak)


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("huge") / "gray16.png"
    path.write_bytes(gray16_png(HUGE, HUGE))
    return path


def test_a_huge_16_bit_png_decodes_in_bounded_memory(huge_png: Path) -> None:
    """Today: 2.2 GB through float64. Now: the loaded 16-bit image (~180 MB) and little else."""
    assert huge_png.stat().st_size < 300_000
    code = (
        "import sys, numpy as np\n"
        "from catalog_tagger.decode import decode_image\n"
        "d = decode_image(open(sys.argv[1], 'rb').read(), 224)\n"
        "print(d.width, d.height, int(d.array.min()), int(d.array.max()))\n"
    )
    out, peak = peak_mib(code, str(huge_png))
    assert out == f"{HUGE} {HUGE} 4 4", out  # 1000 / 65535 * 255 = 3.89 -> 4, everywhere
    assert peak < 700, f"decoding a {HUGE}x{HUGE} 16-bit PNG peaked at {peak} MiB"


def test_report_thumbnails_use_the_same_bounded_decode(huge_png: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from catalog_tagger.report import thumbnail\n"
        "uri, w, h = thumbnail(sys.argv[1])\n"
        "print(uri[:23], max(w, h))\n"
        "print(thumbnail(sys.argv[2]))\n"
    )
    forged = tmp_path / "forged.jpg"
    forged.write_bytes(forged_jpeg(9000, 9000))
    out, peak = peak_mib(code, str(huge_png), str(forged))
    assert out == "None", "a forged JPEG gets no thumbnail"
    assert peak < 700, f"a thumbnail of a {HUGE}x{HUGE} 16-bit PNG peaked at {peak} MiB"


def test_a_jpeg_whose_header_declares_more_pixels_than_its_bytes_hold_is_an_error() -> None:
    data = forged_jpeg(9000, 9000)
    assert len(data) < 1000
    with pytest.raises(DecodeError, match=r"declares 9000x9000 .* truncated or forged"):
        decode_image(data, 64)
    assert decode_image(forged_jpeg(16, 16), 64).width == 16  # the same bytes, honest header: fine


@pytest.mark.parametrize("progressive", [False, True])
def test_the_smallest_honest_jpegs_still_decode(progressive: bool) -> None:
    """A constant-colour JPEG at the lowest quality with optimised tables is as small as an honest one gets."""
    for mode, size in (("L", (3000, 2000)), ("RGB", (2000, 3000))):
        buf = io.BytesIO()
        Image.new(mode, size, 90).save(buf, "JPEG", quality=1, optimize=True, progressive=progressive)
        dec = decode_image(buf.getvalue(), 32)
        assert (dec.width, dec.height) == size and dec.array.shape == (32, 32, 3)


def test_the_pixel_budget_is_per_image_and_configurable() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (1, 2, 3)).save(buf, "PNG")
    assert decode_image(buf.getvalue(), 16, max_pixels=1200).width == 40
    with pytest.raises(DecodeError, match=r"40x30 = 1,200 pixels, above the 1,199-pixel"):
        decode_image(buf.getvalue(), 16, max_pixels=1199)


def test_16_bit_conversion_is_the_old_float_formula_exactly() -> None:
    """The uint8 lookup path equals ``clip(v / 65535 * 255 + 0.5)`` for every 16-bit value (and for mode I)."""
    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    want = np.clip(values.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    got = np.asarray(to_rgb(Image.fromarray(values)))
    assert got.shape == (256, 256, 3) and np.array_equal(got[..., 0], want)
    wide = np.array([[-5, 0, 255, 256, 65535, 70000, 2**31 - 1]], dtype=np.int32)
    want_i = np.clip(wide.astype(np.float64) / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(np.asarray(to_rgb(Image.fromarray(wide, "I")))[..., 0], want_i)
    low = np.array([[-5, 0, 7, 255]], dtype=np.int32)  # mode I whose maximum fits 8 bits: taken as 8-bit
    assert np.asarray(to_rgb(Image.fromarray(low, "I")))[0, :, 0].tolist() == [0, 0, 7, 255]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "I;16", "CMYK", "1"])
def test_ordinary_images_decode_exactly_as_the_reference(mode: str) -> None:
    """Below the reduction threshold every mode takes the same path as ``decode_full`` (no draft for PNG/TIFF)."""
    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, size=(300, 500, 4), dtype=np.uint8), "RGBA")
    img = rgba.convert(mode) if mode != "I;16" else Image.fromarray(rng.integers(0, 65536, (300, 500), np.uint16))
    buf = io.BytesIO()
    img.save(buf, "TIFF" if mode == "CMYK" else "PNG")
    data = buf.getvalue()
    assert np.array_equal(decode_image(data, 224).array, decode_full(data, 224))
