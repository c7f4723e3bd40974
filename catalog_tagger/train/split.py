"""The train/val/test split: seeded, stratified on the first task a split can stratify on, and its digest."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from catalog_tagger.config import TaskConfig
from catalog_tagger.kinds import kind_of

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """Index arrays into the decoded data; ``stratify`` is the task the split was stratified on."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    stratify: str | None
    fractions: dict[str, float]
    seed: int

    def counts(self) -> dict[str, int]:
        return {"train": int(self.train.size), "val": int(self.val.size), "test": int(self.test.size)}

    def names(self, n: int) -> list[str]:
        """The split name of each of the ``n`` images, in index order."""
        out = [""] * n
        for name in SPLITS:
            for i in getattr(self, name):
                out[int(i)] = name
        return out

    def held_out(self) -> np.ndarray:
        """The images to time models on: test, else val, else train (tiny tables)."""
        return self.test if self.test.size else (self.val if self.val.size else self.train)


def make_split(tasks: TaskConfig, targets: dict[str, np.ndarray], *, val: float, test: float, seed: int) -> Split:
    """Seeded split, stratified on the first task whose kind allows it (a multiclass task); images without that
    label form their own stratum. Each stratum is rounded on its own, and keeps at least one image to train on.
    """
    first = next((t for t in tasks.tasks if kind_of(t).stratifies), None)
    n = len(next(iter(targets.values())))
    strata = targets[first.name] if first is not None else np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng([seed, 0x5EED])
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for value in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == value))
        m = members.size
        n_test = math.floor(m * test + 0.5)
        n_val = math.floor(m * val + 0.5)
        if m > 1 and n_test + n_val >= m:  # tiny stratum: keep at least one image to train on
            n_test = min(n_test, m - 1)
            n_val = min(n_val, m - 1 - n_test)
        parts["test"].append(members[:n_test])
        parts["val"].append(members[n_test : n_test + n_val])
        parts["train"].append(members[n_test + n_val :])
    arrays = {k: np.sort(np.concatenate(v)) if v else np.zeros(0, dtype=np.int64) for k, v in parts.items()}
    return Split(
        train=arrays["train"],
        val=arrays["val"],
        test=arrays["test"],
        stratify=first.name if first is not None else None,
        fractions={"train": round(1 - val - test, 6), "val": val, "test": test},
        seed=seed,
    )


def split_digest(uris: Sequence[str], names: Sequence[str]) -> str:
    """sha256 of the (uri, split) pairs, order-free: two runs trained on the same split share it."""
    h = hashlib.sha256()
    for u, s in sorted(zip(uris, names, strict=True)):
        h.update(f"{u}\t{s}\n".encode())
    return h.hexdigest()
