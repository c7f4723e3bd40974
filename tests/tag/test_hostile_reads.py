"""Hostile reads (issue 13, cases 1 and 2): every read has a deadline and a size bound, and only regular local
files are read. A FIFO, a device, a server that never answers or one that trickles, an object over the cap: each
becomes that image's error row, and the run goes on.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest
from modelkit import committed_rows
from test_decode_bounds import peak_mib

from catalog_tagger.errors import ReadRefused
from catalog_tagger.fetch import ReadLimits, read_bounded
from catalog_tagger.tag.reader import DecodeStage

MiB = 1024**2


class _Handler(BaseHTTPRequestHandler):
    """``/img`` an image; ``/stuck`` never answers; ``/trickle`` sends a byte now and then forever; ``/chunked``
    a body of ``?n`` bytes with no Content-Length; ``/declared`` a Content-Length of 1 GiB."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *_args: object) -> None:
        """Quiet: the test output is the assertions."""

    def do_GET(self) -> None:
        path, _, query = self.path.partition("?")
        self.server.hits[path] += 1
        if path == "/img":
            self._send(200, self.server.image)
        elif path == "/stuck":
            self.server.stop.wait()
        elif path == "/trickle":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * MiB))
            self.end_headers()
            while not self.server.stop.wait(0.2):
                self._write(b"x")
        elif path == "/chunked":
            self._chunked(int(query.removeprefix("n=")))
        elif path == "/declared":
            self.send_response(200)
            self.send_header("Content-Length", str(1024 * MiB))
            self.end_headers()
            self._write(b"\0" * 1024)
        else:
            self._send(404, b"not found")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self._write(body)

    def _chunked(self, n: int) -> None:
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        block = b"\xff" * (256 * 1024)
        while n > 0 and not self.server.stop.is_set():
            part = block[:n]
            if not self._write(b"%x\r\n%s\r\n" % (len(part), part)):
                return
            n -= len(part)
        self._write(b"0\r\n\r\n")

    def _write(self, data: bytes) -> bool:
        try:
            self.wfile.write(data)
            self.wfile.flush()
        except OSError:  # the client gave up (the cap or the deadline): that is the point
            return False
        return True


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, image: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.image = image
        self.hits: Counter[str] = Counter()
        self.stop = threading.Event()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def kit(catalog_kit):
    return catalog_kit(images=3, seed=13, min_size=64, max_size=96, name="hostile")


@pytest.fixture
def server(kit) -> Iterator[_Server]:
    srv = _Server(Path(kit["images"][0]).read_bytes())
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop.set()
        srv.shutdown()
        srv.server_close()


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    try:
        yield path
    finally:  # a reader still blocked in open() (today's bug) is released, so the session does not hang
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


def _decode(stage: DecodeStage, uris: list[str]) -> dict[str, tuple[str, str | None]]:
    """uri -> (status, error) for one decode batch."""
    out = stage(pa.table({"uri": uris, "size": [None] * len(uris), "etag": [None] * len(uris),
                          "mtime": [None] * len(uris)}))  # fmt: skip
    return {u: (s, e) for u, s, e in zip(uris, out["status"], out["error"], strict=True)}


# --------------------------------------------------------------------------------------------- case 1
@pytest.mark.timeout(60)
def test_fifo_and_devices_in_a_manifest_are_error_rows_not_hangs(kit, fifo, tmp_path):
    good = kit["images"][0]
    uris = [str(fifo), "/dev/zero", str(tmp_path), good]
    got = _decode(DecodeStage(image_size=32), uris)
    for uri in uris[:3]:
        assert got[uri] == ("error", got[uri][1]) and got[uri][1].startswith("read: not a regular file"), uri
    assert got[good] == ("ok", None)


@pytest.mark.timeout(60)
def test_predict_reads_with_the_same_bounds(kit, fifo):
    from catalog_tagger.model.inference import predict_uris

    results = predict_uris(kit["model"], [str(fifo), "/dev/zero", kit["images"][0]], device="cpu")
    assert [r["status"] for r in results] == ["error", "error", "ok"]
    assert results[0]["error"] == "read: not a regular file (a FIFO)"


