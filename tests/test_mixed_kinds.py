"""A catalog mixing multiclass, multilabel and regression tasks end to end: train, tag (in-process executor), the
profile and drift of the run, DuckDB queries over the regression column, and the HTML report's histogram."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from catalog_tagger.drift import DriftConfig, detect
from catalog_tagger.query import query
from catalog_tagger.report import write_report
from catalog_tagger.synthetic.catalog import SynthConfig, generate
from catalog_tagger.synthetic.plan import REGRESSION_TASK
from catalog_tagger.tag.job import TagJobConfig, run


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    from catalog_tagger.train.config import TrainConfig
    from catalog_tagger.train.pipeline import train

    root = tmp_path_factory.mktemp("mixed")
    cat = generate(SynthConfig(out=str(root / "cat"), images=60, seed=2, min_size=64, max_size=96, regression=True))
    cfg = dict(backbone="tiny_cnn", image_size=32, epochs=2, batch_size=16, progress=False)
    trained = train(TrainConfig.parse(tasks=cat.tasks_uri, labels=cat.labels_uri, out=str(root / "model"), **cfg))
    out = root / "out"
    res = run(TagJobConfig(model=trained.out, source=cat.out + "/images", output=str(out), batch_size=16,
                           executor="local"))  # fmt: skip
    html = Path(write_report(str(out))).read_text()
    return SimpleNamespace(cat=cat, trained=trained, out=str(out), res=res, html=html)


def test_all_three_kinds_train_and_the_card_keeps_them(tagged):
    kinds = {t.name: t.kind for t in tagged.trained.card.task_config().tasks}
    assert kinds == {"garment": "multiclass", "color": "multiclass", "pattern": "multiclass",
                     "badges": "multilabel", REGRESSION_TASK: "regression"}  # fmt: skip
    assert set(tagged.trained.metrics[REGRESSION_TASK]) >= {"mae", "rmse", "r2", "n"}


def test_the_output_has_a_float32_column_for_the_regression_task(tagged):
    assert tagged.res.ok == 60 and tagged.res.error == 0
    rows = query(
        tagged.out, f"SELECT uri, garment, garment_score, badges, badges_scores, {REGRESSION_TASK} FROM latest"
    )
    assert rows.num_rows == 60
    schema = query(tagged.out, "SELECT * FROM latest LIMIT 0").schema
    assert schema.field(REGRESSION_TASK).type == pa.float32()
    assert f"{REGRESSION_TASK}_score" not in schema.names and f"{REGRESSION_TASK}_scores" not in schema.names
    values = np.asarray(rows.column(REGRESSION_TASK).to_pylist(), dtype=np.float64)
    assert np.isfinite(values).all() and values.std() > 0  # one value per image, and not a constant
    # Analysts filter and aggregate on it like any numeric column.
    [agg] = query(
        tagged.out,
        f"SELECT count(*) AS n, avg({REGRESSION_TASK}) AS mean FROM latest WHERE {REGRESSION_TASK} >= ?",
        params=[float(np.median(values))],
    ).to_pylist()
    assert agg["n"] == int((values >= np.median(values)).sum()) and agg["mean"] == pytest.approx(
        values[values >= np.median(values)].mean(), rel=1e-5
    )


def test_the_run_profile_describes_the_values_and_drift_compares_their_bins(tagged):
    prof = tagged.res.manifest["profile"]["tasks"]
    reg = prof[REGRESSION_TASK]
    values = np.asarray(query(tagged.out, f"SELECT {REGRESSION_TASK} AS v FROM latest").column("v").to_pylist())
    assert reg["kind"] == "regression" and reg["rows"] == 60
    assert reg["mean"] == pytest.approx(values.mean(), rel=1e-5) and reg["min"] == pytest.approx(values.min())
    assert reg["mean_confidence"] is None and sum(reg["labels"].values()) == 60  # counts per bin of [0, 1]
    assert all(re.match(r"^(< 0|>= 1|\[[0-9.]+, [0-9.]+\))$", k) for k in reg["labels"]), reg["labels"]
    assert prof["garment"]["rows"] == 60 and prof["garment"]["mean_confidence"] is not None
    cfg = DriftConfig(min_rows=10)
    profile = tagged.res.manifest["profile"]
    assert detect(profile, [profile], cfg) == []  # the same run: nothing moved
    shifted = {"tasks": {REGRESSION_TASK: {**reg, "labels": {"< 0": 60}}}}
    [warning] = detect(profile, [shifted], cfg)
    assert warning["task"] == REGRESSION_TASK and warning["psi"] > 0.2


def test_the_report_shows_a_histogram_for_the_regression_task(tagged):
    html = tagged.html
    section = html[html.index('<section id="labels">') :]
    section = section[: section.index("</section>")]
    hist = re.search(rf'<div class="chart histogram" data-task="{REGRESSION_TASK}">.*?</svg></div>', section, re.S)
    assert hist is not None
    counts = [int(n) for n in re.findall(r'class="bin"[^>]*data-count="(\d+)"', hist.group(0))]
    assert len(counts) == 20 and sum(counts) == 60
    assert 'data-task="garment"' in section and "bar-row" in section  # label tasks keep their bar charts
    assert "http://" not in html and "https://" not in html  # inline, no CDN
    # Gallery cards show the value; the label filter lists only the label tasks.
    assert re.search(rf"<b>{REGRESSION_TASK}</b>: 0\.\d+", html)
    data = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert data is not None and REGRESSION_TASK not in data.group(1) and "garment" in data.group(1)


def test_the_history_lists_the_regression_bins_in_value_order(tagged):
    from catalog_tagger.report import gather

    data = gather(tagged.out, sample=0)
    [th] = [t for t in data.history.tasks if t.name == REGRESSION_TASK]
    lows = [float(label.strip("[").split(",")[0]) for label in th.labels if label.startswith("[")]
    assert lows == sorted(lows) and lows
    assert th.mean_confidence[tagged.res.run_id] is None  # a number has no confidence
    assert data.histograms[REGRESSION_TASK].mean == pytest.approx(tagged.res.manifest["profile"]["tasks"][
        REGRESSION_TASK]["mean"], rel=1e-5)  # fmt: skip


def test_a_regression_task_without_range_has_no_bins_and_no_drift_verdict():
    entry = {"kind": "regression", "rows": 500, "labels": {}, "mean_confidence": None, "low_confidence_share": None,
             "mean": 3.0, "std": 1.0, "min": 0.0, "max": 9.0}  # fmt: skip
    other = {**entry, "mean": 7.0}
    assert detect({"tasks": {"age": entry}}, [{"tasks": {"age": other}}], DriftConfig()) == []
