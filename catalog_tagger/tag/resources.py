"""The resource plan of a run: which executor runs it, and the actors, GPUs, CPUs and torch threads of each stage,
and where JPEGs are decoded (recorded in the manifest's ``resources``).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from catalog_tagger.errors import UserError
from catalog_tagger.tag.config import TagJobConfig
from catalog_tagger.tag.ray_runtime import ray_address

LOCAL_DECODE_THREADS = 1  # local executor: decode the next slice while the model runs on this one


def _cuda_visible() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def choose_executor(cfg: TagJobConfig, work_rows: int) -> Literal["ray", "local"]:
    """``auto``: in-process for small runs on the embedded default, Ray Data for clusters, GPUs and big runs."""
    if cfg.executor != "auto":
        return cfg.executor
    if ray_address(cfg.ray_address) != "local" or work_rows > cfg.local_max_images or cfg.device == "cuda":
        return "ray"
    if cfg.device != "cpu" and _cuda_visible():
        return "ray"
    return "local"


def local_resources(cfg: TagJobConfig) -> dict[str, Any]:
    """One predictor in this process; the model gets the cores the decode thread leaves.

    On a small box, torch's OpenMP threads sharing a core with the decode thread (or a neighbour) run several
    times slower than one thread per free core.
    """
    from catalog_tagger.model.inference import select_device

    cuda = select_device(cfg.device).type == "cuda"
    threads = max(1, (os.cpu_count() or 1) - LOCAL_DECODE_THREADS)
    return {
        "executor": "local", "actors": 1, "num_gpus": 1 if cuda else 0, "threads": threads,
        "decode_on": decode_on(cfg, gpu=cuda),
    }  # fmt: skip


def decode_on(cfg: TagJobConfig, *, gpu: bool) -> str:
    """Where JPEGs are decoded (``TagJobConfig.decode_on``): ``auto`` is the accelerator when there is a GPU."""
    if cfg.decode_on != "auto":
        return cfg.decode_on
    return "accelerator" if gpu else "cpu"


def plan_resources(cfg: TagJobConfig) -> dict[str, Any]:
    """Actors, GPUs and CPUs per stage for the cluster Ray is connected to (recorded in the manifest)."""
    import ray

    res = ray.cluster_resources()  # type: ignore[no-untyped-call]  # Ray leaves it unannotated
    gpus = int(res.get("GPU", 0)) if cfg.device != "cpu" else 0
    cpus = max(1.0, float(res.get("CPU", 1)))
    if cfg.device == "cuda" and gpus == 0:
        raise UserError("--device cuda was requested but the Ray cluster has no GPUs")
    if gpus:
        actors = cfg.actors or gpus
        where = decode_on(cfg, gpu=True)
        return {
            "executor": "ray",
            "actors": actors,
            # Without --actors the pool starts once one GPU is free and grows to every GPU the cluster has
            # (Ray autoscales an actor pool between its min and max size).
            "min_actors": actors if cfg.actors else 1,
            "num_gpus": 1,
            "num_cpus": 1,
            "threads": None,
            # reading bytes and checking headers (the GPU decodes the JPEGs) costs a fraction of a Pillow decode
            "decode_cpus": cfg.decode_cpus or (0.5 if where == "accelerator" else 1),
            "decode_on": where,
        }
    actors = cfg.actors or 1
    # On CPU the actors' torch threads and the decode tasks share the cores. Keep CPU resources for decode
    # (else the pool takes every CPU and decode tasks never schedule); on tiny machines let torch use all
    # cores anyway, since decode is light next to the model.
    reserve = 1 if cpus < 8 else max(1, int(cpus // 4))
    per_actor = max(1, int((cpus - reserve) // actors))
    return {
        "executor": "ray",
        "actors": actors,
        "min_actors": actors,
        "num_gpus": 0,
        "num_cpus": per_actor if cpus - reserve >= actors else max(0.25, (cpus - reserve) / actors),
        "threads": int(cpus) if cpus <= 2 else per_actor,
        "decode_cpus": cfg.decode_cpus or (0.5 if cpus <= 2 else 1),
        "decode_on": decode_on(cfg, gpu=False),
    }
