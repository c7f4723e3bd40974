"""The device decode path (accel_decode): EXIF orientation exactly as Pillow's transpose, a bad image in a batch
never costs the others their decode nor raises, the batch is decoded in bounded chunks, and on the synthetic
catalog it agrees with the Pillow path (pixels, embeddings, labels). On CPU here; the same tests run on CUDA
(nvJPEG) under the ``gpu`` marker.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

import catalog_tagger.accel_decode as accel
from catalog_tagger.accel_decode import apply_orientation, decode_jpegs
from catalog_tagger.decode import _TRANSPOSE, decode_image
from catalog_tagger.model.artifact import load_artifact
from catalog_tagger.model.inference import output_columns, prepare_for_inference, run_batch

# torchvision 0.29 deprecates its decoders (accel_decode silences that one message; pytest resets filters per test).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities of TorchVision")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def corners_image(width: int = 48, height: int = 32) -> np.ndarray:
    """Four flat corner quadrants of distinct colours (so any wrong flip or turn moves a colour), smooth enough
    that JPEG keeps them."""
    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[: height // 2, : width // 2] = (230, 30, 30)
    arr[: height // 2, width // 2 :] = (30, 200, 40)
    arr[height // 2 :, : width // 2] = (40, 60, 220)
    arr[height // 2 :, width // 2 :] = (240, 230, 60)
    return arr


def jpeg(arr: np.ndarray, *, orientation: int = 1, **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    img.save(buf, "JPEG", quality=95, **kwargs)
    return buf.getvalue()


def header_orientation(data: bytes) -> int:
    with Image.open(io.BytesIO(data)) as img:
        return int(img.getexif().get(0x0112, 1))


@pytest.mark.parametrize("code", range(1, 9))
def test_orientation_equals_pillow_transpose_exactly(code: int) -> None:
    arr = np.random.default_rng(code).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(arr).transpose(_TRANSPOSE[code])) if code in _TRANSPOSE else arr
    got = apply_orientation(torch.from_numpy(arr).permute(2, 0, 1), code).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("code", range(1, 9))
def test_orientation_after_resize_matches_pillow(code: int, device: torch.device) -> None:
    data = jpeg(corners_image(), orientation=code)
    # 20 px from 48x32: no JPEG draft reduction (the synthetic-catalog test covers that), so only orientation,
    # decoder and resize differ from Pillow
    out, reasons = decode_jpegs([data], [code], 20, device)
    assert reasons == [None]
    expected = decode_image(data, 20).array.astype(np.int16)  # Pillow: its EXIF transpose, BILINEAR resize
    diff = np.abs(out[0].cpu().numpy().astype(np.int16) - expected)
    assert diff.mean() < 0.5 and diff.max() <= 4, (diff.mean(), diff.max())


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(corners_image()).convert("CMYK").save(buf, "JPEG")
    return buf.getvalue()


def bad_huffman_jpeg(good: bytes) -> bytes:
    """A JPEG whose header Pillow reads but whose Huffman table every decoder refuses."""
    dht = good.index(b"\xff\xc4")
    return good[: dht + 4] + b"\x55" * 20 + good[dht + 24 :]


def test_bad_images_in_a_batch_are_reported_and_the_good_ones_decoded(device: torch.device) -> None:
    goods = noise_jpegs(2, 40, 56, seed=0)
    gray = jpeg(corners_image()[..., 0])  # a one-component JPEG
    png = io.BytesIO()
    Image.fromarray(corners_image()).save(png, "PNG")
    batch = {
        "good0": goods[0],
        "truncated": goods[0][: len(goods[0]) // 2],
        "bad_huffman": bad_huffman_jpeg(goods[1]),
        "cmyk": cmyk_jpeg(),
        "gray": gray,
        "png": png.getvalue(),
        "empty": b"",
        "garbage": b"\xff\xd8 not really a jpeg \xff\xd9",
        "good1": goods[1],
    }
    out, reasons = decode_jpegs(list(batch.values()), [1] * len(batch), 24, device)
    by_name = dict(zip(batch, reasons, strict=True))
    decoded = {name for name, reason in by_name.items() if reason is None}
    assert decoded == {"good0", "good1", "gray"}, by_name
    for name, reason in by_name.items():
        row = out[list(batch).index(name)].cpu().numpy()
        if reason is None:
            expected = decode_image(batch[name], 24).array.astype(np.int16)
            assert np.abs(row.astype(np.int16) - expected).mean() < 3.0, name
        else:
            assert isinstance(reason, str) and len(reason) > 10, name
            assert not row.any(), f"{name}: a failed row must be zeros"
    assert "CMYK" in str(by_name["cmyk"]) and "end-of-image" in str(by_name["truncated"])
    assert "device JPEG decode failed" in str(by_name["bad_huffman"])
    gray_row = out[list(batch).index("gray")]
    assert torch.equal(gray_row[..., 0], gray_row[..., 1]) and torch.equal(gray_row[..., 1], gray_row[..., 2])


class CountingDecoder:
    """Wraps torchvision's decode_jpeg: how many images each call was given."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.real = torchvision.io.decode_jpeg

    def __call__(self, encoded: Any, **kwargs: Any) -> Any:
        self.calls.append(len(encoded) if isinstance(encoded, list) else 1)
        return self.real(encoded, **kwargs)


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> CountingDecoder:
    """accel_decode's decoder, counted."""
    wrapper = CountingDecoder()
    monkeypatch.setattr(accel, "decode_jpeg", wrapper)
    return wrapper


