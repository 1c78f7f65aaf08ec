"""MMOM's settings chosen on the clean set alone: stratified k-fold over lambda.

Non-malicious overfitting (class imbalance, over-training) has no accuracy floor to hold:
the clipped model should classify better, not just as well. So lambda is not driven by a
floor; each candidate is fitted on part of D and scored by balanced accuracy on the rest,
and the winner is refitted on all of D. Class frequencies of the training set are never
used (they are unknown to the user).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from ..common.config import SearchConfig
from ..common.margins import Box
from ..common.search import SearchResult, fit_bounds
from ..common.stats import balanced_accuracy, stratified_folds

LAMBDA_GRID = (0.0, 0.1, 0.3, 1.0, 3.0)


def fit_mmom(
    engine,
    x: torch.Tensor,
    y: torch.Tensor,
    box: Box,
    num_classes: int,
    config: SearchConfig,
    *,
    grid=LAMBDA_GRID,
    folds: int = 2,
    progress: Callable[[dict], None] | None = None,
    chunk: int | None = None,
) -> tuple[SearchResult, list[dict]]:
    """Cross-validate lambda on D, then fit on all of D; returns the fit and the CV table."""
    cfg = replace(config, method="mmom", controller="fixed", augment=False)
    held = stratified_folds(y.cpu().numpy(), folds, config.seed)
    table = []
    for lam in grid:
        scores = []
        for k, out_idx in enumerate(held):
            mask = torch.ones(len(y), dtype=torch.bool)
            mask[torch.from_numpy(out_idx)] = False
            res = fit_bounds(
                engine, x[mask], y[mask], box, num_classes, replace(cfg, lambda0=lam, seed=config.seed + k),
                chunk=chunk,
            )
            bounds = {n: torch.from_numpy(v).to(x.device) for n, v in res.bounds.items()}
            with torch.no_grad():
                pred = engine(x[~mask], bounds).argmax(1)
            scores.append(balanced_accuracy(pred, y[~mask], num_classes))
        row = {"lambda": lam, "balanced_accuracy": float(np.mean(scores)), "folds": scores}
        table.append(row)
        if progress is not None:
            progress({"cv": row})
    with torch.no_grad():
        pred = engine(x).argmax(1)
    base = float(np.mean([balanced_accuracy(pred[i], y[i], num_classes) for i in map(torch.from_numpy, held)]))
    table.append({"lambda": None, "balanced_accuracy": base, "note": "no clipping (the original model)"})
    best = max(table[:-1], key=lambda r: (r["balanced_accuracy"], r["lambda"]))
    if progress is not None:
        progress({"stage": "max-margin search"})
    final = fit_bounds(engine, x, y, box, num_classes, replace(cfg, lambda0=best["lambda"]), progress=progress,
                       chunk=chunk)
    if best["balanced_accuracy"] <= base:
        # No clipping setting beat the original on held-out data: keep the model's behaviour
        # (bounds at the clean maxima clip nothing seen in D).
        final = fit_bounds(engine, x, y, box, num_classes, replace(cfg, lambda0=0.0, max_epochs=0), chunk=chunk)
    return final, table
