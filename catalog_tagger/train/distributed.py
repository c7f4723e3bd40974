"""Data-parallel training on Ray Train: the same ``fit`` loop in N ``TorchTrainer`` workers (gloo on CPU, nccl on GPU).

The driver decodes the images once and puts the uint8 cache in the object store; every worker maps the same
buffer (zero-copy on a node) and trains on its own stride of each epoch's permutation under DDP. Rank 0
evaluates and returns the best weights (safetensors bytes) and the epoch history as the training function's
return value, so no checkpoint storage is needed; the driver then tunes thresholds, tests and saves the artifact
exactly as a single-process run does.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch
from safetensors.torch import load as st_load

from catalog_tagger.config import TaskConfig, parse_tasks
from catalog_tagger.errors import UserError
from catalog_tagger.model.multihead import MultiHeadModel
from catalog_tagger.model.weights import state_bytes
from catalog_tagger.train.config import TrainConfig
from catalog_tagger.train.data import TrainData
from catalog_tagger.train.loop import Dist, FitResult, fit, new_model
from catalog_tagger.train.split import Split

log = logging.getLogger(__name__)


def _worker_loop(config: dict[str, Any]) -> dict[str, Any] | None:
    """Runs in every Ray Train worker; rank 0 returns the trained state and the history."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["cfg"])
    tasks = parse_tasks(config["tasks"], source="train config")
    ctx = ray.train.get_context()
    dist = Dist(rank=ctx.get_world_rank(), world=ctx.get_world_size())
    resources = ray.get_runtime_context().get_assigned_resources()  # type: ignore[no-untyped-call]  # Ray: no hints
    cpus = int(resources.get("CPU", 1)) or 1
    torch.set_num_threads(cfg.threads or cpus)
    images = ray.get(config["images"][0])  # wrapped in a list so Ray hands us the ref, not a copy per call
    data = TrainData(images=images, targets=config["targets"])
    split: Split = config["split"]
    device = ray.train.torch.get_device()
    model = new_model(cfg, tasks, device)  # same init on every rank (DDP also broadcasts rank 0's weights)
    # A frozen backbone has no gradients in its first epochs: DDP must look for unused parameters then.
    ddp = {"find_unused_parameters": True} if cfg.freeze_backbone_epochs > 0 else None
    net = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=ddp)

    def report(row: dict[str, Any]) -> None:
        # A barrier across workers: every rank reports once per epoch; Ray keeps rank 0's metrics.
        ray.train.report({k: v for k, v in row.items() if v is not None})

    res = fit(model, data, split, cfg, device, net=net, dist=dist, on_epoch=report, label=f"train[rank {dist.rank}]")
    if dist.rank != 0:
        return None
    return {"state": state_bytes(model), "fit": dataclasses.asdict(res)}


def _user_error(err: BaseException) -> UserError | None:
    """The first ``UserError`` (a diverged loss) inside Ray's wrapping of the workers' failures, if any."""
    todo, seen = [err], set()
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        failures = getattr(e, "worker_failures", None)
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "cause", None)) if isinstance(x, BaseException)]
        todo += [x for x in (failures.values() if isinstance(failures, dict) else []) if isinstance(x, BaseException)]
    return None


def fit_on_ray(cfg: TrainConfig, tasks: TaskConfig, data: TrainData, split: Split) -> tuple[MultiHeadModel, FitResult]:
    """Train with ``cfg.workers`` Ray Train workers; returns the best model (on CPU) and its fit history."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = False
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=cfg.ray_address, include_dashboard=False, log_to_driver=True, configure_logging=False)
        started = True
    try:
        gpus = ray.cluster_resources().get("GPU", 0)  # type: ignore[no-untyped-call]  # Ray: no hints
        use_gpu = cfg.device == "cuda" or (cfg.device == "auto" and gpus >= cfg.workers)
        if cfg.device == "cuda" and gpus < cfg.workers:
            log.warning("Ray cluster has %d GPU(s) for %d workers: workers will wait for GPUs", gpus, cfg.workers)
        log.info(
            "Ray Train: %d worker(s), %s, backend %s",
            cfg.workers,
            "GPU" if use_gpu else "CPU",
            "nccl" if use_gpu else "gloo",
        )
        images_ref = ray.put(data.images)
        trainer = TorchTrainer(
            _worker_loop,  # type: ignore[arg-type]  # Ray Train v2 passes rank 0's return value back; its hint says None
            train_loop_config={
                "cfg": cfg.model_dump(mode="json"),
                "tasks": tasks.to_dict(),
                "images": [images_ref],
                "targets": data.targets,
                "split": split,
            },
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=None if use_gpu else {"CPU": 1}
            ),
            run_config=RunConfig(name=f"catalog-tagger-train-{os.getpid()}", storage_path=cfg.ray_storage_path),
        )
        try:
            result = trainer.fit()
            if result.error is not None:
                raise result.error
        except Exception as err:
            found = _user_error(err)
            if found is None:
                raise
            raise found from None  # one line (a diverged loss), not Ray's page of worker tracebacks
        value = getattr(result, "return_value", None)  # Ray Train v2's Result (the default); v1's has none
        if not value:
            raise RuntimeError("Ray Train finished without rank 0's trained weights")
        model = MultiHeadModel(backbone=cfg.backbone, tasks=tasks, dropout=cfg.dropout)
        model.load_state_dict(st_load(value["state"]), strict=True)
        return model, FitResult(**value["fit"])
    finally:
        if started:
            ray.shutdown()