@pytest.mark.timeout(60)
def test_a_server_that_never_answers_costs_one_deadline_not_five_timeouts(kit, server):
    stuck, good = f"{server.base}/stuck", f"{server.base}/img"
    stage = DecodeStage(image_size=32, limits=ReadLimits(timeout_s=1, deadline_s=3))
    got = _decode(stage, [stuck, good, kit["images"][1]])
    assert got[good] == ("ok", None) and got[kit["images"][1]] == ("ok", None)
    status, error = got[stuck]
    assert status == "error" and error.startswith("read: "), error
    assert "no complete answer within 3 s" in error or "Timeout" in error, error
    # Timed-out attempts are retried only while the deadline leaves time for them.
    assert 1 <= server.hits["/stuck"] <= 3


@pytest.mark.timeout(60)
def test_a_trickling_server_is_cut_at_the_deadline(server):
    """Each byte arrives well within the read timeout: only the per-image deadline stops it."""
    with pytest.raises(ReadRefused, match="no complete answer within 2 s"):
        read_bounded(f"{server.base}/trickle", limits=ReadLimits(timeout_s=5, deadline_s=2))
    assert server.hits["/trickle"] == 1, "a deadline is final: no retry"


def test_read_limits_reach_the_decode_stage_from_the_job_config():
    from datetime import UTC, datetime

    from catalog_tagger.tag.config import TagJobConfig
    from catalog_tagger.tag.executors import Stages

    cfg = TagJobConfig(model="m", source="s", output="o", max_image_bytes=MiB, read_timeout_s=2, read_deadline_s=9,
                       max_image_pixels=1000)  # fmt: skip
    stage = Stages(cfg, run_id="r", tagged_at=datetime.now(UTC), image_size=32).decode({"decode_on": "cpu"})
    assert stage.limits == ReadLimits(max_bytes=MiB, timeout_s=2, deadline_s=9) and stage.max_pixels == 1000
    default = TagJobConfig(model="m", source="s", output="o")
    assert (default.max_image_bytes, default.read_timeout_s) == (64 * MiB, 30)
    assert default.read_deadline_s >= default.read_timeout_s


def test_a_ray_jobs_submission_carries_the_read_bounds():
    import shlex

    import typer.main

    from catalog_tagger.cli import app
    from catalog_tagger.tag.cluster import tag_entrypoint
    from catalog_tagger.tag.config import TagJobConfig

    cfg = TagJobConfig(model="m", source="s", output="o", run_id="r", max_image_bytes=MiB, read_timeout_s=2.5,
                       read_deadline_s=9, max_image_pixels=1000)  # fmt: skip
    argv = shlex.split(tag_entrypoint(cfg))
    opts = dict(zip(argv[4::2], argv[5::2], strict=False))
    assert (opts["--max-image-bytes"], opts["--read-timeout-s"]) == (str(MiB), "2.5")
    assert (opts["--read-deadline-s"], opts["--max-image-pixels"]) == ("9.0", "1000")
    known = {o for p in typer.main.get_command(app).commands["tag"].params for o in p.opts}
    assert {a for a in argv if a.startswith("--")} <= known
    assert "--max-image-bytes" not in tag_entrypoint(TagJobConfig(model="m", source="s", output="o", run_id="r"))


# --------------------------------------------------------------------------------------------- case 2
def test_a_local_file_over_the_cap_is_an_error_row(kit, tmp_path, monkeypatch):
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as fh:
        fh.truncate(64 * MiB)  # sparse: no disk used, but 64 MiB to read
    small = tmp_path / "small.jpg"
    small.write_bytes(Path(kit["images"][0]).read_bytes())
    got = _decode(DecodeStage(image_size=32, limits=ReadLimits(max_bytes=MiB)), [str(sparse), str(small)])
    assert got[str(sparse)][0] == "error" and got[str(sparse)][1].startswith("read: larger than"), got
    assert got[str(small)] == ("ok", None)
    # A file that grows after its size was taken: the count of what was read refuses it, not the size.
    real_fstat = os.fstat
    monkeypatch.setattr(os, "fstat", lambda fd: os.stat_result((*real_fstat(fd)[:6], 10, *real_fstat(fd)[7:])))
    with pytest.raises(ReadRefused, match="larger than 1,048,576 bytes"):
        read_bounded(str(sparse), limits=ReadLimits(max_bytes=MiB))
    monkeypatch.undo()
    exact = tmp_path / "exact.bin"
    exact.write_bytes(b"x" * 1000)
    assert read_bounded(str(exact), limits=ReadLimits(max_bytes=1000)) == b"x" * 1000
    with pytest.raises(ReadRefused, match="larger than"):
        read_bounded(str(exact), limits=ReadLimits(max_bytes=999))


