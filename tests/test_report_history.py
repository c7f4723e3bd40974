"""The report's history section: its figures checked against the run manifests and the committed rows, and the
page driven in real Chromium."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from modelkit import centred_model, committed_rows

from catalog_tagger.query import open_catalog
from catalog_tagger.report import gather, render_report, write_report
from catalog_tagger.report_history import LOW_CONFIDENCE, run_points, task_history
from catalog_tagger.synthetic.catalog import SynthConfig, generate, write_bad_images
from catalog_tagger.tag.job import TagJobConfig, run
from catalog_tagger.tag.profile import NO_LABEL

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
BROWSER_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """Three committed runs of one output: 12 images (not priced), 8 more plus awkward files (some errors, priced),
    5 more (priced at another rate)."""
    root = tmp_path_factory.mktemp("history")
    images = root / "cat" / "images"
    synth = generate(SynthConfig(out=str(root / "cat"), images=12, seed=3, min_size=200, max_size=260))
    model = centred_model(synth.tasks_uri, synth.images, root / "model")
    out = root / "out"
    base = {"model": model, "source": str(images), "output": str(out), "batch_size": 8, "executor": "local"}
    manifests = [run(TagJobConfig(**base, price_per_cpu_hour=None)).manifest]
    generate(SynthConfig(out=str(root / "cat"), images=8, seed=3, start=12, min_size=200, max_size=260))
    expected = write_bad_images(images / "awkward")
    manifests.append(run(TagJobConfig(**base, price_per_cpu_hour=0.5)).manifest)
    generate(SynthConfig(out=str(root / "cat"), images=5, seed=3, start=20, min_size=200, max_size=260))
    manifests.append(run(TagJobConfig(**base, price_per_cpu_hour=2.0)).manifest)
    return SimpleNamespace(out=str(out), manifests=manifests, rows=committed_rows(out).to_pylist(), bad=expected)


def _confidence(task: str, row: dict) -> float | None:
    """A row's confidence, in Python: the multiclass label's score; the highest multilabel label probability."""
    if task == "badges":
        return max(row["badges_scores"], default=None)
    return row[f"{task}_score"]


def _labels(task: str, row: dict) -> list[str]:
    if task == "badges":
        return row["badges"] or [NO_LABEL]
    return [row[task]]


def _expected_tasks(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """task -> run id -> {counts, rows, low} over the ok rows, computed here without SQL."""
    out: dict[str, dict[str, dict]] = defaultdict(dict)
    for task in ("garment", "color", "pattern", "badges"):
        by_run = defaultdict(list)
        for r in rows:
            if r["status"] == "ok":
                by_run[r["run_id"]].append(r)
        for rid, rs in by_run.items():
            labels = Counter(lb for r in rs for lb in _labels(task, r))
            conf = [c for r in rs if (c := _confidence(task, r)) is not None]
            low = sum(c < LOW_CONFIDENCE for c in conf) / len(conf) if conf else None
            out[task][rid] = {"counts": dict(labels), "rows": len(rs), "low": low}
    return out


def test_three_runs_were_made(three_runs):
    ms = three_runs.manifests
    assert len({m["run_id"] for m in ms}) == 3
    assert [m["counts"]["error"] > 0 for m in ms] == [False, True, False]
    assert ms[1]["counts"]["error"] == sum(v == "error" for v in three_runs.bad.values())
    assert [m["savings"]["cost_saved"] is None for m in ms] == [True, False, False]


def test_run_points_are_the_manifests(three_runs):
    data = gather(three_runs.out, sample=0)
    h = data.history
    assert h is not None and h.committed == 3 and h.limit == 60
    ms = three_runs.manifests
    assert [p.run_id for p in h.runs] == [m["run_id"] for m in ms]  # oldest first
    cum_h, cum_cost = 0.0, None
    for p, m in zip(h.runs, ms, strict=True):
        s = m["savings"]
        assert (p.ok, p.error, p.wall_s) == (m["counts"]["ok"], m["counts"]["error"], m["timings"]["wall_s"])
        assert p.error_rate == m["counts"]["error"] / (m["counts"]["ok"] + m["counts"]["error"])
        assert (p.accel_hours_saved, p.cost_saved) == (s["accel_hours_saved"], s["cost_saved"])
        cum_h += s["accel_hours_saved"]
        if s["cost_saved"] is not None:
            cum_cost = (cum_cost or 0.0) + s["cost_saved"]
        assert p.cum_accel_hours_saved == pytest.approx(cum_h) and p.cum_cost_saved == pytest.approx(cum_cost)
    assert h.runs[0].cum_cost_saved is None  # the first run was not priced: nothing saved in money yet


def test_history_is_bounded_and_stops_at_the_reported_run(three_runs):
    ms = three_runs.manifests
    h = gather(three_runs.out, ms[1]["run_id"], sample=0, history_runs=1).history
    assert h is not None and [p.run_id for p in h.runs] == [ms[1]["run_id"]] and h.committed == 2
    # the running totals still count every committed run before the shown ones
    assert h.runs[0].cum_accel_hours_saved == pytest.approx(ms[0]["savings"]["accel_hours_saved"] +
                                                            ms[1]["savings"]["accel_hours_saved"])  # fmt: skip
    assert all(set(t.counts) == {ms[1]["run_id"]} for t in h.tasks)
    assert gather(three_runs.out, sample=0, history_runs=0).history is None
    assert 'id="history"' not in render_report(three_runs.out, sample=0, history_runs=0)


def test_labels_and_confidence_from_rows_equal_the_rows(three_runs):
    """Manifests without a profile (outputs written before profiles): one grouped query per task reads the rows."""
    cat = open_catalog(three_runs.out)
    try:
        bare = [{k: v for k, v in m.items() if k != "profile"} for m in cat.manifests]
        cat = dataclasses.replace(cat, manifests=bare)
        tasks = gather(three_runs.out, sample=0, history_runs=0).tasks
        expected = _expected_tasks(three_runs.rows)
        for task in tasks:
            th = task_history(cat, bare, task, LOW_CONFIDENCE)
            assert set(th.source.values()) == {"rows"}
            for rid, want in expected[task.name].items():
                assert th.counts[rid] == want["counts"], (task.name, rid)
                assert th.rows[rid] == want["rows"]
                assert th.low_share[rid] == pytest.approx(want["low"])
            assert th.labels[: len(task.labels)] == task.labels
    finally:
        cat.con.close()


def test_profiles_and_rows_agree(three_runs):
    """Runs tagged now carry a profile; reading the same runs' rows (as for older outputs) gives the same figures."""
    cat = open_catalog(three_runs.out)
    try:
        assert all(m.get("profile") for m in cat.manifests)
        bare = [{k: v for k, v in m.items() if k != "profile"} for m in cat.manifests]
        for task in gather(three_runs.out, sample=0, history_runs=0).tasks:
            a = task_history(cat, cat.manifests, task, LOW_CONFIDENCE)
            b = task_history(cat, bare, task, LOW_CONFIDENCE)
            assert set(a.source.values()) == {"profile"} and set(b.source.values()) == {"rows"}
            assert (a.counts, a.rows, a.labels) == (b.counts, b.rows, b.labels), task.name
            assert a.low_share == pytest.approx(b.low_share) and a.mean_confidence == pytest.approx(b.mean_confidence)
    finally:
        cat.con.close()


