"""Ray Train: two data-parallel workers produce the same kind of artifact as one process."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from catalog_tagger.model.artifact import load_artifact
from catalog_tagger.train.pipeline import train


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_ray_train_two_workers_yields_a_loadable_artifact(tiny_cfg, tmp_path):
    res = train(tiny_cfg(tmp_path / "m", workers=2, epochs=2))
    model, card = load_artifact(tmp_path / "m")
    assert card.training["workers"] == 2
    assert res.epochs_run == 2 and len(res.history) == 2
    df = pd.read_csv(tmp_path / "m" / "metrics.csv")
    assert len(df) == 2 and "val_garment_accuracy" in df.columns
    x = torch.randint(0, 255, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        out = model(model.prepare(x))
    assert out.logits["garment"].shape == (2, 5)
