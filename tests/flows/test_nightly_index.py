"""The nightly flow keeps an output's ANN index current: after a night that adds images, `similar` finds them through
the index (``flows.nightly.refresh_index`` → ``catalog_tagger.ann.refresh``); an output nobody indexed stays without
one; a failing refresh is logged and never fails the night."""

from __future__ import annotations

from pathlib import Path

import pytest

from catalog_tagger import ann
from catalog_tagger.query import query
from catalog_tagger.similar import similar
from catalog_tagger.synthetic.catalog import SynthConfig, generate
from flows import nightly
from flows.nightly import nightly_tagging

N, NEW = 8, 4


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.usefixtures("harness")
def test_second_night_adds_its_images_to_the_index(catalog_kit, monkeypatch: pytest.MonkeyPatch) -> None:
    kit = catalog_kit(images=N, name="nightly-index")
    output = str(Path(kit["root"]) / "out")
    params = {"source": kit["source"], "output": output, "model": kit["model"], "executor": "local"}
    first = nightly_tagging(**params)
    assert first["ok"] == N and not (Path(output) / ann.INDEX_DIR).exists()  # not indexed: left alone
    version = ann.build(output)["model_version"]

    generate(SynthConfig(out=str(Path(kit["root"]) / "cat"), images=NEW, seed=0, start=N, min_size=300,
                         max_size=400))  # fmt: skip
    second = nightly_tagging(**params)
    assert second["ok"] == NEW
    record = ann.read_record(output, None, version)
    assert record is not None and record["count"] == N + NEW and len(record["files"]["ids"]) == 2
    new = query(output, f"SELECT uri FROM latest WHERE run_id = '{second['run_id']}'")["uri"].to_pylist()
    assert len(new) == NEW
    for uri in new:
        got = similar(output, uri=uri, k=3)
        assert got[0]["uri"] == uri and got[0]["method"] == "index"

    # a refresh that fails (e.g. the store is briefly unwritable) is logged; the night still completes
    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("index store unavailable")

    monkeypatch.setattr(ann, "refresh", broken)
    monkeypatch.setattr(nightly, "refresh_index", nightly.refresh_index.with_options(retries=0))
    generate(SynthConfig(out=str(Path(kit["root"]) / "cat"), images=2, seed=0, start=N + NEW, min_size=300,
                         max_size=400))  # fmt: skip
    state = nightly_tagging(**params, return_state=True)
    assert state.is_completed() and state.result()["ok"] == 2
    assert ann.read_record(output, None, version)["count"] == N + NEW  # not refreshed, not broken
