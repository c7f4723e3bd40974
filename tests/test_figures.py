"""A resumed run's figures read the same on the console, in the manifest, in the HTML report and in the Prefect
artifacts: every place formats them through ``figures.py`` from the one manifest."""

from __future__ import annotations

import dataclasses
import html
import re

import pytest
from rich.console import Console

from catalog_tagger.figures import savings_rows, timing_rows
from catalog_tagger.render import render_run_summary
from catalog_tagger.report import render_report
from catalog_tagger.tag import commit as ledger
from catalog_tagger.tag.job import TagJobConfig, run
from flows.artifacts import savings_table, summary_markdown


def _cells(page: str, attr: str) -> dict[str, str]:
    """The page's shown text per key of a key/value table (``data-<attr>-key``)."""
    found = re.findall(rf'data-{attr}-key="([^"]+)" data-value="[^"]*">([^<]*)</td>', page)
    return {key: html.unescape(text) for key, text in found}


@pytest.fixture(scope="module")
def resumed(catalog_kit, tmp_path_factory):
    """A run that staged 20 images and crashed before its commit, then resumed with 20 more to tag."""
    kit = catalog_kit(images=40, min_size=64, max_size=96, name="resumed")
    out = tmp_path_factory.mktemp("resumed") / "out"
    cfg = TagJobConfig(model=kit["model"], source=kit["source"], output=str(out), run_id="night", executor="local",
                       rows_per_shard=10, batch_size=10, limit=20)  # fmt: skip

    def boom(*_args, **_kwargs):
        raise RuntimeError("simulated crash before the commit")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ledger, "commit", boom)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(cfg)
    result = run(cfg.model_copy(update={"limit": 40}))
    return result, out


def test_a_resumed_run_shows_the_same_numbers_everywhere(resumed):
    result, out = resumed
    m = result.manifest
    assert m["counts"]["resumed"] == 20 and result.ok == 40 and result.resumed == 20
    # the throughput counts what this attempt tagged, over this attempt's pipeline: never the resumed images
    t = m["timings"]
    assert t["images_per_s"] == pytest.approx(20 / t["pipeline_s"], rel=0.05)  # pipeline_s is rounded to ms
    assert result.images_per_s == t["images_per_s"] and result.wall_s == t["wall_s"]
    assert any("resumed run" in n for n in m["savings"]["notes"])

    console = Console(record=True, width=250)
    render_run_summary(result, console)
    shown_console = console.export_text()
    page = render_report(str(out), result.run_id)
    markdown = summary_markdown("nightly", dataclasses.asdict(result), None, "local", "tonight")
    page_savings, page_timings = _cells(page, "savings"), _cells(page, "throughput")
    for key, label, shown, raw in savings_rows(m["savings"]):
        assert raw == m["savings"][key]
        assert page_savings[key] == shown, key
        assert f"| {label} | {shown} |" in markdown, key
        assert shown in shown_console, key
    for key, label, shown, _ in timing_rows(t):
        assert page_timings[key] == shown, key
        assert f"| {label} | {shown} |" in markdown, key
        assert shown in shown_console, key
    assert f"{t['images_per_s']:,.1f}" in shown_console
    # the artifact's table: the manifest's raw numbers
    table = {r["key"]: r["value"] for r in savings_table(m["savings"])}
    assert (
        table["fraction_saved"] == m["savings"]["fraction_saved"] and table["factor_low"] == m["savings"]["factor_low"]
    )
