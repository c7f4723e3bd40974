"""The accelerator path on CPU: the read stage passes JPEG bytes on, the Predictor decodes them on its device
(torchvision's decoder runs on CPU too), Pillow takes what that decoder refuses, and the committed rows match the
CPU path's: same rows, same error reasons, embeddings within cosine 0.99. The resource plan follows."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from modelkit import committed_rows
from PIL import Image

from catalog_tagger.synthetic.catalog import write_bad_images
from catalog_tagger.tag import resources
from catalog_tagger.tag.config import TagJobConfig
from catalog_tagger.tag.job import run
from catalog_tagger.tag.reader import DecodeStage


@pytest.fixture(scope="module")
def kit(catalog_kit):
    return catalog_kit(images=16, seed=5, min_size=200, max_size=400, name="accelerator")


@pytest.fixture(scope="module")
def source(kit, tmp_path_factory) -> tuple[str, dict[str, str]]:
    """The catalog's images plus the awkward set (CMYK and grayscale JPEGs, truncated, a bomb header, PNGs...)."""
    src = tmp_path_factory.mktemp("accel-src")
    for p in Path(kit["source"]).iterdir():
        shutil.copy(p, src / p.name)
    expected = write_bad_images(src)
    return str(src), expected


def _jpeg(orientation: int = 1, mode: str = "RGB") -> bytes:
    img = Image.new("RGB", (40, 24), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, 10, 6))
    if mode != "RGB":
        img = img.convert(mode)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_read_stage_passes_jpegs_on_as_bytes_and_decodes_the_rest(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (30, 20), (0, 200, 0)).save(png, "PNG")
    files = {"rot.jpg": _jpeg(6), "gray.jpg": _jpeg(mode="L"), "cmyk.jpg": _jpeg(mode="CMYK"), "g.png": png.getvalue(),
             "cut.jpg": _jpeg()[:200]}  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    uris = [str(tmp_path / n) for n in files]
    batch = pa.table({"uri": uris, "size": [1] * 5, "etag": [None] * 5, "mtime": [None] * 5})
    out = DecodeStage(image_size=16, accelerator_jpeg=True)(batch)
    got = dict(zip(files, zip(out["status"], out["jpeg"], out["orientation"], out["width"], strict=True), strict=True))
    assert got["rot.jpg"][0] == "ok" and got["rot.jpg"][1] == files["rot.jpg"] and got["rot.jpg"][2] == 6
    assert got["rot.jpg"][3] == 24  # the width as displayed: orientation 6 swaps the sides
    assert got["gray.jpg"][1] == files["gray.jpg"]  # grayscale JPEGs go to the device too
    assert got["cmyk.jpg"][1] is None and got["g.png"][1] is None  # Pillow decoded those here
    assert out["image"][list(files).index("g.png")].any()
    cut = list(files).index("cut.jpg")
    cpu = DecodeStage(image_size=16)(batch)  # the same refusal as the CPU path, before any device sees it
    assert out["status"][cut] == cpu["status"][cut] == "error" and out["error"][cut] == cpu["error"][cut]


@pytest.mark.usefixtures("ray_local")
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_accelerator_decode_commits_the_cpu_paths_rows(kit, source, tmp_path, executor):
    src, expected = source
    common = dict(model=kit["model"], source=src, batch_size=8, executor=executor, device="cpu", calibrate=False)
    cpu = run(TagJobConfig(output=str(tmp_path / "cpu"), decode_on="cpu", **common))
    acc = run(TagJobConfig(output=str(tmp_path / "acc"), decode_on="accelerator", **common))
    assert acc.manifest["resources"]["decode_on"] == "accelerator" and cpu.manifest["resources"]["decode_on"] == "cpu"
    assert (acc.ok, acc.error) == (cpu.ok, cpu.error) == (16 + list(expected.values()).count("ok"),
                                                           list(expected.values()).count("error"))  # fmt: skip
    a, c = (committed_rows(tmp_path / d).sort_by("uri") for d in ("acc", "cpu"))
    assert a.column("uri").to_pylist() == c.column("uri").to_pylist()
    for col in ("status", "error", "width", "height", "content_hash"):
        assert a.column(col).to_pylist() == c.column(col).to_pylist(), col
    ok = np.array([s == "ok" for s in a.column("status").to_pylist()])
    ea = np.array([e for e, k in zip(a.column("embedding").to_pylist(), ok, strict=True) if k])
    ec = np.array([e for e, k in zip(c.column("embedding").to_pylist(), ok, strict=True) if k])
    cos = (ea * ec).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(ec, axis=1)
    assert cos.min() >= 0.99, cos.min()
    task = next(n for n in a.column_names if n.endswith("_score")).removesuffix("_score")
    same = np.mean([x == y for x, y in zip(a.column(task).to_pylist(), c.column(task).to_pylist(), strict=True)])
    assert same >= 0.9  # a random-init model: near ties can flip; the cosine above is the strong check


def test_the_plan_decodes_on_the_accelerator_when_there_is_a_gpu(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    cfg = TagJobConfig(model="m", source="s", output="o")
    plan = resources.plan_resources(cfg)
    assert (plan["decode_on"], plan["num_gpus"], plan["actors"], plan["decode_cpus"]) == ("accelerator", 1, 2, 0.5)
    plan = resources.plan_resources(cfg.model_copy(update={"decode_on": "cpu"}))
    assert (plan["decode_on"], plan["decode_cpus"]) == ("cpu", 1)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0})
    assert resources.plan_resources(cfg)["decode_on"] == "cpu"  # auto without a GPU: Pillow in the read stage
    assert resources.local_resources(cfg.model_copy(update={"device": "cpu"}))["decode_on"] == "cpu"