def test_a_profile_is_used_when_the_manifest_has_one(three_runs):
    cat = open_catalog(three_runs.out)
    try:
        task = next(t for t in gather(three_runs.out, sample=0, history_runs=0).tasks if t.name == "garment")
        rid = cat.manifests[0]["run_id"]
        fake = {"kind": "multiclass", "rows": 7, "labels": {"coat": 7}, "mean_confidence": 0.9,
                "low_confidence_share": 0.25}  # fmt: skip
        ms = [{**m, "profile": {"tasks": {"garment": fake}}} if m["run_id"] == rid else m for m in cat.manifests]
        ms = [ms[0], *({k: v for k, v in m.items() if k != "profile"} for m in ms[1:])]
        th = task_history(cat, ms, task, LOW_CONFIDENCE)
        assert th.source[rid] == "profile" and th.counts[rid] == {"coat": 7} and th.low_share[rid] == 0.25
        assert {th.source[m["run_id"]] for m in ms[1:]} == {"rows"}
    finally:
        cat.con.close()


def test_older_manifests_without_savings_or_timings_do_not_crash():
    points = run_points([{"run_id": "a"}, {"run_id": "b", "counts": {"ok": 0, "error": 0}, "savings": {}}])
    assert [(p.ok, p.error_rate, p.cum_accel_hours_saved, p.cum_cost_saved) for p in points] == [
        (0, None, None, None),
        (0, None, None, None),
    ]


