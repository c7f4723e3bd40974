"""Training data: augmentation on tensors (an exact flip, crops that keep shape and range), and the decode cache's
bounded reads."""

from __future__ import annotations

import pytest
import torch

from catalog_tagger.fetch import DEFAULT_MAX_IMAGE_BYTES
from catalog_tagger.train.data import Augment, decode_all


def test_augment_flip_is_exact_and_crop_keeps_shape():
    x = torch.rand(4, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    flipped = Augment(crop_scale=(1.0, 1.0), hflip=True)(x, gen)
    for i in range(4):
        assert torch.allclose(flipped[i], x[i], atol=1e-5) or torch.allclose(flipped[i], x[i].flip(-1), atol=1e-5)
    cropped = Augment(crop_scale=(0.6, 1.0), hflip=False, color_jitter=0.2)(x, gen)
    assert cropped.shape == x.shape and float(cropped.min()) >= 0 and float(cropped.max()) <= 1


@pytest.mark.timeout(60)
def test_decode_all_reads_with_the_tagging_bounds(catalog, tmp_path):
    """A FIFO or a file over the size cap in a labels table is a skipped image, never a hang or a memory blow-up."""
    import os

    fifo = tmp_path / "stuck.jpg"
    os.mkfifo(fifo)
    big = tmp_path / "big.jpg"
    with open(big, "wb") as fh:
        fh.truncate(DEFAULT_MAX_IMAGE_BYTES + 1)  # sparse: costs no disk
    uris = [catalog.images[0], str(fifo), str(big)]
    cache, ok, failures = decode_all(uris, 16, threads=2)
    assert ok.tolist() == [True, False, False]
    reasons = {f["uri"]: f["error"] for f in failures}
    assert "not a regular file" in reasons[str(fifo)]
    assert "larger than" in reasons[str(big)]
    assert cache[0].any()
