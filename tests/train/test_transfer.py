"""The transfer-learning schedule: heads only while the backbone is frozen, then the backbone at lr x factor (its
own parameter group, through cosine and plateau schedules), early stopping that waits for the unfrozen phase, and
the same on Ray Train (DDP)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from catalog_tagger.train.config import TrainConfig
from catalog_tagger.train.data import TrainData
from catalog_tagger.train.loop import fit, new_model
from catalog_tagger.train.schedule import group_lr, make_optimizer, make_scheduler
from catalog_tagger.train.split import Split


def _cfg(**kw) -> TrainConfig:
    base = dict(tasks="t.yaml", labels="l.parquet", out="o", backbone="tiny_cnn", image_size=32, epochs=3,
                batch_size=16, progress=False, lr=1e-2)  # fmt: skip
    return TrainConfig.parse(**{**base, **kw})


def _data(tasks, n: int = 48) -> tuple[TrainData, Split]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    targets = {}
    for t in tasks.tasks:
        if t.kind == "multilabel":
            targets[t.name] = rng.integers(0, 2, (n, len(t.labels))).astype(np.float32)
        else:
            targets[t.name] = rng.integers(0, len(t.labels), n).astype(np.int64)
    idx = np.arange(n)
    split = Split(train=idx[:32], val=idx[32:40], test=idx[40:], stratify=None, fractions={}, seed=0)
    return TrainData(images=images, targets=targets), split


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_backbone_is_untouched_then_trains(three_tasks):
    """Epoch 1 (frozen): every backbone tensor (BatchNorm statistics too) is as initialised while the heads move;
    epoch 2 (unfrozen): the backbone moves."""
    cfg = _cfg(freeze_backbone_epochs=1, epochs=2, patience=5)
    data, split = _data(three_tasks)
    model = new_model(cfg, three_tasks, torch.device("cpu"))
    seen = [(_snapshot(model.backbone), _snapshot(model.heads))]
    res = fit(model, data, split, cfg, torch.device("cpu"),
              on_epoch=lambda _: seen.append((_snapshot(model.backbone), _snapshot(model.heads))))  # fmt: skip
    (b0, h0), (b1, h1), (b2, _) = seen
    assert _same(b0, b1), "the backbone changed while frozen"
    assert not _same(h0, h1), "the heads did not train in the frozen epoch"
    assert not _same(b1, b2), "the backbone did not train after unfreezing"
    assert res.history[0]["backbone_lr"] == 0.0 and res.history[1]["backbone_lr"] > 0
    assert all(p.requires_grad for p in model.parameters())  # fit hands the model back whole


@pytest.mark.parametrize("scheduler", ["cosine", "plateau"])
def test_backbone_group_keeps_its_ratio_through_the_schedule(three_tasks, scheduler):
    cfg = _cfg(backbone_lr_factor=0.1, scheduler=scheduler, plateau_patience=0, epochs=4)
    model = new_model(cfg, three_tasks, torch.device("cpu"))
    opt = make_optimizer(model, torch.nn.Module(), cfg)
    sched = make_scheduler(opt, cfg)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["heads", "backbone"]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in model.backbone.parameters()}
    for _ in range(3):
        opt.step()
        sched.step(1.0) if scheduler == "plateau" else sched.step()  # plateau: no improvement, cuts every epoch
        assert group_lr(opt, "backbone") == pytest.approx(0.1 * group_lr(opt, "heads"))
    assert group_lr(opt, "heads") < cfg.lr


def test_cosine_floor_is_per_group(three_tasks):
    """A backbone started below 1% of the heads' LR still only decays (CosineAnnealingLR's one eta_min would not)."""
    cfg = _cfg(backbone_lr_factor=0.001, epochs=5)
    opt = make_optimizer(new_model(cfg, three_tasks, torch.device("cpu")), torch.nn.Module(), cfg)
    sched = make_scheduler(opt, cfg)
    lrs = [group_lr(opt, "backbone")]
    for _ in range(5):
        opt.step()
        sched.step()
        lrs.append(group_lr(opt, "backbone"))
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] == pytest.approx(cfg.lr * 0.001 * 0.01)


def test_early_stopping_waits_for_the_unfrozen_phase(three_tasks):
    """With no epoch ever counting as an improvement after the first (min_delta huge) and patience 1, a plain run
    stops after epoch 2; frozen for 3 epochs it runs on, and the unfrozen phase gets a full patience (epoch 4)."""
    data, split = _data(three_tasks)
    plain = _cfg(patience=1, min_delta=1e9, epochs=6)
    assert (
        fit(new_model(plain, three_tasks, torch.device("cpu")), data, split, plain, torch.device("cpu")).epochs_run == 2
    )
    frozen = _cfg(patience=1, min_delta=1e9, epochs=6, freeze_backbone_epochs=3)
    res = fit(new_model(frozen, three_tasks, torch.device("cpu")), data, split, frozen, torch.device("cpu"))
    assert res.epochs_run == 4 and res.stopped_early


def test_schedule_options_are_validated():
    from catalog_tagger.errors import ConfigError

    for bad in ({"backbone_lr_factor": 0}, {"backbone_lr_factor": 2}, {"freeze_backbone_epochs": -1},
                {"loss_balance": "gradnorm"}):  # fmt: skip
        with pytest.raises(ConfigError):
            _cfg(**bad)


@pytest.mark.slow
def test_train_with_timm_weights_and_a_frozen_backbone_keeps_the_files_tensors(tiny_cfg, tmp_path):
    """Train with ``--weights`` (a folder) and the backbone frozen for every epoch: the artifact's backbone is the
    file's, tensor for tensor (BatchNorm statistics included), while the heads trained."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    from catalog_tagger.model.artifact import load_artifact
    from catalog_tagger.train.pipeline import train

    folder = tmp_path / "w"
    folder.mkdir()
    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=10).state_dict().items()}
    save_file(state, str(folder / "resnet-tiny.safetensors"))
    cfg = tiny_cfg(tmp_path / "m", backbone="timm/test_resnet", weights=str(folder), epochs=2, freeze_backbone_epochs=2)
    res = train(cfg)
    model, card = load_artifact(tmp_path / "m")
    for k, v in model.backbone.model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert card.training["backbone"] == {"name": "timm/test_resnet", "weights": str(folder), "provider": "timm",
                                         "timm_version": timm.__version__}  # fmt: skip
    assert card.training["transfer"] == {"freeze_backbone_epochs": 2, "backbone_lr_factor": 1.0}
    assert [r["backbone_lr"] for r in res.history] == [0.0, 0.0]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_ray_train_freezes_unfreezes_and_learns_the_balance(tiny_cfg, tmp_path):
    """Two DDP workers: a frozen first epoch (DDP finds the unused backbone parameters), an unfrozen second at
    lr x 0.1, and the uncertainty weights averaged across ranks; the artifact loads and holds no balance."""
    from catalog_tagger.model.artifact import load_artifact
    from catalog_tagger.train.pipeline import train

    cfg = tiny_cfg(tmp_path / "m", workers=2, epochs=2, freeze_backbone_epochs=1, backbone_lr_factor=0.1,
                   loss_balance="uncertainty")  # fmt: skip
    res = train(cfg)
    assert res.epochs_run == 2
    df = pd.read_csv(tmp_path / "m" / "metrics.csv")
    assert df["backbone_lr"].tolist()[0] == 0.0 and df["backbone_lr"].tolist()[1] == pytest.approx(
        0.1 * df["lr"].tolist()[1], rel=1e-3
    )
    report = json.loads((tmp_path / "m" / "training_report.json").read_text())
    assert report["loss_balance"]["mode"] == "uncertainty"
    assert all(np.isfinite(v) for v in report["loss_balance"]["weights"].values())
    model, _ = load_artifact(tmp_path / "m")
    assert not [k for k in model.state_dict() if "log_var" in k]
