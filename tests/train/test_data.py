"""Augmentation on tensors: an exact flip, and crops that keep the shape and the value range."""

from __future__ import annotations

import torch

from catalog_tagger.train.data import Augment


def test_augment_flip_is_exact_and_crop_keeps_shape():
    x = torch.rand(4, 3, 16, 16)
    gen = torch.Generator().manual_seed(0)
    flipped = Augment(crop_scale=(1.0, 1.0), hflip=True)(x, gen)
    for i in range(4):
        assert torch.allclose(flipped[i], x[i], atol=1e-5) or torch.allclose(flipped[i], x[i].flip(-1), atol=1e-5)
    cropped = Augment(crop_scale=(0.6, 1.0), hflip=False, color_jitter=0.2)(x, gen)
    assert cropped.shape == x.shape and float(cropped.min()) >= 0 and float(cropped.max()) <= 1
