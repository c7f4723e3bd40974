"""The bench's accelerator section (bench/gpu.py, bench/gpu.sh): skipped with its reason without CUDA, the figures
judged against their targets, and the whole harness through gpu.sh's CPU dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu.sh"
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA")


@pytest.fixture
def gpu_bench(monkeypatch: pytest.MonkeyPatch):
    """bench.gpu, importable from the repository root (the bench is not part of the installed package)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import gpu

    return gpu


@no_cuda
def test_the_section_is_skipped_with_its_reason_without_cuda(gpu_bench) -> None:
    from bench.common import Context, Sizes

    res = gpu_bench.run(Context(sizes=Sizes(), say=lambda _msg: None))
    assert [c.metric for c in res.checks] == [gpu_bench.SKIP_REASON]
    assert res.checks[0].passed is None and res.error is None
    assert any("torch.cuda.is_available() is False" in n for n in res.notes)


def _e2e(images_per_s: float, busy: float, cores: float) -> dict:
    return {
        "images_per_s": images_per_s,
        "after_first_batch_images_per_s": images_per_s,
        "busy_fraction": busy,
        "busy_after_first_batch": busy,
        "cpu_cores_per_gpu": cores,
        "nvml_util_mean": None,
        "nvml_note": "no NVML",
    }


def test_figures_are_judged_against_the_targets_and_a_crash_is_shown(gpu_bench) -> None:
    models = {
        "m": {
            "bare": {"images_per_s": 1000.0},
            "e2e": {"cpu": _e2e(850.0, 0.95, 7.5), "accelerator": _e2e(700.0, 0.5, 9.0), "x": {"error": "T\nBoom"}},
        }
    }
    verdicts = {c.metric: c.passed for c in gpu_bench.checks(models, gpu_bench.Settings()) if c.target}
    assert verdicts["m [decode cpu]: end to end / bare loop"] is True
    assert verdicts["m [decode cpu]: GPU busy fraction"] is True
    assert verdicts["m [decode cpu]: CPU cores per GPU"] is True
    assert verdicts["m [decode accelerator]: end to end / bare loop"] is False
    assert verdicts["m [decode accelerator]: GPU busy fraction"] is False
    assert verdicts["m [decode accelerator]: CPU cores per GPU"] is False
    crashed = [c for c in gpu_bench.checks(models, gpu_bench.Settings()) if c.metric == "m [decode x]: crashed"]
    assert [c.note for c in crashed] == ["Boom"]
    dry = gpu_bench.checks(models, gpu_bench.DRY_RUN)
    assert all(c.passed is None for c in dry) and any(c.target for c in dry)


def test_gpu_sh_without_a_gpu_exits_2_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "NVIDIA_SMI": str(tmp_path / "no-nvidia-smi"), "OUT": str(tmp_path / "out")}
    proc = subprocess.run([str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "--dry-run-cpu" in proc.stderr
    assert not (tmp_path / "out").exists()


@no_cuda
def test_bench_gpu_without_cuda_exits_2_with_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1 and "no CUDA device" in proc.stderr


@pytest.mark.slow
def test_the_dry_run_measures_every_figure_on_cpu(tmp_path: Path, gpu_bench) -> None:
    """The whole harness (catalog, bare loop, job.run per decode variant, sampling, JSON, summary) on CPU."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OUT": str(out),
        "CATALOG_TAGGER_BENCH_CACHE": str(tmp_path / "cache"),
        "PYTHON": sys.executable,
    }
    cmd = [str(SCRIPT), "--dry-run-cpu", "--models", "tiny_cnn", "--images", "8", "--batch-size", "4", "--no-compile"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((out / "gpu-bench.json").read_text())
    assert doc["complete"] is True and doc["dry_run"] is True and doc["result"]["error"] is None
    figures = doc["result"]["data"]["models"]["tiny_cnn"]
    assert figures["bare"]["images"] == 8 and figures["bare"]["images_per_s"] > 0
    variants = {v or "default" for v in gpu_bench.decode_variants()}
    assert set(figures["e2e"]) == variants
    for e2e in figures["e2e"].values():
        assert e2e["ok"] == 8 and e2e["images_per_s"] > 0
        assert 0 < e2e["busy_fraction"] <= 1
        assert e2e["cpu_cores_per_gpu"] > 0 and e2e["nvml_util_mean"] is None
    summary = (out / "gpu-bench.txt").read_text()
    assert "tiny_cnn: bare model loop" in summary and "dry run, not judged" in summary
