"""`catalog-tagger compare`: two models on one sample of a catalog (statistics on arrays, the sample, the real
command on tiny models made here, its rows read back with DuckDB, the cost estimate from a tagged output, the page
in Chromium)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from modelkit import centred_model

from catalog_tagger.compare_cost import MEASURED_HERE, PER_IMAGES, RECORDED, SCALED, Recorded, estimate, recorded_from
from catalog_tagger.compare_run import CompareConfig, bottom_k, measure, resized, sample_key
from catalog_tagger.config import TaskSpec
from catalog_tagger.model_compare import (
    REGRESSION,
    TaskMatch,
    TaskPair,
    compare_columns,
    match_tasks,
    multiclass_stats,
    multilabel_stats,
    regression_stats,
)
from catalog_tagger.schema import LISTING_SCHEMA
from catalog_tagger.synthetic.catalog import write_bad_images


def _sql(query: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    """A query in real DuckDB, as an analyst would run it on the rows."""
    with duckdb.connect() as con:
        return con.execute(query, params or []).fetchall()


def _cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "catalog_tagger.cli", "compare", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


# --------------------------------------------------------------------------------------------- statistics on arrays
def test_multiclass_agreement_and_confusion() -> None:
    a = ["red", "red", "blue", "blue", "green"]
    b = ["red", "blue", "blue", "blue", "red"]
    s = multiclass_stats(a, b, ["red", "blue", "green"], ["red", "blue", "green"])
    assert s["n"] == 5 and s["agreement"] == pytest.approx(3 / 5) and s["changed"] == 2
    conf = s["confusion"]
    assert conf["labels_a"] == ["red", "blue", "green"] and conf["labels_b"] == ["red", "blue", "green"]
    assert conf["counts"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert sum(map(sum, conf["counts"])) == 5
    # a label only one model knows gets its own row or column
    s = multiclass_stats(["x", "y"], ["x", "z"], ["x", "y"], ["x", "z"])
    assert s["confusion"]["labels_b"] == ["x", "z"] and s["confusion"]["counts"] == [[1, 0], [0, 1]]
    assert multiclass_stats([], [])["agreement"] is None


def test_multilabel_per_label_agreement_and_jaccard() -> None:
    a = [["sale"], ["sale", "logo"], [], []]
    b = [["sale"], ["logo"], [], ["text"]]
    s = multilabel_stats(a, b, ["sale", "logo", "text"], ["sale", "logo", "text"])
    assert s["agreement"] == pytest.approx(2 / 4) and s["changed"] == 2
    assert s["mean_jaccard"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)  # two empty sets agree
    by = {p["label"]: p for p in s["per_label"]}
    assert by["sale"]["agreement"] == pytest.approx(3 / 4) and (by["sale"]["images_a"], by["sale"]["images_b"]) == (
        2,
        1,
    )
    assert by["logo"]["agreement"] == 1.0 and by["text"]["agreement"] == pytest.approx(3 / 4)


def test_regression_error_between_outputs() -> None:
    a = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    b = np.array([1.5, 2.0, 1.0, 4.0], dtype=np.float32)
    s = regression_stats(a, b)
    assert s["n"] == 4 and s["mae"] == pytest.approx((0.5 + 0 + 2 + 0) / 4) and s["max_abs_diff"] == pytest.approx(2)
    assert s["rmse"] == pytest.approx(np.sqrt((0.25 + 4) / 4)) and s["changed"] == 2
    assert (s["mean_a"], s["mean_b"]) == (pytest.approx(2.5), pytest.approx(2.125))
    same = regression_stats(a, a)
    assert same["mae"] == 0 and same["max_abs_diff"] == 0 and same["changed"] == 0
    nan = regression_stats(np.array([1.0, np.nan]), np.array([2.0, 0.0]))
    assert nan["n"] == 1 and nan["non_finite"] == 1 and nan["mae"] == 1.0
    assert regression_stats(np.array([]), np.array([]))["mae"] is None
    with pytest.raises(ValueError, match="different lengths"):
        regression_stats(np.zeros(2), np.zeros(3))


def test_regression_task_rows_and_stats_through_compare_columns() -> None:
    """A ``kind: regression`` task: a float column ``<task>``; rows list the images whose value moved."""
    match = TaskMatch(shared=[TaskPair("price", REGRESSION, (), ())])
    uris = ["u0", "u1", "u2"]
    a = {"price": np.array([10.0, 20.0, 30.0], dtype=np.float32)}
    b = {"price": np.array([10.0, 25.0, 29.0], dtype=np.float32)}
    got = compare_columns(match, uris, a, b)
    assert got.tasks[0]["task"] == "price" and got.tasks[0]["mae"] == pytest.approx(2.0)
    assert got.tasks[0]["max_abs_diff"] == pytest.approx(5.0)
    rows = got.changes.to_pylist()
    assert [r["uri"] for r in rows] == ["u1", "u2"] and all(r["label_a"] is None for r in rows)
    assert (rows[0]["score_a"], rows[0]["score_b"]) == (20.0, 25.0)
    assert got.confusion.num_rows == 0
    assert compare_columns(match, uris, a, a).changes.num_rows == 0


def test_match_tasks_lists_what_is_not_shared() -> None:
    def t(name: str, kind: str = "multiclass") -> TaskSpec:
        labels = ("x", "y") if kind != "regression" else ()
        return TaskSpec.model_validate({"name": name, "kind": kind, "labels": labels})

    m = match_tasks([t("color"), t("style", "multilabel"), t("old")], [t("new"), t("style"), t("color")])
    assert [p.name for p in m.shared] == ["color"]
    assert m.only_a == ["old"] and m.only_b == ["new"]
    assert m.kind_differs == [{"task": "style", "kind_a": "multilabel", "kind_b": "multiclass"}]


# --------------------------------------------------------------------------------------------- the sample
def _listing(uris: list[str]) -> pa.RecordBatch:
    n = len(uris)
    return pa.RecordBatch.from_pydict({"uri": uris, "size": [None] * n, "etag": [None] * n, "mtime": [None] * n},
                                      schema=LISTING_SCHEMA)  # fmt: skip


def test_sample_is_seeded_uniform_and_ignores_listing_order() -> None:
    uris = [f"s3://b/img{i:04d}.jpg" for i in range(500)]
    one, rows = bottom_k(iter([_listing(uris[:200]), _listing(uris[200:])]), 50, seed=3)
    rev, _ = bottom_k(iter([_listing(uris[::-1])]), 50, seed=3)
    assert rows == 500 and one.num_rows == 50
    assert one.column("uri").to_pylist() == rev.column("uri").to_pylist()  # the same images, in key order
    expected = sorted(uris, key=lambda u: sample_key(u, 3))[:50]
    assert one.column("uri").to_pylist() == expected
    other, _ = bottom_k(iter([_listing(uris)]), 50, seed=4)
    assert set(other.column("uri").to_pylist()) != set(expected)  # another seed, another sample
    dup, rows = bottom_k(iter([_listing(uris[:5] * 3)]), 10, seed=0)  # a uri listed thrice counts once
    assert rows == 15 and sorted(dup.column("uri").to_pylist()) == sorted(uris[:5])
    # uniform: over 20 seeds each of 10 buckets of the listing gets about its share of a 10% sample
    hits = np.zeros(10)
    for seed in range(20):
        got, _ = bottom_k(iter([_listing(uris)]), 50, seed=seed)
        for u in got.column("uri").to_pylist():
            hits[int(u[-8:-4]) // 50] += 1
    assert hits.sum() == 1000 and hits.min() > 60 and hits.max() < 140


def test_resized_keeps_shape_and_identity() -> None:
    x = np.random.default_rng(0).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    assert resized(x, 48) is x
    y = resized(x, 32)
    assert y.shape == (3, 32, 32, 3) and y.dtype == np.uint8
    assert abs(float(y.mean()) - float(x.mean())) < 3


# --------------------------------------------------------------------------------------------- the cost estimate
TIMING = {
    "device": "cpu",
    "threads": 2,
    "batch": 32,
    "rounds": 21,
    "a_s_per_image": 0.01,
    "b_s_per_image": 0.02,
    "b_s_per_image_low": 0.018,
    "b_s_per_image_high": 0.025,
    "ratio": 2.0,
    "ratio_low": 1.8,
    "ratio_high": 2.2,
}


def _recorded(version: str, *, price: float | None = None, device: str = "cuda") -> Recorded:
    return Recorded(
        output="/out",
        images=1000,
        model_version=version,
        runs=2,
        busy_s_per_image=0.004,
        allocated_s_per_image=0.010,
        device=device,
        price_per_hour=price,
        price_unit="GPU-hour",
    )


def test_cost_scaled_from_the_output_tagged_with_a() -> None:
    est = estimate(_recorded("A", price=3.0), TIMING, version_a="A", version_b="B")
    assert est["method"] == SCALED and est["images"] == 1000
    assert est["b_busy_s_per_image"] == pytest.approx(0.008)  # A's recorded 4 ms x B/A 2.0
    assert (est["busy_s_low"], est["busy_s"], est["busy_s_high"]) == pytest.approx((7.2, 8.0, 8.8))
    assert est["allocated_s"] == pytest.approx(8.0 + 0.006 * 1000)  # the recorded idle time per image kept
    assert est["cost"] == pytest.approx(8.0 / 3600 * 3.0) and est["price_per_hour"] == 3.0
    assert "tagged with A" in est["how"] and "interleaved" in est["how"]


def test_cost_recorded_measured_here_and_per_million() -> None:
    rec = estimate(_recorded("B"), TIMING, version_a="A", version_b="B", price_per_hour=1.0)
    assert rec["method"] == RECORDED and rec["busy_s"] == pytest.approx(4.0) and rec["price_per_hour"] == 1.0
    other = estimate(_recorded("C", device="cpu"), TIMING, version_a="A", version_b="B")
    assert other["method"] == MEASURED_HERE and other["busy_s"] == pytest.approx(20.0)
    assert other["cost"] is None and "neither A nor B" in other["how"]  # a CPU run without a price: not priced
    per = estimate(None, {**TIMING, "device": "cuda:H200"}, version_a="A", version_b="B")
    assert per["images"] == PER_IMAGES and per["busy_s"] == pytest.approx(0.02 * PER_IMAGES)
    assert per["cost"] == pytest.approx(0.02 * PER_IMAGES / 3600 * 2.50)  # the default GPU price
    none = estimate(None, None, version_a="A", version_b="B")
    assert none["busy_s"] is None and none["cost"] is None


def test_recorded_figures_come_from_the_latest_models_runs() -> None:
    runs = [
        {"model_version": "A", "savings": {"images": 100, "multi_head_accel_s": 1.0, "allocated_accel_s": 3.0}},
        {
            "model_version": "B",
            "savings": {
                "images": 50,
                "multi_head_accel_s": 5.0,
                "allocated_accel_s": 6.0,
                "device": "cpu",
                "price_per_hour": None,
            },
        },
        {
            "model_version": "B",
            "savings": {
                "images": 150,
                "multi_head_accel_s": 3.0,
                "allocated_accel_s": None,
                "device": "cuda",
                "price_per_hour": 2.5,
                "price_unit": "GPU-hour",
            },
        },
    ]
    rec = recorded_from("/out", runs, images=180)
    assert rec.model_version == "B" and rec.runs == 2 and rec.images == 180
    assert rec.busy_s_per_image == pytest.approx(8.0 / 200)
    assert rec.allocated_s_per_image == pytest.approx(6.0 / 50)  # only the runs that recorded it
    assert (rec.device, rec.price_per_hour) == ("cuda", 2.5)


# --------------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def pair(catalog_kit, tmp_path_factory) -> dict[str, Any]:
    """A catalog of 12 small images and two different models for it (heads centred: labels vary by image)."""
    kit = catalog_kit(images=12, name="compare", min_size=64, max_size=96)
    root = tmp_path_factory.mktemp("compare-models")
    a = centred_model(kit["tasks"], kit["images"], root / "a", seed=1)
    b = centred_model(kit["tasks"], kit["images"], root / "b", seed=2)
    return {**kit, "a": a, "b": b, "root": root}


@pytest.mark.slow
def test_a_model_against_itself_agrees_everywhere(pair, tmp_path) -> None:
    rows = tmp_path / "rows"
    r = _cli("--model", pair["a"], "--model", pair["a"], "--source", pair["source"], "--out", str(rows))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "# agreement per task (A vs B)" in r.stdout
    doc = json.loads((rows / "comparison.json").read_text())
    assert doc["sample"]["compared"] == 12 and [t["agreement"] for t in doc["tasks"]] == [1.0] * len(doc["tasks"])
    assert doc["changed_rows"] == 0
    assert _sql(f"SELECT count(*) FROM '{rows / 'changes.parquet'}'") == [(0,)]
    for t in doc["tasks"]:
        if t["kind"] == "multiclass":  # everything on the diagonal
            counts = np.array(t["confusion"]["counts"])
            assert counts.sum() == 12 and np.trace(counts) == 12


@pytest.mark.slow
def test_two_models_confusion_rows_in_duckdb_and_the_page(pair, tmp_path) -> None:
    rows, page = tmp_path / "rows", tmp_path / "cmp.html"
    args = ["--model", pair["a"], "--model", pair["b"], "--source", pair["source"], "--sample", "9", "--seed", "5"]
    r = _cli(*args, "--out", str(rows), "--format", "json", "--html", str(page))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc == json.loads((rows / "comparison.json").read_text())
    assert doc["sample"]["sampled"] == 9 and doc["sample"]["compared"] == 9 and doc["sample"]["errors"] == 0
    changes = str(rows / "changes.parquet")
    by_task = dict(_sql(f"SELECT task, count(*) FROM '{changes}' GROUP BY task"))
    assert sum(by_task.values()) == doc["changed_rows"] > 0
    for t in doc["tasks"]:
        assert by_task.get(t["task"], 0) == t["changed"]
        if t["kind"] == "multiclass":
            counts = np.array(t["confusion"]["counts"])
            assert counts.sum() == 9  # every compared image once
            off = counts.sum() - sum(counts[i, j] for i, la in enumerate(t["confusion"]["labels_a"])
                                     for j, lb in enumerate(t["confusion"]["labels_b"]) if la == lb)  # fmt: skip
            assert off == t["changed"] and t["agreement"] == pytest.approx(1 - off / 9)
            changed = _sql(
                f"SELECT count(*) FROM '{changes}' WHERE task = ? AND label_a <> label_b AND score_a > 0", [t["task"]]
            )
            assert changed == [(t["changed"],)]
            query = f"SELECT label_a, label_b, images FROM '{rows / 'confusion.parquet'}' WHERE task = ?"
            conf = {(la, lb): n for la, lb, n in _sql(query, [t["task"]])}
            assert conf == {
                (la, lb): n
                for la, row in zip(t["confusion"]["labels_a"], counts.tolist(), strict=True)
                for lb, n in zip(t["confusion"]["labels_b"], row, strict=True)
                if n
            }
            assert sum(conf.values()) == 9
    # the same sample again: the seed names the images
    again = _cli(*args, "--format", "json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["tasks"] == doc["tasks"]
    html = page.read_text()
    assert html.count('class="confusion-task"') == sum(t["kind"] == "multiclass" for t in doc["tasks"])
    assert "<script>" not in html  # a page of data: nothing runs
    # a saved comparison renders again without models, the same figures
    r = _cli("--from-json", str(rows / "comparison.json"), "--format", "csv")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith('"task","kind","n","agreement"') and len(lines) == 1 + len(doc["tasks"])


@pytest.mark.slow
def test_bad_images_are_reported_and_skipped(pair, tmp_path) -> None:
    src = tmp_path / "src"
    expected = write_bad_images(src)
    cfg = CompareConfig(model_a=pair["a"], model_b=pair["b"], source=str(src), timing_rounds=3, batch_size=4)
    m = measure(cfg)
    bad = sorted(k for k, v in expected.items() if v == "error")
    assert m.sample["errors"] == len(bad) and m.sample["compared"] == len(expected) - len(bad)
    assert sorted(Path(e["uri"]).name for e in m.sample["error_examples"]) == bad
    assert all(e["error"].startswith(("read:", "decode:")) for e in m.sample["error_examples"])


@pytest.mark.slow
def test_one_line_errors_exit_2(pair, tiny_model_factory, tmp_path) -> None:
    r = _cli("--model", pair["a"], "--model", str(tmp_path / "nope"), "--source", pair["source"])
    assert r.returncode == 2 and "not a model artifact" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    tasks = tmp_path / "other.yaml"
    tasks.write_text("tasks:\n  - name: mood\n    kind: multiclass\n    labels: [calm, busy]\n")
    other = tiny_model_factory(str(tasks))
    r = _cli("--model", pair["a"], "--model", other, "--source", pair["source"])
    assert r.returncode == 2 and "share no task" in r.stderr and "mood" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = _cli("--model", pair["a"], "--source", pair["source"])
    assert r.returncode == 2 and "--model twice" in r.stderr
    junk = tmp_path / "junk"  # every sampled image unreadable: nothing to compare is an error, not empty figures
    junk.mkdir()
    (junk / "a.jpg").write_bytes(b"not a jpeg")
    (junk / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 20)
    r = _cli("--model", pair["a"], "--model", pair["b"], "--source", str(junk))
    last = r.stderr.strip().splitlines()[-1]  # after the sampling's progress line: one error line
    assert r.returncode == 2 and "nothing to compare: 2 image(s) listed" in last and "2 unreadable" in last
    assert last.startswith("error:") and "Traceback" not in r.stderr


@pytest.mark.slow
def test_cost_of_a_full_retag_from_a_tagged_output(pair, tmp_path) -> None:
    from catalog_tagger.tag.job import TagJobConfig, run

    out = str(tmp_path / "out")
    res = run(TagJobConfig(model=pair["a"], source=pair["source"], output=out, executor="local", batch_size=8,
                           price_per_cpu_hour=0.04))  # fmt: skip
    savings = res.manifest["savings"]
    r = _cli("--model", pair["a"], "--model", pair["b"], "--source", pair["source"], "--output", out,
             "--format", "json", "--sample", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    cost, timing = doc["cost"], doc["timing"]
    assert cost["method"] == SCALED and cost["images"] == 12 == res.manifest["counts"]["ok"]
    per_a = savings["multi_head_accel_s"] / savings["images"]
    assert cost["b_busy_s_per_image"] == pytest.approx(per_a * timing["ratio"])
    assert cost["busy_s"] == pytest.approx(per_a * timing["ratio"] * 12)
    assert cost["price_per_hour"] == pytest.approx(savings["price_per_hour"])
    assert cost["cost"] == pytest.approx(cost["busy_s"] / 3600 * savings["price_per_hour"])
    # the models swapped: the output's model is now the candidate B, whose recorded time is used as is
    r = _cli("--model", pair["b"], "--model", pair["a"], "--source", pair["source"], "--output", out,
             "--format", "json", "--sample", "4")  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["cost"]["method"] == RECORDED
    assert json.loads(r.stdout)["cost"]["busy_s"] == pytest.approx(per_a * 12)
    # no output: the per-1M estimate, said so
    r = _cli("--model", pair["a"], "--model", pair["b"], "--source", pair["source"], "--sample", "4")
    assert r.returncode == 0 and "per 1,000,000 images" in r.stdout and "measured here" in r.stdout


@pytest.mark.integration
def test_comparison_page_in_chromium(pair, tmp_path, chromium_path) -> None:
    from playwright.sync_api import sync_playwright

    from catalog_tagger.compare_cost import estimate
    from catalog_tagger.compare_run import comparison_json
    from catalog_tagger.report_compare import write_compare_html

    m = measure(CompareConfig(model_a=pair["a"], model_b=pair["b"], source=pair["source"], timing_rounds=3))
    doc = comparison_json(m, pair["source"], estimate(None, m.timing, version_a="a", version_b="b"))
    page_file = tmp_path / "cmp.html"
    write_compare_html(doc, str(page_file))
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=["--headless=new", "--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.goto(page_file.as_uri())
            shown = page.eval_on_selector_all(
                "#agreement tr[data-task]",
                "trs => trs.map(t => [t.dataset.task, JSON.parse(t.querySelector('[data-agreement]').dataset.agreement)"
                "])",
            )
            assert shown == [[t["task"], t["agreement"]] for t in doc["tasks"]]
            for t in doc["tasks"]:
                if t["kind"] != "multiclass":
                    continue
                cells = page.eval_on_selector_all(
                    f".confusion-task[data-task='{t['task']}'] td[data-count]",
                    "tds => tds.map(td => Number(td.dataset.count))",
                )
                assert sum(cells) == doc["sample"]["compared"]
            assert page.locator("#details li").count() >= 5
        finally:
            browser.close()
    assert problems == []


@pytest.mark.slow
def test_regression_task_end_to_end(pair, tiny_model_factory, tmp_path) -> None:
    """Two models with a ``kind: regression`` head: the error between their values, rows per moved value."""
    tasks = tmp_path / "reg.yaml"
    tasks.write_text(
        "tasks:\n  - name: garment\n    kind: multiclass\n    labels: [tshirt, dress]\n"
        "  - name: brightness\n    kind: regression\n"
    )
    a, b = tiny_model_factory(str(tasks), seed=0), tiny_model_factory(str(tasks), seed=1)
    m = measure(CompareConfig(model_a=a, model_b=b, source=pair["source"], sample=6, timing_rounds=3))
    reg = next(t for t in m.compared.tasks if t["task"] == "brightness")
    assert reg["kind"] == "regression" and reg["n"] == 6 and reg["mae"] > 0
    assert reg["max_abs_diff"] >= reg["mae"]
    rows = [r for r in m.compared.changes.to_pylist() if r["task"] == "brightness"]
    assert len(rows) == reg["changed"] and all(r["label_a"] is None and r["score_a"] is not None for r in rows)
    same = measure(CompareConfig(model_a=a, model_b=a, source=pair["source"], sample=6, timing_rounds=3))
    reg = next(t for t in same.compared.tasks if t["task"] == "brightness")
    assert reg["mae"] == 0 and reg["changed"] == 0 and same.compared.changes.num_rows == 0
