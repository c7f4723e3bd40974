"""Near-duplicates (near_duplicates.py, cli_neardup.py) on a real tagged synthetic catalog with re-encoded copies.

The model: a random-init ``small_cnn`` (seed 2, 32 px). Measured on this catalog (24 images, seed 0): the tiny
random-init ``tiny_cnn`` does not separate (distinct images up to 0.998 cosine for some seeds, JPEG copies as low
as 0.975), while this one gives distinct pairs at most ~0.970 and quality-70 copies at least ~0.989: the default
threshold 0.98 sits between them with a margin of ~0.01 on each side.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from catalog_tagger.errors import UserError
from catalog_tagger.near_duplicates import exact_pairs, near_duplicates, summary

pytestmark = pytest.mark.usefixtures("ray_local")

N_COPIES = 4


def _model(tasks_uri: str, out: Path) -> str:
    import torch

    from catalog_tagger.config import load_tasks
    from catalog_tagger.model.artifact import card_for, save_artifact
    from catalog_tagger.model.multihead import build_model

    torch.manual_seed(2)
    model = build_model(backbone="small_cnn", tasks=load_tasks(tasks_uri))
    save_artifact(model, card_for(model, image_size=32), out)
    return str(out)


def _copy(src: str, dst: Path) -> None:
    """Re-encode at JPEG quality 70 under another name, keeping the EXIF (orientation) as a real re-save does."""
    with Image.open(src) as im:
        im.convert("RGB").save(dst, "JPEG", quality=70, exif=im.getexif())


@pytest.fixture(scope="module")
def tagged(catalog_kit, tmp_path_factory):
    from catalog_tagger.tag import job
    from catalog_tagger.tag.config import TagJobConfig

    kit = catalog_kit(images=24, seed=0, min_size=300, max_size=400, name="neardup")
    root = tmp_path_factory.mktemp("neardup-run")
    model = _model(kit["tasks"], root / "model")
    originals = sorted(kit["images"])
    copies = {}
    for i, src in enumerate(originals[:N_COPIES]):
        dst = Path(kit["source"]) / f"zz_copy_{i}.jpg"
        _copy(src, dst)
        copies[str(dst)] = src
    out = str(root / "out")
    result = job.run(TagJobConfig(model=model, source=kit["source"], output=out, executor="local", calibrate=False))
    assert result.manifest is not None and result.ok == 24 + N_COPIES
    return SimpleNamespace(out=out, copies=copies, originals=originals, version=result.manifest["model_version"])


def test_every_copy_pairs_with_its_original_and_no_distinct_images_pair(tagged) -> None:
    table = near_duplicates(tagged.out)
    pairs = {frozenset((r["uri_a"], r["uri_b"])): r for r in table.to_pylist()}
    assert set(pairs) == {frozenset(p) for p in tagged.copies.items()}  # every copy; nothing else
    for r in table.to_pylist():
        assert r["uri_a"] < r["uri_b"] and 0.98 <= r["similarity"] <= 1.0
        assert {"garment_a", "garment_b", "labels_disagree"} <= set(r)
    sims = table.column("similarity").to_pylist()
    assert sims == sorted(sims, reverse=True)
    # a lower threshold finds more pairs (distinct images), so the one above is not trivially satisfied
    assert near_duplicates(tagged.out, threshold=0.5).num_rows > len(tagged.copies)


def test_labels_disagree_is_true_exactly_when_a_label_differs(tagged) -> None:
    table = near_duplicates(tagged.out, threshold=0.5)
    tasks = [c[:-2] for c in table.column_names if c.endswith("_a") and c != "uri_a"]
    assert tasks
    for r in table.to_pylist():
        differ = any(sorted(map(str, r[f"{t}_a"] or [])) != sorted(map(str, r[f"{t}_b"] or []))
                     if isinstance(r[f"{t}_a"], list) else r[f"{t}_a"] != r[f"{t}_b"] for t in tasks)  # fmt: skip
        assert r["labels_disagree"] is differ
    # (a random-init head gives every image the same labels, so the disagreeing case is checked on a table here;
    # a regression task's float is shown on both sides but never compared)
    from catalog_tagger.embeddings import TaskColumn
    from catalog_tagger.near_duplicates import _table

    values = {"a": {"color": "red", "badges": ["x", "y"], "price": 1.0},
              "b": {"color": "red", "badges": ["y", "x"], "price": 2.5},
              "c": {"color": "blue", "badges": [], "price": 1.0}}  # fmt: skip
    tasks = [TaskColumn("color", "multiclass", True), TaskColumn("badges", "multilabel", True),
             TaskColumn("price", "regression", False)]  # fmt: skip
    got = _table([("a", "b", 0.99), ("a", "c", 0.995), ("b", "c", 0.98)], values, tasks).to_pylist()
    assert [(r["uri_a"], r["uri_b"], r["labels_disagree"]) for r in got] == [
        ("a", "c", True), ("a", "b", False), ("b", "c", True)]  # fmt: skip
    assert got[1]["color_a"] == "red" and got[1]["badges_b"] == ["y", "x"] and got[1]["price_b"] == 2.5
    assert {r["group"] for r in got} == {0}  # connected: one group


def test_groups_are_connected_components() -> None:
    from catalog_tagger.near_duplicates import groups

    got = groups([("d", "e", 0.99), ("a", "b", 0.99), ("b", "c", 0.985), ("x", "c", 0.98)])
    assert got["d"] == got["e"] == 0 and got["a"] == got["b"] == got["c"] == got["x"] == 1


def test_index_path_streams_and_finds_the_same_pairs(tagged) -> None:
    """Above ``exact_max`` rows (lowered here) the rows stream batch by batch through the ANN index; without one the
    search is refused with the command to run."""
    import shutil

    from catalog_tagger import ann

    exact = {frozenset((r["uri_a"], r["uri_b"])) for r in near_duplicates(tagged.out).to_pylist()}
    with pytest.raises(UserError, match=r"too many for an exact search .* run `catalog-tagger index --output"):
        near_duplicates(tagged.out, exact_max=4)
    ann.build(tagged.out)
    try:
        table = near_duplicates(tagged.out, exact_max=4)
        assert {frozenset((r["uri_a"], r["uri_b"])) for r in table.to_pylist()} == exact
        assert len(set(table.column("group").to_pylist())) == N_COPIES  # each copy with its own original
        assert all(0.98 <= s <= 1.0 for s in table.column("similarity").to_pylist())
    finally:
        shutil.rmtree(Path(tagged.out) / ann.INDEX_DIR)  # the module's other tests search exactly


def test_exact_pairs_blocks_agree_with_the_full_product() -> None:
    rng = np.random.default_rng(0)
    m = rng.normal(size=(50, 8)).astype(np.float32)
    m[7], m[31] = m[3], m[3] * 2  # twins across blocks
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    full = {(a, b) for a in range(50) for b in range(a + 1, 50) if m[a] @ m[b] >= 0.6}
    blocked = {(a, b) for a, b, _ in exact_pairs(m, 0.6, block=16)}
    assert blocked == full and {(3, 7), (3, 31), (7, 31)} <= blocked


def test_bad_arguments_are_refused(tagged) -> None:
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(UserError, match="--threshold must be in"):
            near_duplicates(tagged.out, threshold=bad)
    with pytest.raises(UserError, match="no committed run of model version 'nope'"):
        near_duplicates(tagged.out, model_version="nope")


def test_report_summary_counts_the_copies(tagged) -> None:
    from catalog_tagger.near_duplicates import near_duplicates_section

    s = summary(tagged.out, None, tagged.version)
    assert s is not None and s.count == N_COPIES and s.method == "exact" and len(s.sample) == N_COPIES
    page = near_duplicates_section(s)
    assert f'data-value="{N_COPIES}"' in page and all(Path(c).name in page for c in tagged.copies)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", "near-duplicates", *args], capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip


def test_cli_formats_and_bad_threshold(tagged) -> None:
    want = {frozenset(p) for p in tagged.copies.items()}
    r = _cli("--output", tagged.out, "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert {frozenset((row["uri_a"], row["uri_b"])) for row in rows} == want
    r = _cli("--output", tagged.out, "--format", "json", "--model-version", tagged.version)
    assert r.returncode == 0, r.stderr
    assert {frozenset((o["uri_a"], o["uri_b"])) for o in map(json.loads, r.stdout.splitlines())} == want
    r = _cli("--output", tagged.out)
    assert r.returncode == 0 and all(Path(c).name in r.stdout for c in tagged.copies), r.stderr
    r = _cli("--output", tagged.out, "--threshold", "2")
    assert r.returncode == 2 and "--threshold must be in" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
