"""Tests for the synthetic catalog: determinism, layout, label/pixel agreement, formats, bad images."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from catalog_tagger.config import load_tasks
from catalog_tagger.decode import decode_image
from catalog_tagger.errors import DecodeError, UserError
from catalog_tagger.synthetic.catalog import SynthConfig, generate, write_bad_images
from catalog_tagger.synthetic.draw import CORE_POINT, picture, render_image
from catalog_tagger.synthetic.plan import BADGES, COLOR_RGB, COLORS, GARMENTS, PATTERNS, SYNTH_TASKS, plan_image

SMALL = {"min_size": 300, "max_size": 500}


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "images").iterdir())}


def _rows(path: str) -> list[dict]:
    with fsspec.open(path, "rb") as fh:
        return pq.read_table(fh).to_pylist()


def _strip_uri(rows: list[dict]) -> list[dict]:
    return [{**r, "uri": r["uri"].rsplit("/", 1)[1]} for r in rows]


@pytest.fixture(scope="module")
def sample() -> list[tuple[bytes, str, dict]]:
    """200 small rendered images of catalog seed 0 (no files written)."""
    return [render_image(i, 0, **SMALL) for i in range(200)]


def test_tasks_are_the_documented_ones(tmp_path: Path) -> None:
    assert SYNTH_TASKS.names == ["garment", "color", "pattern", "badges"]
    assert SYNTH_TASKS.task("garment").labels == GARMENTS
    assert SYNTH_TASKS.task("color").labels == COLORS and len(COLORS) == 8
    assert SYNTH_TASKS.task("pattern").labels == PATTERNS
    assert SYNTH_TASKS.task("badges").kind == "multilabel" and SYNTH_TASKS.task("badges").labels == BADGES
    res = generate(SynthConfig(out=str(tmp_path), images=3, **SMALL))
    assert load_tasks(res.tasks_uri) == SYNTH_TASKS


def test_same_seed_same_bytes_in_any_process(tmp_path: Path) -> None:
    # 80 images: above the parallel threshold, so the pool (2 processes) is compared with a serial run.
    a = generate(SynthConfig(out=str(tmp_path / "a"), images=80, seed=3, workers=2, **SMALL))
    b = generate(SynthConfig(out=str(tmp_path / "b"), images=80, seed=3, workers=1, **SMALL))
    assert len(a.images) == 80
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    assert _strip_uri(_rows(a.labels_uri)) == _strip_uri(_rows(b.labels_uri))
    assert _strip_uri(_rows(a.truth_uri)) == _strip_uri(_rows(b.truth_uri))
    # And a single image rendered on its own is the same file.
    data, ext, _ = render_image(41, 3, **SMALL)
    assert (tmp_path / "a" / "images" / f"img_000041.{ext}").read_bytes() == data


def test_different_seed_differs() -> None:
    a = [render_image(i, 0, **SMALL) for i in range(20)]
    b = [render_image(i, 1, **SMALL) for i in range(20)]
    assert all(x[0] != y[0] for x, y in zip(a, b, strict=True))
    assert [x[2] for x in a] != [y[2] for y in b]


def test_layout_uris_and_columns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    res = generate(SynthConfig(out="cat", images=12, **SMALL))  # relative: URIs must still be absolute paths
    root = (tmp_path / "cat").resolve()
    assert res.labels_uri == str(root / "labels.parquet")
    assert res.truth_uri == str(root / "truth.parquet")
    assert res.tasks_uri == str(root / "tasks.yaml")
    assert res.images == sorted(str(p) for p in (root / "images").iterdir())
    assert all(Path(u).is_absolute() and Path(u).name.startswith("img_0000") for u in res.images)
    labels = pq.read_table(res.labels_uri)
    truth = pq.read_table(res.truth_uri)
    assert labels.column_names == ["uri", "garment", "color", "pattern", "badges"]
    assert str(labels.schema.field("badges").type) == "list<element: string>"
    assert truth.column_names[:5] == labels.column_names
    assert {"orientation", "width", "height", "format", "grayscale"} <= set(truth.column_names)
    assert labels.column("uri").to_pylist() == res.images == truth.column("uri").to_pylist()
    for row in truth.to_pylist():
        assert None not in row.values()
        assert set(row["badges"]) <= set(BADGES)


def test_start_adds_images_without_touching_existing(tmp_path: Path) -> None:
    first = generate(SynthConfig(out=str(tmp_path), images=30, seed=5, **SMALL))
    before = _digests(tmp_path)
    labels_before = (tmp_path / "labels.parquet").read_bytes()
    more = generate(SynthConfig(out=str(tmp_path), images=10, seed=5, start=30, **SMALL))
    after = _digests(tmp_path)
    assert len(after) == 40
    assert {k: after[k] for k in before} == before
    assert not set(first.images) & set(more.images)
    assert (tmp_path / "labels.parquet").read_bytes() == labels_before
    assert more.labels_uri.endswith("labels_30.parquet") and more.truth_uri.endswith("truth_30.parquet")
    assert [Path(r["uri"]).name[:10] for r in _rows(more.labels_uri)] == [f"img_{i:06d}" for i in range(30, 40)]
    # The added images are exactly what one bigger catalog would have held at those indices.
    for uri in more.images:
        index = int(Path(uri).stem.split("_")[1])
        assert Path(uri).read_bytes() == render_image(index, 5, **SMALL)[0]


def test_missing_labels_near_fraction_and_grayscale_has_no_colour(tmp_path: Path) -> None:
    res = generate(SynthConfig(out=str(tmp_path), images=400, missing_fraction=0.25, **SMALL))
    labels, truth = _rows(res.labels_uri), _rows(res.truth_uri)
    for task in ("garment", "pattern", "badges"):
        frac = sum(r[task] is None for r in labels) / len(labels)
        assert 0.18 < frac < 0.32, (task, frac)
    gray = [t["grayscale"] for t in truth]
    assert 0 < sum(gray) < 0.12 * len(gray)
    for lab, tru in zip(labels, truth, strict=True):
        if tru["grayscale"]:
            assert lab["color"] is None and tru["color"] in COLORS
        for task in ("garment", "color", "pattern", "badges"):
            assert lab[task] is None or lab[task] == tru[task]
    colour_missing = sum(r["color"] is None for r in labels) / len(labels)
    assert 0.2 < colour_missing < 0.38
    assert any(r["badges"] == [] for r in labels), "an empty badge list is a real label"
    none = generate(SynthConfig(out=str(tmp_path / "none"), images=40, missing_fraction=0.0, **SMALL))
    none_rows = _rows(none.labels_uri)
    assert all(r[t] is not None for r in none_rows for t in ("garment", "pattern", "badges"))


def test_formats_sizes_and_label_balance(sample: list[tuple[bytes, str, dict]]) -> None:
    exts = [ext for _, ext, _ in sample]
    assert set(exts) == {"jpg", "png", "webp"}
    assert 0.65 < exts.count("jpg") / len(exts) < 0.92
    for data, ext, truth in sample:
        fmt = Image.open(io.BytesIO(data)).format
        assert fmt == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext] and truth["format"] == fmt.lower()
        w, h = truth["width"], truth["height"]
        assert 300 <= w <= 500 and 300 <= h <= 500 and 0.74 < w / h < 1.34
    for key, values in (("garment", GARMENTS), ("color", COLORS), ("pattern", PATTERNS)):
        seen = {t[key] for _, _, t in sample}
        assert seen == set(values), key
    for badge in BADGES:
        share = sum(badge in t["badges"] for _, _, t in sample) / len(sample)
        assert 0.18 < share < 0.42, badge


def test_exif_oriented_images_decode_upright(sample: list[tuple[bytes, str, dict]]) -> None:
    oriented = [(i, d, t) for i, (d, _, t) in enumerate(sample) if t["orientation"] != 1]
    assert oriented, "the sample should hold EXIF-rotated JPEGs"
    for index, data, truth in oriented:
        assert truth["format"] == "jpeg"
        raw = Image.open(io.BytesIO(data))
        assert raw.getexif().get(0x0112) == truth["orientation"]
        assert raw.size == (truth["height"], truth["width"]) or truth["orientation"] == 3
        dec = decode_image(data, 64)
        assert (dec.width, dec.height) == (truth["width"], truth["height"])
        # Compare with the upright picture before encoding: a wrong rotation would differ wildly.
        rng = np.random.default_rng([0, index])
        upright = picture(plan_image(rng, 300, 500), rng)
        if truth["grayscale"]:
            upright = upright.convert("L")
        ref = np.asarray(upright.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)
        assert np.abs(dec.array.astype(np.float32) - ref).mean() < 6.0


def _core_patch(arr: np.ndarray, truth: dict, radius: int) -> np.ndarray:
    size = arr.shape[0]
    x0, y0, x1, y1 = truth["item_box"]
    u, v = CORE_POINT[truth["garment"]]
    u = 1.0 - u if truth["mirrored"] else u
    cx = int((x0 + u * (x1 - x0)) / truth["width"] * size)
    cy = int((y0 + v * (y1 - y0)) / truth["height"] * size)
    return arr[cy - radius : cy + radius + 1, cx - radius : cx + radius + 1].reshape(-1, 3).astype(np.float32)


def test_plain_items_show_their_labelled_colour(sample: list[tuple[bytes, str, dict]]) -> None:
    palette = np.array([COLOR_RGB[c] for c in COLORS], dtype=np.float32)
    checked = 0
    for data, _, truth in sample:
        if truth["pattern"] != "plain" or truth["grayscale"]:
            continue
        median = np.median(_core_patch(decode_image(data, 64).array, truth, 2), axis=0)
        nearest = COLORS[int(np.argmin(((palette - median) ** 2).sum(axis=1)))]
        assert nearest == truth["color"], (truth, median)
        checked += 1
    assert checked >= 30


def test_patterns_survive_downscaling(sample: list[tuple[bytes, str, dict]]) -> None:
    # At 128 px (what training sees) a patterned item's core is clearly textured, a plain one flat.
    for data, _, truth in sample:
        luma = _core_patch(decode_image(data, 128).array, truth, 5) @ np.array([0.299, 0.587, 0.114], np.float32)
        if truth["pattern"] == "plain":
            assert luma.std() < 4, truth
        else:
            assert luma.std() > 10, truth


def test_text_and_sale_badges_are_where_they_should_be(sample: list[tuple[bytes, str, dict]]) -> None:
    for data, _, truth in sample:
        arr = decode_image(data, 128).array.astype(np.int16)
        band = arr[int(0.87 * 128) : int(0.96 * 128)]
        dark = (band.max(axis=2) < 60).mean()
        assert (dark > 0.05) if "text" in truth["badges"] else (dark < 0.01), (truth, dark)
        if truth["grayscale"] or truth["color"] in ("red", "orange", "yellow"):
            continue
        corners = np.concatenate([arr[:26, :26], arr[:26, -26:]]).reshape(-1, 3)
        r, g, b = corners[:, 0], corners[:, 1], corners[:, 2]
        warm = ((r > 170) & (g < 160) & (b < 90) & (r - g > 60)).mean()
        assert (warm > 0.05) if "sale" in truth["badges"] else (warm < 0.01), (truth, warm)


def test_memory_url() -> None:
    fs = fsspec.filesystem("memory")
    try:
        res = generate(SynthConfig(out="memory://synth-test", images=6, **SMALL))
        assert all(u.startswith("memory://") and "/synth-test/images/img_" in u for u in res.images)
        assert fs.exists("/synth-test/labels.parquet") and fs.exists("/synth-test/tasks.yaml")
        rows = _rows(res.labels_uri)
        assert [r["uri"] for r in rows] == res.images
        for uri in res.images:
            with fsspec.open(uri, "rb") as fh:
                decode_image(fh.read(), 32)
    finally:
        if fs.exists("/synth-test"):
            fs.rm("/synth-test", recursive=True)


def test_bad_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing_fraction"):
        generate(SynthConfig(out=str(tmp_path), missing_fraction=1.5))
    with pytest.raises(UserError, match="min_size"):
        generate(SynthConfig(out=str(tmp_path), min_size=600, max_size=500))
    assert not any(tmp_path.iterdir())


def test_bad_images_decode_as_expected(tmp_path: Path) -> None:
    expected = write_bad_images(tmp_path)
    assert expected == {
        "empty.jpg": "error",
        "truncated.jpg": "error",
        "random.jpg": "error",
        "palette_alpha.png": "ok",
        "gray16.png": "ok",
        "cmyk.jpg": "ok",
        "gray.jpg": "ok",
        "animated.gif": "ok",
        "bomb.png": "error",
    }
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
    assert (tmp_path / "bomb.png").stat().st_size < 1000
    bomb = (tmp_path / "bomb.png").read_bytes()
    assert bomb[12:16] == b"IHDR" and struct.unpack(">II", bomb[16:24]) == (50_000, 50_000)
    assert zlib.crc32(bomb[12:29]) == struct.unpack(">I", bomb[29:33])[0], "IHDR CRC must be valid"
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    assert getattr(Image.open(tmp_path / "animated.gif"), "n_frames", 1) == 3
    for name, expect in expected.items():
        data = (tmp_path / name).read_bytes()
        if expect == "ok":
            assert decode_image(data, 64).array.shape == (64, 64, 3), name
        else:
            with pytest.raises(DecodeError):
                decode_image(data, 64)


def test_the_regression_task_is_opt_in_and_is_the_pixels_brightness(tmp_path: Path) -> None:
    from catalog_tagger.synthetic.plan import REGRESSION_TASK, SYNTH_TASKS_WITH_REGRESSION

    plain = generate(SynthConfig(out=str(tmp_path / "plain"), images=24, seed=4, **SMALL))
    res = generate(SynthConfig(out=str(tmp_path / "reg"), images=24, seed=4, regression=True, **SMALL))
    assert _digests(tmp_path / "plain") == _digests(tmp_path / "reg")  # the images do not change
    assert load_tasks(res.tasks_uri) == SYNTH_TASKS_WITH_REGRESSION
    assert SYNTH_TASKS_WITH_REGRESSION.names == [*SYNTH_TASKS.names, REGRESSION_TASK]
    assert SYNTH_TASKS_WITH_REGRESSION.task(REGRESSION_TASK).kind == "regression"
    labels, plain_labels = _rows(res.labels_uri), _rows(plain.labels_uri)
    assert list(labels[0]) == ["uri", *SYNTH_TASKS_WITH_REGRESSION.names]
    # The other tasks' withheld labels stay the same with the extra task (its draw comes after theirs).
    assert [{k: r[k] for k in r if k != REGRESSION_TASK} for r in _strip_uri(labels)] == _strip_uri(plain_labels)
    truth = _rows(res.truth_uri)
    for row, label in zip(truth, labels, strict=True):
        # The target is the image's own mean luma, as a decoder sees it (EXIF orientation does not change a mean).
        with Image.open(row["uri"]) as img:
            luma = np.asarray(img.convert("L"), dtype=np.float32).mean() / 255
        assert row[REGRESSION_TASK] == pytest.approx(luma, abs=0.02)  # lossy encoding moves it a little
        assert label[REGRESSION_TASK] in (None, row[REGRESSION_TASK])
    values = [r[REGRESSION_TASK] for r in truth]
    assert 0.0 < min(values) < max(values) < 1.0 and np.std(values) > 0.03  # it varies: something to learn


def test_cli_synth_regression_flag(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from catalog_tagger.cli import app
    from catalog_tagger.synthetic.plan import SYNTH_TASKS_WITH_REGRESSION

    r = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "c"), "-n", "2", "--regression"])
    assert r.exit_code == 0, r.output
    assert load_tasks(tmp_path / "c" / "tasks.yaml") == SYNTH_TASKS_WITH_REGRESSION
