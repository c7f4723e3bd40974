"""Shared fixtures: one local Ray per test session, tiny models and catalogs made in tmp dirs."""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (gpu marker): no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_local():
    """One in-process local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must have Debian's chromium installed (.ci/run installs it)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); CI installs it")
    return path


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol server (moto's server mode) on loopback, in its own process; yields its endpoint URL.

    Its own process: delta-rs holds the GIL while it waits on the network, so a server thread in this process
    would never answer it.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto server did not start on {url}")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket on the moto server and the fsspec storage options that reach it."""
    import uuid

    import s3fs

    opts = {
        "key": "testing-key",
        "secret": "testing-secret",
        "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"},
    }
    import boto3

    bucket = f"ct-{uuid.uuid4().hex[:10]}"
    boto3.client(
        "s3",
        endpoint_url=s3_server,
        region_name="us-east-1",
        aws_access_key_id=opts["key"],
        aws_secret_access_key=opts["secret"],
    ).create_bucket(Bucket=bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    return bucket, opts


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """Make (and cache) tiny random-init artifacts for a tasks file: fast enough for every pipeline test."""
    cache: dict[tuple[str, int], str] = {}

    def make(tasks_uri: str, *, seed: int = 0, image_size: int = 32) -> str:
        import torch

        from catalog_tagger.config import load_tasks
        from catalog_tagger.model.artifact import card_for, save_artifact
        from catalog_tagger.model.multihead import build_model

        key = (str(tasks_uri), seed)
        if key not in cache:
            torch.manual_seed(seed)
            model = build_model(backbone="tiny_cnn", tasks=load_tasks(tasks_uri))
            out = tmp_path_factory.mktemp("model")
            save_artifact(model, card_for(model, image_size=image_size), out)
            cache[key] = str(out)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def catalog_kit(tmp_path_factory, tiny_model_factory):
    """Make a synthetic catalog plus a tiny model for its tasks, in a fresh folder: the one fixture every
    pipeline test module builds on (each call makes its own copy, so a test may add files to it).

    Returns a dict: ``source`` (images folder), ``model``, ``root``, ``tasks``, ``labels``, ``images`` (paths)
    and ``synth`` (the ``SynthResult``).
    """
    from catalog_tagger.synthetic.catalog import SynthConfig, generate

    def make(*, images: int = 20, seed: int = 0, min_size: int = 300, max_size: int = 400, name: str = "kit"):
        root = tmp_path_factory.mktemp(name)
        synth = generate(SynthConfig(out=str(root / "cat"), images=images, seed=seed, min_size=min_size,
                                     max_size=max_size))  # fmt: skip
        return {
            "source": str(root / "cat" / "images"),
            "model": tiny_model_factory(synth.tasks_uri),
            "root": str(root),
            "tasks": synth.tasks_uri,
            "labels": synth.labels_uri,
            "images": list(synth.images),
            "synth": synth,
        }

    return make