@pytest.mark.timeout(60)
def test_http_bodies_over_the_cap_are_refused_while_streaming(server):
    """No Content-Length (chunked) or a Content-Length of 1 GiB: both stop at the cap, and neither is retried."""
    limits = ReadLimits(max_bytes=MiB)
    assert len(read_bounded(f"{server.base}/chunked?n={MiB}", limits=limits)) == MiB
    for path in ("/chunked?n=8388608", "/declared"):
        with pytest.raises(ReadRefused, match="larger than"):
            read_bounded(f"{server.base}{path}", limits=limits)
    assert server.hits["/chunked"] == 2 and server.hits["/declared"] == 1


@pytest.mark.integration
def test_s3_objects_over_the_cap_are_refused(s3_bucket):
    bucket, opts = s3_bucket
    import s3fs

    fs = s3fs.S3FileSystem(**opts)
    fs.pipe_file(f"{bucket}/big.jpg", b"\xff" * (2 * MiB))
    fs.pipe_file(f"{bucket}/ok.bin", b"\x01" * MiB)
    limits = ReadLimits(max_bytes=MiB)
    with pytest.raises(ReadRefused, match="larger than"):
        read_bounded(f"s3://{bucket}/big.jpg", opts, limits)
    assert read_bounded(f"s3://{bucket}/ok.bin", opts, limits) == b"\x01" * MiB


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["local", "http"])
def test_memory_stays_bounded_reading_2_gib(where, server, tmp_path):
    """In a fresh interpreter, a 2 GiB object (a sparse local file; a chunked HTTP body that declares no length)
    is refused with the default 64 MiB cap, and the read peaks near the cap, not near 2 GiB."""
    sparse = tmp_path / "2g.jpg"
    with open(sparse, "wb") as fh:
        fh.truncate(2048 * MiB)
    uri = str(sparse) if where == "local" else f"{server.base}/chunked?n={2048 * MiB}"
    code = (
        "import sys\n"
        "from catalog_tagger.fetch import read_bounded\n"
        "from catalog_tagger.errors import ReadRefused\n"
        "try:\n"
        "    read_bounded(sys.argv[1])\n"
        "except ReadRefused as err:\n"
        "    print('refused', err)\n"
    )
    out, peak = peak_mib(code, uri)
    assert out == "refused larger than 67,108,864 bytes (--max-image-bytes)", out
    assert peak < 400, f"peak {peak} MiB reading a 2 GiB object"


# --------------------------------------------------------------------------------------------- end to end
@pytest.mark.timeout(180)
def test_a_hostile_manifest_is_tagged_with_error_rows(kit, fifo, server, tmp_path):
    """A FIFO, /dev/zero, a stuck server, a body over the cap and good images: the run commits one row each."""
    from catalog_tagger.tag.job import TagJobConfig, run

    good = kit["images"]
    hostile = [str(fifo), "/dev/zero", f"{server.base}/stuck", f"{server.base}/chunked?n={4 * MiB}"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("uri\n" + "\n".join([*hostile, *good]) + "\n")
    cfg = TagJobConfig(model=kit["model"], source=str(manifest), output=str(tmp_path / "out"), executor="local",
                       max_image_bytes=MiB, read_timeout_s=1, read_deadline_s=2, calibrate=False)  # fmt: skip
    res = run(cfg)
    assert (res.ok, res.error) == (len(good), len(hostile)), res
    rows = committed_rows(tmp_path / "out").select(["uri", "error"]).to_pylist()
    errors = {r["uri"]: r["error"] for r in rows if r["error"]}
    assert errors[str(fifo)] == "read: not a regular file (a FIFO)"
    assert errors["/dev/zero"] == "read: not a regular file (a character device)"
    assert errors[hostile[2]].startswith(("read: no complete answer within 2 s", "read: ServerTimeoutError")), errors
    assert errors[hostile[3]] == "read: larger than 1,048,576 bytes (--max-image-bytes)"
