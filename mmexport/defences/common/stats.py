"""Small statistics the defences share: stratified folds of the clean set, balanced accuracy."""

from __future__ import annotations

import numpy as np
import torch


def fold_ids(y: np.ndarray, folds: int, seed: int, *, stagger: bool = True) -> np.ndarray:
    """A fold number per sample, stratified by label, seeded.

    Each class's samples are dealt round the folds in a seeded order; with `stagger` each
    class starts where the previous one stopped, so small classes do not all fill fold 0.
    """
    rng = np.random.default_rng(seed)
    ids = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        ids[idx] = (np.arange(len(idx)) + offset) % folds
        if stagger:
            offset += len(idx)
    return ids


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """Held-out index sets, each class spread evenly over the folds (every class from fold 0)."""
    ids = fold_ids(y, folds, seed, stagger=False)
    return [np.flatnonzero(ids == f) for f in range(folds)]


def balanced_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """Mean per-class recall over the classes present in `y`."""
    recalls = [float((pred[y == c] == c).float().mean()) for c in range(num_classes) if (y == c).any()]
    return float(np.mean(recalls)) if recalls else 0.0
