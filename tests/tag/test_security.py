"""Security: no pickle ever, no credentials in any output or log, manifests confined to an allowed root."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from catalog_tagger.errors import ArtifactError, UserError
from catalog_tagger.storage import filesystem
from catalog_tagger.tag.job import TagJobConfig, run
from catalog_tagger.tag.predictor import Predictor
from catalog_tagger.tag.reader import DecodeStage

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module")
def kit(catalog_kit):
    return catalog_kit(images=8, seed=5, min_size=300, max_size=400, name="security")


@pytest.fixture(scope="module")
def images(kit) -> list[str]:
    return sorted(str(p) for p in Path(kit["source"]).iterdir())


@pytest.fixture(scope="module")
def model(kit) -> str:
    return kit["model"]


def cli(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catalog_tagger.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


# --------------------------------------------------------------------------------------------- no pickle
class _Detonator:
    """Unpickling this creates a marker file: proof that somebody unpickled the checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_card_with_pickle_but_no_safetensors_is_refused_before_any_work(model, tmp_path, images):
    art = tmp_path / "artifact"
    art.mkdir()
    shutil.copy(Path(model) / "model.json", art / "model.json")
    marker = tmp_path / "unpickled"
    (art / "model.pkl").write_bytes(pickle.dumps(_Detonator(str(marker))))
    out = tmp_path / "out"
    with pytest.raises(ArtifactError) as exc:
        run(TagJobConfig(model=str(art), source=str(Path(images[0]).parent), output=str(out)))
    msg = str(exc.value)
    assert "no model.safetensors" in msg and "model.pkl" in msg and "pickle is refused" in msg, msg
    r = cli("tag", "--model", str(art), "--source", str(Path(images[0]).parent), "--output", str(out), timeout=120)
    assert r.returncode == 2 and "pickle is refused" in r.stderr, r.stderr[-2000:]
    assert not marker.exists() and not out.exists()


