"""The masked multi-task loss: a missing label contributes exactly nothing."""

from __future__ import annotations

import torch

from catalog_tagger.model.multihead import build_model
from catalog_tagger.train.losses import combine_losses, task_losses


def test_masked_task_gets_exactly_zero_gradient(three_tasks):
    torch.manual_seed(0)
    model = build_model(backbone="tiny_cnn", tasks=three_tasks)
    x = torch.randint(0, 255, (6, 32, 32, 3), dtype=torch.uint8)
    targets = {
        "shape": torch.tensor([0, 1, 2, 0, 1, 2]),
        "color": torch.full((6,), -1, dtype=torch.int64),  # every colour label missing
        "badges": torch.tensor([[1, 0, 0], [0, 1, 1], [-1, -1, -1], [0, 0, 0], [1, 1, 1], [-1, -1, -1]]).float(),
    }
    out = model(model.prepare(x))
    loss = combine_losses(task_losses(out.logits, targets, three_tasks.tasks), three_tasks.tasks)
    loss.backward()
    for p in model.heads["color"].parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    for name in ("shape", "badges"):
        assert torch.count_nonzero(model.heads[name].weight.grad) > 0


def test_missing_rows_do_not_change_the_loss(three_tasks):
    torch.manual_seed(0)
    logits = {"shape": torch.randn(4, 3), "color": torch.randn(4, 2), "badges": torch.randn(4, 3)}
    full = {
        "shape": torch.tensor([0, 1, 2, 0]),
        "color": torch.tensor([1, 0, 1, 0]),
        "badges": torch.tensor([[1, 0, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0]]).float(),
    }
    masked = {k: v.clone() for k, v in full.items()}
    masked["shape"][3] = -1
    masked["badges"][2] = -1
    parts = task_losses(logits, masked, three_tasks.tasks)
    ref = torch.nn.functional.cross_entropy(logits["shape"][:3], full["shape"][:3])
    s, c = parts["shape"]
    assert c == 3 and torch.isclose(s / c, ref)
    keep = torch.tensor([0, 1, 3])
    ref_b = torch.nn.functional.binary_cross_entropy_with_logits(logits["badges"][keep], full["badges"][keep]) * 3
    s, c = parts["badges"]
    assert c == 3 and torch.isclose(s / c, ref_b)
