"""``query`` is locked down by default (issue 13, case 18): SQL reads the views and nothing else on the machine,
and writes no file; ``--unsafe-sql`` gives back unrestricted DuckDB."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from catalog_tagger.errors import UserError
from catalog_tagger.query import query
from catalog_tagger.tag import delta
from catalog_tagger.tag.job import TagJobConfig, run

DOCS = Path(__file__).resolve().parent.parent / "docs" / "queries.md"


@pytest.fixture(scope="module")
def out(catalog_kit, tmp_path_factory) -> str:
    kit = catalog_kit(images=6, seed=4, min_size=64, max_size=96, name="lockdown")
    output = tmp_path_factory.mktemp("lockdown") / "out"
    run(TagJobConfig(model=kit["model"], source=kit["source"], output=str(output), executor="local"))
    return str(output)


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.csv"
    path.write_text("name,value\naws_secret_access_key,hunter2\n")
    return path


def test_the_views_still_answer(out):
    for view, n in (("predictions", 6), ("latest", 6), ("runs", 1)):
        sql = f"SELECT count(*) AS n FROM {view}"
        assert query(out, sql).column("n")[0].as_py() == n == query(out, sql, unsafe_sql=True).column("n")[0].as_py()
    row = query(out, "SELECT uri, garment, badges FROM latest WHERE garment <> '' ORDER BY uri LIMIT 1").to_pylist()[0]
    assert row["garment"] and isinstance(row["badges"], list)
    emb = query(out, "SELECT embedding FROM predictions WHERE uri = ? AND status = 'ok'", params=[row["uri"]])
    assert len(emb.column("embedding")[0].as_py()) == 32


def test_the_documented_reads_run_locked(out):
    """Every SELECT block of docs/queries.md (the ones a user pastes) runs under the lock."""
    ready = DOCS.read_text().split("## Ready-to-paste")[1].split("## Other engines")[0]
    blocks = re.findall(r"```sql\n(.*?)```", ready, re.S)
    reads = [b for b in blocks if not b.lstrip().startswith("COPY")]
    assert len(reads) >= 6
    for sql in reads:
        query(out, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/proc/self/environ')",
        "SELECT * FROM read_csv('{secret}')",
        "SELECT * FROM read_text('{secret}')",
        "SELECT * FROM glob('/etc/*')",
        "SELECT * FROM predictions, read_csv('{secret}')",
        "SET enable_external_access = true; SELECT * FROM read_csv('{secret}')",
        "RESET lock_configuration",
        "SET allowed_paths = ['{secret}']; SELECT * FROM read_csv('{secret}')",
    ],
)
def test_reading_other_files_is_refused(out, secret, sql):
    with pytest.raises(UserError, match="query failed") as info:
        query(out, sql.format(secret=secret))
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("COPY (SELECT 1 AS a) TO '{dir}/x.csv'", "COPY"),
        ("COPY latest TO '{dir}/x.parquet' (FORMAT parquet)", "COPY"),
        ("SELECT 1; COPY (SELECT 1) TO '{dir}/x.csv'", "COPY"),
        ("EXPORT DATABASE '{dir}/x'", "EXPORT"),
        ("ATTACH '{dir}/x.duckdb'", "ATTACH"),
        ("INSTALL httpfs", "LOAD"),
        ("LOAD '{dir}/x.so'", "LOAD"),
    ],
)
def test_writing_or_loading_files_is_refused(out, tmp_path, sql, kind):
    with pytest.raises(UserError, match=f"{kind} statements are refused"):
        query(out, sql.format(dir=tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_a_committed_file_cannot_be_overwritten(out):
    """DuckDB lets an allowed path (latest's files) be written as well as read (COPY ... USE_TMP_FILE false):
    refused by name."""
    part = delta.open_table(delta.table_uri(out, delta.LATEST), None).file_uris()[0]
    before = hashlib.sha256(Path(part).read_bytes()).hexdigest()
    with pytest.raises(UserError, match="COPY statements are refused"):
        query(out, f"COPY (SELECT 1 AS a) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)")
    assert hashlib.sha256(Path(part).read_bytes()).hexdigest() == before


def test_a_relative_output_path_still_reads(out, monkeypatch):
    monkeypatch.chdir(Path(out).parent)
    assert query(Path(out).name, "SELECT count(*) AS n FROM latest").column("n")[0].as_py() == 6


def test_unsafe_sql_opts_out(out, secret, tmp_path):
    got = query(out, f"SELECT value FROM read_csv('{secret}')", unsafe_sql=True)
    assert got.column("value").to_pylist() == ["hunter2"]
    query(out, f"COPY (SELECT 1 AS a) TO '{tmp_path / 'x.csv'}'", unsafe_sql=True)
    assert (tmp_path / "x.csv").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "catalog_tagger.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_the_query_command_is_locked_and_says_how_to_opt_out(out, secret):
    r = _cli("query", "--output", out, "SELECT * FROM read_csv('/proc/self/environ')")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stdout == ""
    assert "disabled by configuration" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("query", "--output", out, "COPY (SELECT 1) TO 'x.csv'")
    assert r.returncode == 2 and "--unsafe-sql" in r.stderr, r.stderr
    r = _cli("query", "--output", out, "--unsafe-sql", "--format", "csv", f"SELECT value FROM read_csv('{secret}')")
    assert r.returncode == 0 and r.stdout.replace('"', "").splitlines() == ["value", "hunter2"], r.stderr