def _marks(page) -> list[dict]:
    return page.eval_on_selector_all("#history .mark", "els => els.map(e => Object.assign({}, e.dataset))")


@pytest.mark.slow
@pytest.mark.integration
def test_history_in_chromium(three_runs, chromium_path, tmp_path):
    from playwright.sync_api import sync_playwright

    html_path = Path(write_report(three_runs.out, out=str(tmp_path / "r.html"), sample=4))
    ms = {m["run_id"]: m for m in three_runs.manifests}
    problems: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda msg: problems.append(msg.text) if msg.type in ("error", "warning") else None)
            page.on("pageerror", lambda err: problems.append(f"pageerror: {err}"))
            page.on("request", lambda req: requests.append(req.url))
            page.goto(html_path.as_uri())
            assert page.is_visible("#history") and page.get_attribute("#history", "data-runs") == "3"
            assert page.eval_on_selector_all("#history svg", "s => s.length") >= 6 + 4  # run charts + 4 tasks
            marks = _marks(page)
            got = {(m["metric"], m["runId"], m.get("task"), m.get("label")): json.loads(m["value"]) for m in marks}
            cum_h, cum_cost = 0.0, None
            for rid, m in ms.items():
                c, s = m["counts"], m["savings"]
                assert got["ok", rid, None, None] == c["ok"] and got["error", rid, None, None] == c["error"]
                assert got["error_rate", rid, None, None] == c["error"] / (c["ok"] + c["error"])
                assert got["wall_s", rid, None, None] == m["timings"]["wall_s"]
                assert got["accel_hours_saved", rid, None, None] == s["accel_hours_saved"]
                assert got["cost_saved", rid, None, None] == s["cost_saved"]  # None (null): not priced
                cum_h += s["accel_hours_saved"]
                cum_cost = cum_cost if s["cost_saved"] is None else (cum_cost or 0.0) + s["cost_saved"]
                assert got["cum_accel_hours_saved", rid, None, None] == pytest.approx(cum_h)
                assert got["cum_cost_saved", rid, None, None] == pytest.approx(cum_cost)
            for task, per_run in _expected_tasks(three_runs.rows).items():
                for rid, want in per_run.items():
                    drawn = {k[3]: v for k, v in got.items() if k[:3] == ("label_count", rid, task)}
                    assert {k: v for k, v in drawn.items() if v} == want["counts"], (task, rid)
                    assert got["low_confidence_share", rid, task, None] == pytest.approx(want["low"])
            table = page.eval_on_selector_all("table.history tbody tr", "trs => trs.map(t => t.cells[1].textContent)")
            assert table == list(reversed(ms))  # newest first
            ARTIFACTS.mkdir(exist_ok=True)
            page.locator("#history").screenshot(path=str(ARTIFACTS / "report_history.png"))
        finally:
            browser.close()
    assert problems == []
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
    shutil.copy(html_path, ARTIFACTS / "report_history.html")
