"""Hostile and odd listings (issue 13, cases 3, 5, 6, 7, 8): names that are not UTF-8, one file spelled many ways,
passwords in uris, manifest columns of the wrong type, and entries under a prefix that are not regular files."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from modelkit import committed_rows

from catalog_tagger import query as q
from catalog_tagger.errors import UserError
from catalog_tagger.schema import LISTING_SCHEMA, SKIP_REASONS
from catalog_tagger.storage import local_uri, redact, strip
from catalog_tagger.tag.job import TagJobConfig, run
from catalog_tagger.tag.sources import Listing, list_source

pytestmark = pytest.mark.usefixtures("ray_local")

NON_UTF8 = b"caf\xe9-\xff.jpg"  # Latin-1 bytes: not valid UTF-8
USER, PASSWORD = "carol-user-7Q2", "Pw-S3CRET-9f4e1"  # recognisable, searched for in every output


@pytest.fixture(scope="module")
def kit(catalog_kit):
    return catalog_kit(images=6, seed=13, min_size=64, max_size=96, name="hostile")


@pytest.fixture(scope="module")
def images(kit) -> list[Path]:
    return sorted(Path(kit["source"]).iterdir())


@pytest.fixture(scope="module")
def model(kit) -> str:
    return kit["model"]


def blake(path: str | bytes) -> str:
    with open(path, "rb") as fh:
        return hashlib.blake2b(fh.read(), digest_size=16).hexdigest()


def cli(*args: str, unprivileged: bool = False, timeout: int = 300) -> subprocess.CompletedProcess:
    """The real command line (``python -m catalog_tagger.cli``); ``unprivileged``: without root's capabilities, so
    that a folder with mode 000 is unreadable even when the tests run as root."""
    prefix = _drop_privileges() if unprivileged else []
    return subprocess.run([*prefix, sys.executable, "-m", "catalog_tagger.cli", *args], capture_output=True,
                          text=True, timeout=timeout)  # fmt: skip


def _drop_privileges() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        msg = "running as root without setpriv (util-linux): a mode-000 folder cannot be made unreadable"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return [setpriv, "--bounding-set=-all", "--inh-caps=-all"]


# --------------------------------------------------------------------------------------------- case 8: the folder
def hostile_folder(root: Path, images: list[Path], outside: Path) -> dict[str, int]:
    """Three images, then one of each entry that is not a regular file; returns the counts the listing must give."""
    root.mkdir(parents=True)
    for p in images[:3]:
        shutil.copy(p, root / p.name)
    (root / "notes.txt").write_text("not an image")
    os.mkfifo(root / "pipe.jpg")
    cwd = os.getcwd()
    os.chdir(root)  # a relative bind: a socket path is limited to ~100 bytes
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind("sock.jpg")
    finally:
        os.chdir(cwd)
    (root / "broken.jpg").symlink_to(root / "gone.jpg")
    (root / "alias.jpg").symlink_to(root / images[0].name)  # inside: the target is tagged under its own name
    outside.mkdir(parents=True, exist_ok=True)
    shutil.copy(images[3], outside / "elsewhere.jpg")
    (root / "escape.jpg").symlink_to(outside / "elsewhere.jpg")
    (root / "dirlink").symlink_to(outside, target_is_directory=True)
    locked = root / "locked"
    locked.mkdir()
    shutil.copy(images[4], locked / "hidden-away.jpg")
    locked.chmod(0)
    unsearchable = root / "names-only"  # its names can be read, its entries not looked at
    unsearchable.mkdir()
    shutil.copy(images[4], unsearchable / "also-hidden.jpg")
    unsearchable.chmod(0o444)
    expected = dict.fromkeys(SKIP_REASONS, 0)
    expected.update(fifo=1, socket=1, broken_symlink=1, symlink_inside=1, symlink_outside=2, unreadable_folder=2)
    return expected


@pytest.fixture
def hostile(images, tmp_path) -> Iterator[tuple[Path, dict[str, int]]]:
    root = tmp_path / "hostile"
    expected = hostile_folder(root, images, tmp_path / "outside")
    try:
        yield root, expected
    finally:
        for name in ("locked", "names-only"):
            (root / name).chmod(0o755)


def listed(source: str) -> tuple[pa.Table, Listing]:
    """The stream ``list_source`` gives, gathered and sorted (the diff's job in a run), and its counts."""
    listing = list_source(source)
    return pa.Table.from_batches(list(listing.batches), LISTING_SCHEMA).sort_by("uri"), listing


_LIST_SCRIPT = """
import json, sys
from catalog_tagger.tag.sources import list_source
listing = list_source(sys.argv[1])
uris = sorted(u for b in listing.batches for u in b.column("uri").to_pylist())
print(json.dumps({"uris": uris, "skipped": listing.skipped,
                  "non_image": listing.skipped_non_image, "notes": listing.notes}))
"""


def test_prefix_listing_counts_every_entry_that_is_not_a_regular_file(hostile, images):
    root, expected = hostile
    prefix = _drop_privileges()
    r = subprocess.run([*prefix, sys.executable, "-c", _LIST_SCRIPT, str(root)], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout)
    assert got["skipped"] == expected
    assert got["non_image"] == 1  # notes.txt
    assert got["uris"] == sorted(str(root / p.name) for p in images[:3])
    notes = " ".join(got["notes"])
    assert "2 sub-folder(s) could not be listed" in notes and "locked" in notes and "names-only" in notes, notes
    assert "not regular files" in notes and "symlinks are not followed" in notes, notes


def test_prefix_listing_of_a_clean_folder_counts_nothing(images, tmp_path):
    src = tmp_path / "clean"
    src.mkdir()
    for p in images[:2]:
        shutil.copy(p, src / p.name)
    table, listing = listed(str(src))
    assert table.num_rows == 2 and set(listing.skipped.values()) == {0} and listing.notes == []


# --------------------------------------------------------------------------------------------- case 3: not UTF-8
def test_non_utf8_file_name_is_tagged_under_an_escaped_uri(model, images, tmp_path):
    src = tmp_path / "names"
    src.mkdir()
    for p in images[:3]:
        shutil.copy(p, src / p.name)
    odd = os.fsencode(src) + b"/" + NON_UTF8
    shutil.copyfile(images[3], odd)
    out = tmp_path / "out"
    res = run(TagJobConfig(model=model, source=str(src), output=str(out), executor="local"))
    assert (res.ok, res.error, res.listed) == (4, 0, 4)
    rows = {r["uri"]: r for r in committed_rows(out).to_pylist()}
    escaped = f"file://{src}/caf%E9-%FF.jpg"
    assert escaped in rows, sorted(rows)
    assert rows[escaped]["content_hash"] == blake(images[3])
    assert os.fsencode(strip(escaped)) == odd and local_uri(strip(escaped)) == escaped  # round trip
    assert any("not valid UTF-8" in n for n in res.notes), res.notes
    assert run(TagJobConfig(model=model, source=str(src), output=str(out), executor="local")).processed == 0


def test_escaped_uri_spelling_is_unambiguous(tmp_path):
    """A literal '%' is escaped too, so that a real file named like an escape is never confused with it."""
    real = local_uri(str(tmp_path / "100%E9.jpg"))
    assert real == str(tmp_path / "100%E9.jpg")  # valid UTF-8: the plain path, taken literally
    odd = local_uri(os.fsdecode(os.fsencode(tmp_path) + b"/100%\xe9.jpg"))
    assert odd == f"file://{tmp_path}/100%25%E9.jpg"
    assert os.fsencode(strip(odd)) == os.fsencode(tmp_path) + b"/100%\xe9.jpg"


@pytest.mark.slow
def test_cli_over_a_hostile_folder_exits_0_and_shows_what_it_skipped(model, images, hostile, tmp_path):
    root, expected = hostile
    shutil.copyfile(images[5], os.fsencode(root) + b"/" + NON_UTF8)
    out = tmp_path / "out"
    r = cli("tag", "--model", model, "--source", str(root), "--output", str(out), "--run-id", "hostile",
            "--device", "cpu", unprivileged=True)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    for label in ("FIFOs", "sockets", "broken symlinks", "sub-folders not readable", "symlinks leading out"):
        assert label in r.stdout, (label, r.stdout)
    manifest = json.loads((out / "runs" / "hostile.json").read_text())
    assert manifest["counts"]["skipped_by_reason"] == expected
    assert manifest["counts"]["ok"] == 4  # three images and the one whose name is not UTF-8
    runs = q.query(
        str(out), "SELECT skipped_by_reason.fifo AS fifo, skipped_by_reason.unreadable_folder AS u FROM runs"
    )
    assert runs.to_pylist() == [{"fifo": 1, "u": 2}]


# --------------------------------------------------------------------------------------------- case 5: spellings
def test_one_local_file_spelled_many_ways_is_one_row(model, images, tmp_path, monkeypatch):
    src = tmp_path / "a"
    (src / "sub").mkdir(parents=True)
    target = src / "b.jpg"
    shutil.copy(images[0], target)
    # A decoy: were file://localhost/... read relative to the current folder, this other image would be tagged.
    monkeypatch.chdir(tmp_path)
    decoy = tmp_path / "localhost" / str(target).lstrip("/")
    decoy.parent.mkdir(parents=True)
    shutil.copy(images[1], decoy)
    spellings = [
        str(target),
        f"{src}//b.jpg",
        f"{src}/./b.jpg",
        f"{src}/sub/../b.jpg",
        f"local://{target}",
        f"file://localhost{target}",
        f"file://{target}",
        f"file://{src}/%62.jpg",  # file:// urls are percent-decoded (RFC 8089)
        "a/b.jpg",  # relative to the manifest's folder
    ]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("uri\n" + "\n".join(spellings) + "\n")
    assert strip(f"file://localhost{target}") == str(target)
    out = tmp_path / "out"
    res = run(TagJobConfig(model=model, source=str(manifest), output=str(out), executor="local"))
    assert (res.ok, res.error) == (1, 0)
    assert res.manifest["counts"]["duplicate_uris"] == len(spellings) - 1
    rows = committed_rows(out).to_pylist()
    assert [r["uri"] for r in rows] == [str(target)] and rows[0]["content_hash"] == blake(target)


def test_file_uri_naming_another_host_is_refused(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("uri\nfile://fileserver/share/a.jpg\n")
    with pytest.raises(UserError, match="names host 'fileserver'"):
        listed(str(manifest))


@pytest.mark.integration
def test_object_store_keys_are_not_collapsed(model, images, tmp_path, s3_bucket):
    """On S3 ``a//b.jpg`` and ``a/b.jpg`` are two keys: both are tagged, each with its own bytes."""
    import s3fs

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    fs.put_file(str(images[0]), f"{bucket}/cat/a//b.jpg")
    fs.put_file(str(images[1]), f"{bucket}/cat/a/b.jpg")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"uri\ns3://{bucket}/cat/a//b.jpg\ns3://{bucket}/cat/a/b.jpg\n")
    out = f"s3://{bucket}/out"
    res = run(TagJobConfig(model=model, source=str(manifest), output=out, storage_options=opts, executor="local"))
    assert (res.ok, res.error) == (2, 0)
    hashes = {r["uri"]: r["content_hash"] for r in committed_rows(out, opts).to_pylist()}
    assert hashes == {f"s3://{bucket}/cat/a//b.jpg": blake(images[0]), f"s3://{bucket}/cat/a/b.jpg": blake(images[1])}


# --------------------------------------------------------------------------------------------- case 6: passwords
class _BasicAuthImages(http.server.BaseHTTPRequestHandler):
    """Serves files of ``root`` to requests carrying USER:PASSWORD, 401 to others."""

    root: Path
    seen: list[str | None]

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        path = self.root / self.path.lstrip("/")
        if self.headers.get("Authorization") != want:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="images"')
            body = b""
        elif path.is_file():
            self.send_response(200)
            body = path.read_bytes()
        else:
            self.send_response(404)
            body = b""
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def auth_server(images) -> Iterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []
    handler = type("Handler", (_BasicAuthImages,), {"root": images[0].parent, "seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def _leaks(data: bytes | str) -> bool:
    raw = data.encode() if isinstance(data, str) else data
    return PASSWORD.encode() in raw or USER.encode() in raw


def test_password_in_a_uri_is_used_for_the_read_but_never_stored(model, images, auth_server, tmp_path, caplog):
    host, seen = auth_server
    names = [p.name for p in images[:3]]
    uris = [f"http://{USER}:{PASSWORD}@{host}/{n}" for n in names]
    uris.append(f"http://{USER}:{PASSWORD}@{host}/missing.jpg")  # 404: an error row, scrubbed
    uris.append(f"http://{host}/{names[0]}")  # the same image without credentials: one row, read with them
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("uri\n" + "\n".join(uris) + "\n")
    out = tmp_path / "out"
    caplog.set_level(logging.DEBUG)
    res = run(TagJobConfig(model=model, source=str(manifest), output=str(out), executor="ray", batch_size=2))
    assert (res.ok, res.error) == (3, 1), res.notes
    assert seen and all(h is not None for h in seen)  # every request carried the credentials
    rows = committed_rows(out).to_pylist()
    assert sorted(r["uri"] for r in rows) == sorted(f"http://{host}/{n}" for n in [*names, "missing.jpg"])
    # every file of the output, the query results, the report, the logs and the run result
    from catalog_tagger.report import write_report

    report = write_report(str(out), res.run_id, sample=4)
    files = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert report in files
    assert {p for p, data in files.items() if _leaks(data)} == set()
    for view in ("predictions", "latest", "runs"):
        table = q.query(str(out), f"SELECT * FROM {view}")
        assert table.num_rows and not _leaks(q.to_csv(table)) and not _leaks(q.to_json_lines(table))
    assert not _leaks("\n".join(r.getMessage() for r in caplog.records))
    assert not _leaks(json.dumps(res.manifest)) and not _leaks(repr(res))
    table, listing = listed(str(manifest))
    assert not _leaks(repr(listing)) and not _leaks(repr(table.to_pylist())) and "credentials" not in repr(Listing())
    assert listing.credentials == {f"http://{host}": f"{USER}:{PASSWORD}"}


def test_redact_hides_userinfo_anywhere_in_a_text():
    text = f"404 url='http://{USER}:{PASSWORD}@h:1/a@b.jpg' and ftp://x@y/z"
    assert not _leaks(redact(text)) and "http://***@h:1/a@b.jpg" in redact(text) and "ftp://***@y/z" in redact(text)


# --------------------------------------------------------------------------------------------- case 7: column types
@pytest.mark.parametrize(
    ("fmt", "column", "values"),
    [
        ("csv", "size", ["12", "abc"]),
        ("csv", "mtime", ["2024-01-02T03:04:05Z", "yesterday"]),
        ("parquet", "size", pa.array([True, False])),
        ("parquet", "mtime", pa.array([[1], [2]])),
        ("parquet", "etag", pa.array([1.5, 2.5])),
    ],
)
def test_manifest_column_of_the_wrong_type_exits_2_naming_it(model, images, tmp_path, fmt, column, values):
    uris = [str(images[0]), str(images[1])]
    if fmt == "csv":
        manifest = tmp_path / "manifest.csv"
        manifest.write_text(f"uri,{column}\n" + "".join(f"{u},{v}\n" for u, v in zip(uris, values, strict=True)))
    else:
        manifest = tmp_path / "manifest.parquet"
        pq.write_table(pa.table({"uri": uris, column: values}), manifest)
    out = tmp_path / "out"
    r = cli("tag", "--model", model, "--source", str(manifest), "--output", str(out), timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and f"column '{column}'" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (out / "runs").exists()


def test_manifest_columns_of_the_right_types_are_read(images, tmp_path):
    manifest = tmp_path / "manifest.parquet"
    pq.write_table(
        pa.table({
            "uri": [str(images[0]), str(images[1]), str(images[2])],
            "size": pa.array([10.0, None, 30], pa.float64()),  # whole floats are sizes
            "etag": pa.array([123, None, 456]),  # a numeric etag (a CSV reader's guess) is kept as text
            "mtime": pa.array([1_700_000_000, None, 1_700_000_001.5]),  # epoch seconds
        }),
        manifest,
    )  # fmt: skip
    table, _listing = listed(str(manifest))
    assert table.column("size").to_pylist() == [10, None, 30]
    assert table.column("etag").to_pylist() == ["123", None, "456"]
    assert [t.timestamp() if t else None for t in table.column("mtime").to_pylist()] == [1.7e9, None, 1_700_000_001.5]
