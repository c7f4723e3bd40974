"""Loss balancing: the fixed weights of tasks.yaml, and uncertainty weighting (Kendall, Gal & Cipolla 2018) whose
log-variances are trained with the model, averaged across DDP ranks, and reported but never saved in the artifact."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from catalog_tagger.config import parse_tasks
from catalog_tagger.model.artifact import load_artifact
from catalog_tagger.train.losses import FixedBalance, UncertaintyBalance, combine_losses, make_balance

MIXED = parse_tasks(
    {
        "tasks": [
            {"name": "shape", "kind": "multiclass", "labels": ["square", "circle"], "weight": 2.0},
            {"name": "badges", "kind": "multilabel", "labels": ["sale", "logo"]},
            {"name": "area", "kind": "regression"},
        ]
    }
).tasks

# (sum of per-image losses, labelled images) per task: means 2.0, 0.5 and 3.0
PARTS = {
    "shape": (torch.tensor(6.0), torch.tensor(3.0)),
    "badges": (torch.tensor(2.0), torch.tensor(4.0)),
    "area": (torch.tensor(9.0), torch.tensor(3.0)),
}


def test_fixed_balance_is_the_weighted_sum():
    assert float(FixedBalance(MIXED)(PARTS)) == pytest.approx(2.0 * 2.0 + 0.5 + 3.0)
    assert float(combine_losses(PARTS, MIXED)) == pytest.approx(7.5)
    assert not list(make_balance("fixed", MIXED).parameters())


def test_uncertainty_formula_on_hand_numbers():
    """sum_t c_t exp(-s_t) L_t + 0.5 s_t, c = 1 (classification) or 0.5 (regression)."""
    bal = UncertaintyBalance(MIXED)
    with torch.no_grad():
        bal.log_var.copy_(torch.tensor([0.5, -1.0, 2.0]))
    expected = (
        1.0 * math.exp(-0.5) * 2.0 + 0.25  # shape
        + 1.0 * math.exp(1.0) * 0.5 - 0.5  # badges
        + 0.5 * math.exp(-2.0) * 3.0 + 1.0  # area (Gaussian: 1 / (2 sigma^2))
    )  # fmt: skip
    assert float(bal(PARTS).detach()) == pytest.approx(expected, rel=1e-6)
    w = bal.weights()
    assert w["shape"] == pytest.approx(math.exp(-0.5)) and w["area"] == pytest.approx(0.5 * math.exp(-2.0))


def test_uncertainty_starts_at_the_fixed_weights():
    """s_t starts at log(c_t / weight_t): the first steps weigh the tasks as tasks.yaml does."""
    bal = UncertaintyBalance(MIXED)
    assert bal.weights() == pytest.approx({"shape": 2.0, "badges": 1.0, "area": 1.0})
    assert bal.log_vars() == pytest.approx({"shape": math.log(0.5), "badges": 0.0, "area": math.log(0.5)})


def test_log_variances_get_gradients_towards_the_balance():
    """d/ds_t = -c_t exp(-s_t) L_t + 0.5: a task whose loss is large gets its weight lowered, and the optimum is a
    multiplier of 1 / (2 L_t) for every kind; a task without labels in the batch gets no gradient at all."""
    bal = UncertaintyBalance(MIXED)
    parts = dict(PARTS, badges=(torch.tensor(0.0), torch.tensor(0.0)))  # no badge labelled in this batch
    bal(parts).backward()
    g = bal.log_var.grad
    assert g is not None
    assert float(g[0]) == pytest.approx(-2.0 * 2.0 + 0.5)  # c exp(-s) = weight 2, L = 2
    assert float(g[1]) == 0.0
    assert float(g[2]) == pytest.approx(-1.0 * 3.0 + 0.5)
    opt = torch.optim.SGD(bal.parameters(), lr=0.2)
    for _ in range(300):  # plain descent on the balance alone converges to the stationary point
        opt.zero_grad()
        bal(PARTS).backward()
        opt.step()
    assert bal.weights() == pytest.approx({"shape": 1 / 4.0, "badges": 1 / 1.0, "area": 1 / 6.0}, rel=1e-3)


def test_uncertainty_training_moves_the_log_variances_and_keeps_them_out_of_the_artifact(tiny_cfg, tmp_path):
    from catalog_tagger.train.pipeline import train

    res = train(tiny_cfg(tmp_path / "m", loss_balance="uncertainty", epochs=2))
    report = json.loads((tmp_path / "m" / "training_report.json").read_text())
    learned = report["loss_balance"]
    assert learned["mode"] == "uncertainty"
    tasks = [t["name"] for t in res.card.tasks]
    assert set(learned["weights"]) == set(tasks) == set(learned["log_vars"])
    init = {
        t["name"]: math.log((0.5 if t["kind"] == "regression" else 1.0) / t.get("weight", 1.0)) for t in res.card.tasks
    }
    assert all(abs(learned["log_vars"][k] - init[k]) > 1e-4 for k in tasks), (learned, init)
    assert res.card.training["loss_balance"] == "uncertainty"
    model, _ = load_artifact(tmp_path / "m")
    assert not [k for k in model.state_dict() if "log_var" in k or "balance" in k]
    df = pd.read_csv(tmp_path / "m" / "metrics.csv")
    assert {f"loss_weight_{k}" for k in tasks} <= set(df.columns)
    assert np.isfinite(df["train_loss"]).all()


def test_fixed_training_reports_the_tasks_yaml_weights(tiny_cfg, tmp_path):
    from catalog_tagger.train.pipeline import train

    res = train(tiny_cfg(tmp_path / "m", epochs=1))
    report = json.loads((tmp_path / "m" / "training_report.json").read_text())
    assert report["loss_balance"] == {
        "mode": "fixed",
        "weights": {t["name"]: t.get("weight", 1.0) for t in res.card.tasks},
        "log_vars": None,
    }
    assert not [c for c in pd.read_csv(tmp_path / "m" / "metrics.csv").columns if c.startswith("loss_weight_")]