def noise_jpegs(count: int, height: int, width: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [jpeg(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def test_one_by_one_only_after_the_batched_call_fails(counter: CountingDecoder) -> None:
    goods = noise_jpegs(3, 32, 32, seed=1)
    cpu = torch.device("cpu")
    decode_jpegs(goods, [1, 1, 1], 8, cpu)
    assert counter.calls == [3]  # one batched call, nothing else
    counter.calls.clear()
    out, reasons = decode_jpegs([goods[0], bad_huffman_jpeg(goods[1]), goods[2]], [1, 1, 1], 8, cpu)
    assert counter.calls == [3, 1, 1, 1]  # the batch failed: then each image alone
    assert [r is None for r in reasons] == [True, False, True]
    assert out[0].any() and out[2].any()


def test_batch_is_decoded_in_chunks_with_the_same_result(counter: CountingDecoder) -> None:
    datas = noise_jpegs(5, 32, 48, seed=2)
    cpu = torch.device("cpu")
    whole, _ = decode_jpegs(datas, [1, 6, 3, 8, 1], 16, cpu)
    chunked, _ = decode_jpegs(datas, [1, 6, 3, 8, 1], 16, cpu, chunk_pixels=2 * 32 * 48)
    assert counter.calls == [5, 2, 2, 1]
    assert torch.equal(whole, chunked)
    with pytest.raises(ValueError, match="orientations"):
        decode_jpegs(datas, [1], 16, cpu)


def test_synthetic_catalog_matches_the_pillow_path(catalog_kit: Any, device: torch.device) -> None:
    kit = catalog_kit(images=24, seed=3, min_size=300, max_size=700, name="accel")
    datas = [open(path, "rb").read() for path in kit["images"] if path.endswith(".jpg")]  # noqa: SIM115
    assert len(datas) >= 8
    model, card = load_artifact(kit["model"])
    size = card.image_size
    out, reasons = decode_jpegs(datas, [header_orientation(d) for d in datas], size, device)
    assert reasons == [None] * len(datas)  # the synthetic JPEGs (colour and grayscale) all decode on the device
    pillow = np.stack([decode_image(d, size).array for d in datas])  # Pillow with JPEG draft mode
    diff = np.abs(out.cpu().numpy().astype(np.int16) - pillow.astype(np.int16))
    assert diff.mean() < 1.0, diff.mean()  # ~0.2 measured: the draft reduction is emulated (box average)

    model = prepare_for_inference(model, torch.device("cpu"))
    fast, slow = run_batch(model, out.cpu()).output, run_batch(model, pillow).output
    cosine = torch.nn.functional.cosine_similarity(fast.embedding, slow.embedding, dim=1)
    assert cosine.min() >= 0.99, cosine
    # A random-init model: equal labels are weak evidence (its logits are close together and carry no meaning);
    # the embedding cosine above is the stronger check. The GPU bench repeats this with trained weights.
    fast_cols, slow_cols = output_columns(card, fast), output_columns(card, slow)
    for task in card.task_config().tasks:  # every kind's labels are in the column named after the task
        assert fast_cols[task.name] == slow_cols[task.name], task.name