def test_full_load_and_tag_never_unpickles(model, images, monkeypatch):
    """Model load + decode + predict with every unpickling entry point booby-trapped."""
    import torch

    calls: list[str] = []

    def trap(name: str):
        def refuse(*_args, **_kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called: artifacts must never be unpickled")

        return refuse

    for name in ("loads", "load", "Unpickler"):
        monkeypatch.setattr(pickle, name, trap(f"pickle.{name}"))
    monkeypatch.setattr(torch, "load", trap("torch.load"))
    # The Ray path's stages, called in-process (Ray itself uses pickle for its own messages, never for artifacts).
    stage = DecodeStage(image_size=32)
    batch = stage(pa.table({"uri": images[:4], "size": [None] * 4, "etag": [None] * 4, "mtime": [None] * 4}))
    predictor = Predictor(model, run_id="r", tagged_at=datetime.now(UTC), device="cpu")
    table = predictor(batch)
    assert table.num_rows == 4 and table.column("status").to_pylist() == ["ok"] * 4
    from catalog_tagger.model.inference import predict_uris

    assert [r["status"] for r in predict_uris(model, images[:2], device="cpu")] == ["ok", "ok"]
    assert calls == []


def test_predict_command_triggers_no_unpickling_audit_event(model, images):
    """Belt and braces, in a fresh interpreter: the ``pickle.find_class`` audit event (raised by the C unpickler
    for every global a pickle names) never fires while the CLI loads the artifact and predicts."""
    code = (
        "import sys\n"
        "hits = []\n"
        "sys.addaudithook(lambda event, args: hits.append(args) if event == 'pickle.find_class' else None)\n"
        "from catalog_tagger.cli import main\n"
        f"sys.argv = ['catalog-tagger', 'predict', '--model', {model!r}, '--json', '--device', 'cpu', {images[0]!r}]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print('FIND_CLASS', hits, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"status": "ok"' in r.stdout
    assert "FIND_CLASS []" in r.stderr, r.stderr[-2000:]


# --------------------------------------------------------------------------------------------- credentials
SECRET = "canary-secret-7f3a9b1c2d"
KEY_ID = "AKIACANARYKEYID00042"
ENV_SECRET = "canary-env-secret-55e0aa91"
ENV_TOKEN = "canary-session-token-0b9d3"
CANARIES = (SECRET, KEY_ID, ENV_SECRET, ENV_TOKEN)


def _leaks(blob: bytes | str) -> list[str]:
    data = blob.encode() if isinstance(blob, str) else blob
    return [c for c in CANARIES if c.encode() in data]


def _make_bucket(endpoint: str, images: list[str]) -> tuple[str, dict]:
    import uuid

    import boto3

    bucket = f"ct-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID,
                 aws_secret_access_key=SECRET).create_bucket(Bucket=bucket)  # fmt: skip
    opts = {"key": KEY_ID, "secret": SECRET, "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    fs = filesystem("s3://", opts)
    for p in images:
        fs.put_file(p, f"{bucket}/catalog/{Path(p).name}")
    return bucket, opts


def _every_object(bucket: str, prefix: str, opts: dict) -> dict[str, bytes]:
    fs = filesystem("s3://", opts)
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(f"{bucket}/{prefix}")}


@pytest.mark.integration
def test_credentials_never_reach_logs_manifests_parquet_reports_or_artifacts(
    model, images, s3_server, monkeypatch, caplog
):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ENV_SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", ENV_TOKEN)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    caplog.set_level(logging.INFO)
    bucket, opts = _make_bucket(s3_server, images)
    out = f"s3://{bucket}/tags"
    cfg = TagJobConfig(model=model, source=f"s3://{bucket}/catalog", output=out, storage_options=opts, batch_size=4)
    assert not _leaks(repr(cfg)) and not _leaks(str(cfg))
    assert not _leaks(repr(DecodeStage(image_size=32, storage_options=opts)))
    res = run(cfg)
    assert res.ok == len(images)
    from catalog_tagger.report import write_report

    report = write_report(out, res.run_id, storage_options=opts, sample=4)
    assert report.startswith(out)
    # a refused run's error message is a log line too
    with pytest.raises(UserError) as exc:
        run(cfg.model_copy(update={"source": f"s3://{bucket}/no-such-prefix"}))
    files = _every_object(bucket, "tags", opts)
    assert any(p.endswith(".parquet") for p in files) and any("/runs/" in p for p in files)
    assert any("/reports/" in p for p in files)
    leaks = {p: _leaks(data) for p, data in files.items() if _leaks(data)}
    assert leaks == {}, f"credentials written to the output: {leaks}"
    assert not _leaks(str(exc.value))
    assert not _leaks("\n".join(r.getMessage() for r in caplog.records)), "credentials in the logs"
    assert not _leaks(json.dumps(dataclasses.asdict(res), default=str)), "credentials in the run result"
    # The Prefect artifacts are built from the run result (the flow module is importable without a server).
    artifacts = pytest.importorskip("flows.artifacts")
    result = {**dataclasses.asdict(res), "images_per_s": res.images_per_s}
    md = artifacts.summary_markdown("nightly", result, report, "local (local)", "2026-01-01")
    table = artifacts.savings_table(res.manifest["savings"])
    assert not _leaks(md) and not _leaks(json.dumps(table, default=str))


@pytest.mark.slow
@pytest.mark.integration
def test_cli_with_credentials_in_environment_never_prints_them(model, images, s3_server):
    bucket, opts = _make_bucket(s3_server, images[:4])
    creds = {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": ENV_SECRET, "AWS_SESSION_TOKEN": ENV_TOKEN}
    env = {**os.environ, **creds, "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "us-east-1"}
    r = cli("--verbose", "tag", "--model", model, "--source", f"s3://{bucket}/catalog", "--output",
            f"s3://{bucket}/tags", "--run-id", "cli-creds", "--device", "cpu", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "cli-creds" in r.stdout
    assert not _leaks(r.stdout) and not _leaks(r.stderr), "credentials printed by the CLI"
    leaks = {p: _leaks(d) for p, d in _every_object(bucket, "tags", opts).items() if _leaks(d)}
    assert leaks == {}


# --------------------------------------------------------------------------------------------- allowed root
@pytest.fixture
def rooted(images, tmp_path):
    """An allowed root holding two images, a symlink inside pointing out, and an outside folder with images."""
    root = tmp_path / "root"
    (root / "imgs").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    for p in images[:2]:
        shutil.copy(p, root / "imgs" / Path(p).name)
    for name, src in zip(("secret.jpg", "a.jpg", "b.jpg", "c.jpg"), images[2:], strict=False):
        shutil.copy(src, outside / name)
    (root / "imgs" / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "imgs" / "alias.jpg").symlink_to(root / "imgs" / Path(images[0]).name)  # stays inside: fine
    return root, outside


def test_manifest_escaping_the_allowed_root_refuses_the_whole_run(model, rooted, tmp_path):
    root, outside = rooted
    inside = sorted(str(p) for p in (root / "imgs").iterdir() if p.name != "escape.jpg")
    escaping = [
        str(outside / "secret.jpg"),  # absolute path elsewhere
        f"{root}/imgs/../../outside/a.jpg",  # '..' climbing out of an absolute path
        "imgs/../../outside/b.jpg",  # ... or out of a relative one
        str(root / "imgs" / "escape.jpg"),  # a symlink inside that resolves outside
        "file://" + str(outside / "c.jpg"),  # file:// elsewhere
        "http://127.0.0.1:9/secret.jpg",  # another scheme
        "s3://bucket/secret.jpg",
    ]
    manifest = root / "manifest.csv"
    manifest.write_text("uri\n" + "\n".join([*inside, *escaping]) + "\n")
    out = tmp_path / "out"
    with pytest.raises(UserError) as exc:
        run(TagJobConfig(model=model, source=str(manifest), output=str(out), allowed_root=str(root)))
    msg = str(exc.value)
    assert "7 image uri(s) outside the allowed root" in msg and "Nothing was tagged" in msg, msg
    for name in ("secret.jpg", "a.jpg", "b.jpg", "escape.jpg", "c.jpg", "http://127.0.0.1:9/", "s3://bucket/"):
        assert name in msg, name
    assert not (out / "runs").exists() and not (out / "predictions").exists()
    assert not list((out / "_staging").glob("*")) if (out / "_staging").exists() else True
    r = cli("tag", "--model", model, "--source", str(manifest), "--output", str(out), "--allowed-root", str(root),
            timeout=120)  # fmt: skip
    assert r.returncode == 2 and "outside the allowed root" in r.stderr, r.stderr[-2000:]


def test_manifest_inside_the_allowed_root_runs(model, rooted, tmp_path):
    root, outside = rooted
    names = sorted(p.name for p in (root / "imgs").iterdir() if p.name != "escape.jpg")
    uris = [f"imgs/{names[0]}", "file://" + str(root / "imgs" / names[1]), f"{root}/imgs/./{names[2]}"]
    manifest = root / "manifest.csv"
    manifest.write_text("uri\n" + "\n".join(uris) + "\n")
    res = run(TagJobConfig(model=model, source=str(manifest), output=str(tmp_path / "out"), allowed_root=str(root)))
    assert res.ok == 3 and res.error == 0
    # a prefix source is held to the same rule (its listing never follows symlinks: escape.jpg is not an image)
    prefix = run(
        TagJobConfig(model=model, source=str(root / "imgs"), output=str(tmp_path / "o2"), allowed_root=str(root))
    )
    assert prefix.ok == 2
    with pytest.raises(UserError, match=r"4 image uri\(s\) outside the allowed root"):
        run(TagJobConfig(model=model, source=str(outside), output=str(tmp_path / "o2"), allowed_root=str(root)))
    with pytest.raises(UserError, match="not an existing local folder"):
        run(TagJobConfig(model=model, source=str(manifest), output=str(tmp_path / "o3"), allowed_root=str(root / "x")))


def test_decode_rechecks_the_root_at_read_time(rooted):
    """A symlink swapped after listing is still refused when the bytes are read (an error row, not a read)."""
    root, _outside = rooted
    stage = DecodeStage(image_size=32, allowed_root=str(root))
    uris = [str(root / "imgs" / "escape.jpg"), str(next(p for p in (root / "imgs").iterdir() if not p.is_symlink()))]
    out = stage(pa.table({"uri": uris, "size": [None] * 2, "etag": [None] * 2, "mtime": [None] * 2}))
    assert list(out["status"]) == ["error", "ok"]
    assert out["error"][0].startswith("read: refused: outside the allowed root")
