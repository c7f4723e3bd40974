"""The HTML run report: content checked against the manifest and the rows, and the page driven in real Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import savingskit
from modelkit import centred_model, committed_rows

from catalog_tagger.figures import (
    SAVINGS_FIELDS,
    SAVINGS_RECORDS,
    duration,
    hours,
    money,
    savings_keys,
    savings_rows,
)
from catalog_tagger.report import render_report, write_report
from catalog_tagger.synthetic.catalog import SynthConfig, generate
from catalog_tagger.tag.job import TagJobConfig, run

pytestmark = pytest.mark.usefixtures("ray_local")

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
WEIRD = "we<ird> \"näme\" & 'x'.jpg"  # a file name that must be escaped everywhere it appears
BROWSER_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    cat = generate(SynthConfig(out=str(root / "cat"), images=30, seed=1, min_size=300, max_size=400))
    images = root / "cat" / "images"
    (images / "bad.jpg").write_bytes(b"garbage")
    shutil.copy(cat.images[0], images / WEIRD)
    model = centred_model(cat.tasks_uri, cat.images, root / "model")
    out = root / "out"
    res = run(TagJobConfig(model=model, source=str(images), output=str(out), batch_size=16))
    rows = committed_rows(out)
    html_path = Path(write_report(str(out)))
    return SimpleNamespace(root=root, out=str(out), manifest=res.manifest, rows=rows, html=html_path)


def ok_rows(tagged) -> list[dict]:
    return [r for r in tagged.rows.to_pylist() if r["status"] == "ok"]


def test_report_is_one_escaped_self_contained_page(tagged):
    page = tagged.html.read_text("utf-8")
    assert tagged.html == Path(tagged.out) / "reports" / f"{tagged.manifest['run_id']}.html"
    assert render_report(tagged.out, tagged.manifest["run_id"]).count('class="card"') == page.count('class="card"')
    # nothing to fetch: no external scripts, styles or images
    for needle in ("http://", "https://", "<script src", '<link rel="stylesheet"', "@import"):
        assert needle not in page
    assert page.count('src="data:image/jpeg;base64,') == len(ok_rows(tagged))  # sample (48) > ok rows: all shown
    # the odd file name appears only escaped
    assert "we<ird>" not in page and "we&lt;ird&gt; &quot;näme&quot; &amp; &#x27;x&#x27;.jpg" in page
    for field in ("run_id", "model_version", "run_date"):
        assert tagged.manifest[field] in page


def test_savings_labels_say_how_it_was_measured(tagged):
    items = {key: (label, shown) for key, label, shown, _ in savings_rows(tagged.manifest["savings"])}
    assert "measured" in items["multi_head_accel_s"][0] and "busy" in items["multi_head_accel_s"][0]
    assert items["method"][1].startswith("calibrated: the shared backbone timed")
    assert items["images"][1] == str(len(ok_rows(tagged)))
    assert set(items) >= {"accel_hours_saved", "fraction_saved", "cost_saved", "decode_cpu_s_saved", "method"}
    assert set(items) >= {"allocated_accel_s", "allocated_hours_saved", "allocated_fraction_saved"}


def test_every_savings_number_has_one_label() -> None:
    """The console, this page and the Prefect artifact all label the savings from SAVINGS_FIELDS: none is missing."""
    savings = savingskit.savings(tasks=2)
    keys = [f.key for f in SAVINGS_FIELDS]
    assert sorted(savings_keys()) == sorted(k for k in savings if k not in SAVINGS_RECORDS)
    assert len(set(keys)) == len(keys)
    assert [row[0] for row in savings_rows(savings, details=True)] == keys


@pytest.mark.parametrize(
    ("show", "value", "text"),
    [
        (duration, 0.0123, "12.3 ms"), (duration, 4.25, "4.2 s"), (duration, 150, "2.5 min"),
        (duration, 7200, "2.0 h"), (hours, 1.03e-05, "37.1 ms"), (money, 5.88e-05, "$0.000059"),
        (money, 0.004, "$0.0040"), (money, 1234.5, "$1,234.50"), (money, 0.0, "$0.00"),
    ],
)  # fmt: skip
def test_human_units(show, value, text) -> None:
    assert show(value) == text


def test_cli_report_paths_and_unknown_run(tagged, tmp_path):
    target = tmp_path / "r.html"
    cmd = [sys.executable, "-m", "catalog_tagger.cli", "report", "--output", tagged.out]
    r = subprocess.run([*cmd, "--out", str(target), "--sample", "4"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(target) and target.read_text().count('class="card"') == 4
    r = subprocess.run([*cmd, "--run-id", "nope"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not committed" in r.stderr


@pytest.mark.integration
def test_report_in_chromium(tagged, chromium_path):
    from playwright.sync_api import sync_playwright

    m = tagged.manifest
    rows = ok_rows(tagged)
    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None,
            )
            page.on("pageerror", lambda err: problems.append(f"pageerror: {err}"))
            page.on("requestfailed", lambda req: problems.append(f"request failed: {req.url}"))
            page.goto(tagged.html.as_uri())
            page.wait_for_function("Array.from(document.images).every(i => i.complete)")

            # the gallery shows decoded images
            widths = page.eval_on_selector_all(".gallery img", "imgs => imgs.map(i => i.naturalWidth)")
            assert len(widths) == len(rows) and all(w > 0 for w in widths)

            # savings and throughput numbers are the manifest's
            shown = page.eval_on_selector_all(
                "[data-savings-key]", "tds => tds.map(td => [td.dataset.savingsKey, td.dataset.value, td.textContent])"
            )
            assert {k for k, _, _ in shown} >= {"images", "multi_head_accel_s", "single_task_accel_s",
                                                 "accel_hours_saved", "fraction_saved", "cost_saved",
                                                 "allocated_accel_s", "allocated_fraction_saved",
                                                 "decode_cpu_s_saved", "method"}  # fmt: skip
            for key, raw, _ in shown:
                assert json.loads(raw) == m["savings"][key], key
            texts = {k: t for k, _, t in shown}
            assert texts["images"] == f"{m['savings']['images']:,}"
            assert texts["fraction_saved"].startswith(f"{m['savings']['fraction_saved']:.1%}")
            tp = dict(
                page.eval_on_selector_all(
                    "[data-throughput-key]", "tds => tds.map(td => [td.dataset.throughputKey, td.dataset.value])"
                )
            )
            assert json.loads(tp["ok"]) == m["counts"]["ok"] == len(rows)
            assert json.loads(tp["error"]) == m["counts"]["error"] == 1
            assert json.loads(tp["images_per_s"]) == m["timings"]["images_per_s"]

            # label charts count what the rows say
            bars = page.eval_on_selector_all(
                ".chart .bar-row",
                "gs => gs.map(g => [g.closest('.chart').dataset.task, g.dataset.label, Number(g.dataset.count)])",
            )
            garment = Counter(r["garment"] for r in rows)
            badges = Counter(b for r in rows for b in r["badges"])
            for task, label, n in bars:
                if task == "garment":
                    assert n == garment[label], label
                if task == "badges" and label != "(no label)":
                    assert n == badges[label], label

            # filters: visible cards are exactly the rows with that tag
            def visible() -> set[str]:
                return set(
                    page.eval_on_selector_all(
                        ".gallery .card", "cs => cs.filter(c => c.offsetParent !== null).map(c => c.dataset.uri)"
                    )
                )

            assert visible() == {r["uri"] for r in rows}
            label = next(lb for lb, n in garment.most_common() if 0 < n < len(rows))
            page.select_option("#filter-task", "garment")
            page.select_option("#filter-label", label)
            assert visible() == {r["uri"] for r in rows if r["garment"] == label}
            assert page.text_content("#filter-count") == f"{garment[label]} of {len(rows)} shown"
            badge = next(b for b, n in badges.most_common() if 0 < n < len(rows))
            page.select_option("#filter-task", "badges")
            page.select_option("#filter-label", badge)
            assert visible() == {r["uri"] for r in rows if badge in r["badges"]}
            page.select_option("#filter-task", "")
            assert len(visible()) == len(rows)

            # errors table lists the bad file; odd names round-trip through escaping
            errors = page.eval_on_selector_all(
                "table.errors tbody tr", "trs => trs.map(tr => [tr.cells[0].textContent, tr.cells[1].textContent])"
            )
            assert [e[0] for e in errors] == [str(tagged.root / "cat" / "images" / "bad.jpg")]
            assert errors[0][1].startswith("decode:")
            weird = [r["uri"] for r in rows if r["uri"].endswith(WEIRD)]
            assert len(weird) == 1 and weird[0] in visible()
            assert page.text_content("#run-id") == m["run_id"]
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
