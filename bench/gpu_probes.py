"""Probes of the accelerator section (bench/gpu.py): process-tree CPU and NVML sampling, the timed ``run_batch``
loop, and eager vs ``torch.compile`` in a child process bounded in time."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SAMPLE_S = 0.2  # sampling period of process-tree CPU time and NVML utilisation
WARMUP_BATCHES = 3  # cuDNN algorithm choice and the allocator, before a loop's clock starts
COMPILE_LIMIT_S = 60.0  # torch.compile is compared only if it compiles within this...
CHILD_SLACK_S = 45.0  # ...plus the child's imports, model load and both loops
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------ sampling
class Sampler:
    """CPU seconds of this process tree (driver + Ray's processes) and GPU utilisation, sampled in a thread (NVML
    through pynvml, else an ``nvidia-smi -lms`` child, whose own CPU is left out).

    A process counts from its first sample to its last: one that exits between samples loses < SAMPLE_S of CPU.
    """

    def __init__(self, *, gpu: bool) -> None:
        self.nvml: tuple[Any, Any] | None = None
        self.note = "no GPU (dry run)"
        self._smi_cmd: list[str] | None = None
        self._smi: subprocess.Popen[str] | None = None
        if gpu:
            self.nvml, self.note = _nvml()
            smi = shutil.which("nvidia-smi") if self.nvml is None else None
            if smi:
                ms = str(int(SAMPLE_S * 1000))
                self._smi_cmd = [smi, "--id=0", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
                self._smi_cmd += ["-lms", ms]
                self.note = f"nvidia-smi utilization.gpu of GPU 0 every {ms} ms ({self.note})"
        self.util: list[float] = []
        self.wall_s = self.machine_cores = 0.0
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _tree_cpu(self) -> dict[int, float]:
        import psutil

        me = psutil.Process()
        out: dict[int, float] = {}
        for proc in [me, *me.children(recursive=True)]:
            if self._smi is not None and proc.pid == self._smi.pid:
                continue
            try:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
            except psutil.Error:
                continue
        return out

    def _sample(self) -> None:
        self._last.update(self._tree_cpu())
        if self.nvml is not None:
            pynvml, handle = self.nvml
            self.util.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def __enter__(self) -> Sampler:
        import psutil

        if self._smi_cmd:
            self._smi = subprocess.Popen(self._smi_cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._base = self._tree_cpu()
        self._last = dict(self._base)
        self._sys0, self._t0 = psutil.cpu_times(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        import psutil

        self._stop.set()
        self._thread.join()
        self._sample()
        self.wall_s = time.perf_counter() - self._t0
        if self._smi is not None:
            self._smi.terminate()
            text, _ = self._smi.communicate(timeout=10)
            self.util += [float(x) for x in text.split() if x.replace(".", "", 1).isdigit()]
        busy = [sum(t) - t.idle - getattr(t, "iowait", 0.0) for t in (self._sys0, psutil.cpu_times())]
        self.machine_cores = (busy[1] - busy[0]) / self.wall_s  # every process on the machine, for comparison

    @property
    def cpu_s(self) -> float:
        return sum(v - self._base.get(pid, 0.0) for pid, v in self._last.items())

    @property
    def util_mean(self) -> float | None:
        return sum(self.util) / len(self.util) if self.util else None


def _nvml() -> tuple[tuple[Any, Any] | None, str]:
    """(pynvml and GPU 0's handle, note), or no handle and why."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return (pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)), f"NVML utilisation of GPU 0, every {SAMPLE_S:g} s"
    except Exception as err:  # noqa: BLE001 - not installed, or no driver: the figure is noted as missing
        return None, f"no NVML figure ({type(err).__name__}: {err}); pip install nvidia-ml-py for one"


# ------------------------------------------------------------------------------------------------ loops
def load_model(uri: str, device: str) -> tuple[Any, Any]:
    """An artifact's model ready for inference on ``device`` (the job's ``prepare_for_inference``), and its card."""
    from catalog_tagger.model.artifact import load_artifact
    from catalog_tagger.model.inference import prepare_for_inference, select_device

    model, card = load_artifact(uri)
    return prepare_for_inference(model, select_device(device)), card


def timed_loop(model: Any, batches: list[Any], n: int) -> tuple[float, float]:
    """(wall seconds, summed forward seconds) of ``n`` ``run_batch`` calls cycling over ``batches``, after a warm-up."""
    from catalog_tagger.model.inference import run_batch

    for i in range(WARMUP_BATCHES):
        run_batch(model, batches[i % len(batches)])
    forward, t0 = 0.0, time.perf_counter()
    for i in range(n):
        forward += run_batch(model, batches[i % len(batches)]).seconds
    return time.perf_counter() - t0, forward


# ------------------------------------------------------------------------------------------------ compile
def compile_compare(args: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Eager vs ``torch.compile`` of the bare loop (``args``: model, device, batch_size, images) in a child process,
    killed with its compile workers past the limit: a compile that hangs must not take the other figures with it."""
    result = tmp / f"compile-{Path(args['model']).name}.json"
    cmd = [sys.executable, "-m", "bench.gpu_probes", "--compile-child", json.dumps({**args, "result": str(result)})]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    limit = COMPILE_LIMIT_S + CHILD_SLACK_S
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"error": f"no result within {limit:.0f}s (compile limit {COMPILE_LIMIT_S:.0f}s)"}
    if proc.returncode:
        lines = err.decode(errors="replace").strip().splitlines() or ["(no output)"]
        return {"error": f"exit {proc.returncode}: {lines[-1][:200]}"}
    data: dict[str, Any] = json.loads(result.read_text())
    if data["compile_s"] > COMPILE_LIMIT_S:
        data["error"] = f"compiled in {data['compile_s']:.0f}s, over the {COMPILE_LIMIT_S:.0f}s limit"
    return data


def _compile_child(a: dict[str, Any]) -> None:
    """In the child: the same loop on random uint8 batches (content does not change a CNN's speed), eager first."""
    import torch

    model, card = load_model(a["model"], a["device"])
    size, bs = card.image_size, a["batch_size"]
    batches = [torch.randint(0, 256, (bs, size, size, 3), dtype=torch.uint8, device=a["device"])]
    n = max(1, a["images"] // bs)
    eager, _ = timed_loop(model, batches, n)
    t0 = time.perf_counter()
    compiled = torch.compile(model)
    timed_loop(compiled, batches, 0)  # its warm-up batches compile it
    compile_s = time.perf_counter() - t0
    comp, _ = timed_loop(compiled, batches, n)
    out = {"eager_images_per_s": n * bs / eager, "compiled_images_per_s": n * bs / comp, "compile_s": compile_s}
    Path(a["result"]).write_text(json.dumps({**out, "compiled_vs_eager": eager / comp}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_probes")
    parser.add_argument("--compile-child", required=True, help="JSON arguments (bench/gpu.py passes them)")
    _compile_child(json.loads(parser.parse_args().compile_child))
