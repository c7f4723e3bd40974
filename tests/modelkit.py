"""Test helpers shared by several test modules (imported as a plain module: tests/ is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa


def centred_model(tasks_uri: str, images: list[str], out: Path, seed: int = 0) -> str:
    """A tiny random model whose heads see the standardised embedding, so labels vary across images.

    (A random-init head on raw embeddings gives every image the same arg-max label, which would make label
    counts and filters trivially true.)
    """
    import torch

    from catalog_tagger.config import load_tasks
    from catalog_tagger.decode import decode_image
    from catalog_tagger.model.artifact import card_for, save_artifact
    from catalog_tagger.model.multihead import build_model

    torch.manual_seed(seed)
    model = build_model(backbone="tiny_cnn", tasks=load_tasks(tasks_uri)).eval()
    batch = np.stack([decode_image(Path(u).read_bytes(), 32).array for u in images])
    with torch.no_grad():
        emb = model.forward_features(model.prepare(batch))
        mean, std = emb.mean(0), emb.std(0).clamp_min(1e-3)
        for head in model.heads.values():
            w = torch.randn_like(head.weight) / std
            head.weight.copy_(w)
            head.bias.copy_(-(w @ mean))
    save_artifact(model, card_for(model, image_size=32), out)
    return str(out)


def committed_rows(out: str | Path, storage_options: dict | None = None) -> pa.Table:
    """Every committed row of the history table, read through its Delta log (what readers see), sorted by uri;
    local or any fsspec store."""
    from catalog_tagger.tag import commit, delta

    table = commit.Layout(str(out), storage_options).history()
    if table is None:
        return pa.table({"uri": pa.array([], pa.string())})
    return delta.dataset(table).to_table().sort_by("uri")
