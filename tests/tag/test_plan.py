"""Planning in bounded memory (issue 12, part 2): the listing streams into the out-of-core diff in batches, a manifest
is converted a batch at a time (the exact per-value path only where the fast one refuses), ``tag --plan-only``
writes nothing, and the work files hold exactly the new and changed images."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from catalog_tagger.errors import UserError
from catalog_tagger.schema import LISTING_SCHEMA
from catalog_tagger.tag import diff, manifest, sources
from catalog_tagger.tag.commit import Layout
from catalog_tagger.tag.job import TagJobConfig, run
from catalog_tagger.tag.plan import plan_run, preview
from catalog_tagger.tag.sources import list_source


@pytest.fixture(scope="module")
def kit(catalog_kit):
    return catalog_kit(images=6, seed=21, min_size=64, max_size=72, name="plan")


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: what "writes nothing" compares."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def _settled(source: str, *, limit: int | None = None) -> tuple[sources.Listing, pa.Table]:
    """The source streamed into a Diff and made unique there, as ``plan_run`` does."""
    listing = list_source(source)
    with diff.Diff() as d:
        batches = 0
        for batch in listing.batches:
            d.add(batch)
            batches += 1
        listing.settle(*d.settle(limit))
        table = d.con.sql("SELECT * FROM listing ORDER BY uri").to_arrow_table()
    assert batches > 1  # the point of the test: the manifest arrived in several batches
    return listing, table


def test_a_manifest_streamed_in_batches_with_duplicates_across_them(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "BATCH_ROWS", 3)
    uris = [f"s3://b/img/{i}.jpg" for i in range(8)]
    rows = [*uris[:5], uris[0], *uris[5:], uris[1], uris[0], "  ", None]  # repeats in later batches, two blanks
    sizes = list(range(len(rows)))
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"uri": rows, "size": sizes, "etag": [f"e{i}" for i in sizes]}), path)
    listing, table = _settled(str(path))
    assert (listing.listed, listing.duplicates) == (8, 3)
    assert table.column("uri").to_pylist() == sorted(uris)
    first = dict(zip(table.column("uri").to_pylist(), table.column("size").to_pylist(), strict=True))
    assert first[uris[0]] == 0 and first[uris[1]] == 1  # the first listed row of a repeated uri wins
    notes = " ".join(listing.notes)
    assert "3 duplicate uri(s)" in notes and "2 blank uri(s)" in notes, notes
    limited, head = _settled(str(path), limit=3)
    assert (limited.listed, limited.duplicates) == (3, 3)
    assert head.column("uri").to_pylist() == sorted(uris)[:3]


def test_a_bad_value_in_a_later_batch_names_its_row(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "CSV_BLOCK", 64)  # a few rows per CSV block
    lines = [f"/data/{i}.jpg,{i}" for i in range(40)]
    lines[33] = "/data/33.jpg,abc"
    path = tmp_path / "manifest.csv"
    path.write_text("uri,size\n" + "\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"column 'size' must hold whole numbers of bytes; row 34 has 'abc'"):
        _settled(str(path))


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("size", pa.array([1, 2**40, None, 0])),
        ("size", pa.array([1.0, 3.0, None, 7.0])),
        ("size", pa.array(["12", " 13 ", None, "1e3"])),
        ("etag", pa.array(['"a"', "b", None, '""'])),
        ("etag", pa.array([1, 22, None, 333])),
        ("mtime", pa.array([1_700_000_000, 0, None, -5])),
        ("mtime", pa.array([1_700_000_000.25, 1.5e9, None, 2.000001])),
        ("mtime", pa.array(["2024-01-02T03:04:05Z", "2024-01-02T03:04:05.5+02:00", None, "2024-01-02T03:04:05"])),
        ("mtime", pa.array(["1700000000", " 12.5 ", None, "0"])),
        ("mtime", pa.array([datetime(2024, 1, 2, 3, 4, 5), datetime(1999, 12, 31), None, datetime(2024, 6, 1, 1)])),
        ("mtime", pa.array([datetime(2024, 1, 2, tzinfo=UTC), None, None, None], pa.timestamp("ms", "UTC"))),
    ],
)
def test_the_fast_conversion_agrees_with_the_exact_one(column, values):
    raw = pa.record_batch({"uri": ["/a.jpg"] * 4, column: values})
    fast = manifest._column(raw, column, "m.parquet", 0)
    assert fast.to_pylist() == manifest._slow_column(values, column, "m.parquet", 0).to_pylist()


def test_uris_take_their_one_spelling_in_a_batch(tmp_path):
    base = str(tmp_path / "m.csv")
    uris = ["a.jpg", "sub/../b.jpg", "/x//y.jpg", "/x/y.jpg", "s3://b/k//z.jpg", f"file://{tmp_path}/c%20d.jpg",
            "http://u:p@h:1/q.jpg", "HTTP://u:p@H:1/r.jpg"]  # fmt: skip
    got = manifest._resolve(pa.array(uris), base).to_pylist()
    assert got == [manifest.resolve_uri(u, base) for u in uris]
    store = manifest._resolve(pa.array(["a/b.jpg", "/abs/c.jpg"]), "s3://bkt/lists/m.csv").to_pylist()
    assert store == ["s3://bkt/lists/a/b.jpg", "/abs/c.jpg"]
    creds: dict[str, str] = {}
    bare = manifest._take_credentials(pa.array(got), base, creds).to_pylist()
    assert bare[-2:] == ["http://h:1/q.jpg", "HTTP://H:1/r.jpg"] and creds == {"http://h:1": "u:p"}


@pytest.mark.integration
def test_an_s3_prefix_is_listed_page_by_page(s3_bucket, monkeypatch):
    import s3fs

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    for i in range(5):
        fs.pipe_file(f"{bucket}/cat/{i}.jpg", b"x" * (i + 1))
    fs.pipe_file(f"{bucket}/cat/sub/deep.png", b"y")
    fs.pipe_file(f"{bucket}/cat/readme.txt", b"z")
    fs.pipe_file(f"{bucket}/catalogue/not-under-the-prefix.jpg", b"z")
    monkeypatch.setattr(sources, "LIST_BATCH", 2)
    listing = list_source(f"s3://{bucket}/cat", opts)
    batches = list(listing.batches)
    assert [b.num_rows for b in batches] == [2, 2, 2]
    table = pa.Table.from_batches(batches, LISTING_SCHEMA).sort_by("uri")
    assert table.column("uri").to_pylist() == [*(f"s3://{bucket}/cat/{i}.jpg" for i in range(5)),
                                               f"s3://{bucket}/cat/sub/deep.png"]  # fmt: skip
    assert table.column("size").to_pylist()[:5] == [1, 2, 3, 4, 5] and all(table.column("etag").to_pylist())
    assert listing.skipped_non_image == 1


def test_an_outside_uri_in_a_later_batch_refuses_before_anything_is_written(kit, tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "BATCH_ROWS", 2)
    inside = sorted(str(p) for p in Path(kit["source"]).iterdir())
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"uri": [*inside, "/etc/passwd.jpg"]}), path)
    out = tmp_path / "out"
    cfg = TagJobConfig(model=kit["model"], source=str(path), output=str(out), allowed_root=kit["source"])
    with pytest.raises(UserError, match=r"1 image uri\(s\) outside the allowed root .*'/etc/passwd.jpg'"):
        plan_run(cfg, Layout(str(out)), "r1", "v1", 0)
    assert not out.exists()


def test_work_files_hold_the_new_and_changed_images(kit, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(kit["source"], src)
    out = tmp_path / "out"
    first = run(TagJobConfig(model=kit["model"], source=str(src), output=str(out), executor="local"))
    assert first.ok == 6
    names = sorted(os.listdir(src))
    shutil.copy(src / names[0], src / "new-1.jpg")
    shutil.copy(src / names[1], src / "new-2.jpg")
    os.utime(src / names[2], (1_000_000, 1_000_000))  # another identity: size + mtime
    cfg = TagJobConfig(model=kit["model"], source=str(src), output=str(out))
    before = _tree(out)
    shown = preview(cfg)
    assert _tree(out) == before
    assert (shown.listed, shown.new, shown.changed, shown.unchanged, shown.resumed) == (8, 2, 1, 5, 0)
    from catalog_tagger.model.artifact import load_card

    planned = plan_run(cfg, Layout(str(out)), "r2", load_card(kit["model"]).version, 0)
    work = pa.concat_tables(pq.read_table(f) for f in planned.work.files)
    assert planned.work.rows == work.num_rows == shown.new + shown.changed
    assert sorted(work.column("uri").to_pylist()) == sorted(str(src / n) for n in ("new-1.jpg", "new-2.jpg", names[2]))
    assert planned.work.unchanged == 5 and planned.listed == 8


def test_plan_only_prints_the_counts_and_writes_nothing(kit, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for target in (out, tmp_path / "never-made"):
        before = _tree(out)
        r = subprocess.run(
            [sys.executable, "-m", "catalog_tagger.cli", "tag", "--model", kit["model"], "--source", kit["source"],
             "--output", str(target), "--plan-only"],
            capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        counts = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in r.stdout.splitlines()[:5]}
        assert counts == {"listed": 6, "new": 6, "changed": 0, "unchanged": 0, "resumed": 0}, r.stdout
        assert _tree(out) == before == {}
    assert not (tmp_path / "never-made").exists()
