"""The split: fractions, stratification (missing labels their own stratum), and the seed."""

from __future__ import annotations

import numpy as np

from catalog_tagger.train.split import make_split


def test_split_fractions_stratified_and_seeded(three_tasks):
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=2000, p=[0.6, 0.3, 0.1])
    y[rng.random(2000) < 0.1] = -1  # missing labels form their own stratum
    targets = {"shape": y, "color": np.zeros(2000, np.int64), "badges": np.zeros((2000, 3), np.float32)}
    split = make_split(three_tasks, targets, val=0.15, test=0.15, seed=7)
    counts = split.counts()
    assert sum(counts.values()) == 2000
    assert abs(counts["val"] - 300) <= 4 and abs(counts["test"] - 300) <= 4
    assert split.stratify == "shape"
    all_idx = np.concatenate([split.train, split.val, split.test])
    assert np.array_equal(np.sort(all_idx), np.arange(2000))
    for cls in (-1, 0, 1, 2):
        overall = np.mean(y == cls)
        for part in (split.train, split.val, split.test):
            assert abs(np.mean(y[part] == cls) - overall) < 0.015
    again = make_split(three_tasks, targets, val=0.15, test=0.15, seed=7)
    assert np.array_equal(again.test, split.test)
    other = make_split(three_tasks, targets, val=0.15, test=0.15, seed=8)
    assert not np.array_equal(other.test, split.test)
