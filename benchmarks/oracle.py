"""The oracle limit: what clipping can do when the trigger is known.

Bounds fitted with the attack set as an oracle (logit preservation on D plus
cross-entropy pushing half of the triggered images back to their true class), measured
on the other half. A measurement of what per-channel clipping could achieve on a model,
never an input to mmexport's defaults.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmexport.core.data import load_npz  # noqa: E402
from mmexport.core.model import load_model  # noqa: E402
from mmexport.defences.common.search import descend, initial_bounds  # noqa: E402
from mmexport.engine.executor import Engine  # noqa: E402


def _sample(folder: Path):
    """The sample's engine and its clean, test and attack sets."""
    engine = Engine(load_model(folder / "model.onnx"))
    clean, test = load_npz(folder / "clean.npz"), load_npz(folder / "test.npz")
    return engine, clean, test, load_npz(folder / "attack.npz", attack=True)


def _hit_rate(engine: Engine, x: torch.Tensor, y: torch.Tensor, bounds: dict | None = None) -> float:
    """The fraction of x the (bounded) model sends to y: accuracy, or ASR with y the target."""
    with torch.no_grad():
        return float((engine(x, bounds).argmax(1) == y).float().mean())


def _scaled(z0: dict, rel: dict) -> dict:
    return {k: z0[k] * rel[k] for k in z0}


def oracle(
    folder: Path, *, epochs: int = 300, weight: float = 1.0, lr: float = 0.02, seed: int = 0, max_drop: float = 0.03
) -> dict:
    torch.manual_seed(seed)
    engine, clean, test, attack = _sample(folder)
    x = torch.from_numpy(clean.x)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(attack))
    fit_i, eval_i = order[: len(order) // 2], order[len(order) // 2 :]
    ax, ay = torch.from_numpy(attack.x[fit_i]), torch.from_numpy(attack.y_true[fit_i])
    ex, et = torch.from_numpy(attack.x[eval_i]), torch.from_numpy(attack.y[eval_i])
    tx, ty = torch.from_numpy(test.x), torch.from_numpy(test.y)
    with torch.no_grad():
        ref = engine(x)
    base_acc = _hit_rate(engine, tx, ty)
    scale = ref.var(dim=0).sum()
    z0 = initial_bounds(engine, x, "channel")
    rel = {k: torch.ones_like(v, requires_grad=True) for k, v in z0.items()}
    opt = torch.optim.Adam(list(rel.values()), lr=lr)
    best = None
    for epoch in range(epochs):
        b = _scaled(z0, rel)
        fit = ((engine(x, b) - ref) ** 2).sum(1).mean() / scale
        ce = torch.nn.functional.cross_entropy(engine(ax, b), ay)
        descend(opt, fit + weight * ce, rel)
        if epoch % 10 == 9:
            b = _scaled(z0, rel)
            acc, asr = _hit_rate(engine, tx, ty, b), _hit_rate(engine, ex, et, b)
            if acc >= base_acc - max_drop and (best is None or asr < best["asr"]):
                best = {"epoch": epoch + 1, "acc": acc, "asr": asr}
    return {"model": folder.name, "acc_before": base_acc, **(best or {})}


def relaxed_oracle(
    folder: Path,
    *,
    weights: tuple = (0.1, 0.3, 1.0),
    epochs: int = 400,
    lr: float = 0.005,
    seed: int = 0,
    max_drop: float = 0.03,
) -> dict:
    """A relaxation: bounds fitted on the whole test set (its labels) and the whole attack set,
    scored on the same images. Any bounds a real defence could find are candidates here, so
    where the best point found misses ASR <= 5% within `max_drop`, no defence that only sets
    per-channel upper bounds is likely to meet it on this model (an optimiser's evidence,
    not a proof). Defaults: the settings of docs/experiments.md, section 20."""
    engine, clean, test, attack = _sample(folder)
    tx, ty = torch.from_numpy(test.x), torch.from_numpy(test.y)
    ax, ay, at = (torch.from_numpy(a) for a in (attack.x, attack.y_true, attack.y))
    base_acc, base_asr = _hit_rate(engine, tx, ty), _hit_rate(engine, ax, at)
    z0 = initial_bounds(engine, torch.cat([torch.from_numpy(clean.x), tx]), "channel")
    runs = []
    for weight in weights:
        torch.manual_seed(seed)
        rel = {k: torch.ones_like(v, requires_grad=True) for k, v in z0.items()}
        opt = torch.optim.Adam(list(rel.values()), lr=lr)
        best = None
        for epoch in range(epochs):
            b = _scaled(z0, rel)
            loss = torch.nn.functional.cross_entropy(engine(tx, b), ty)
            loss = loss + weight * torch.nn.functional.cross_entropy(engine(ax, b), ay)
            descend(opt, loss, rel)
            if epoch % 5 == 4:
                b = _scaled(z0, rel)
                acc, asr = _hit_rate(engine, tx, ty, b), _hit_rate(engine, ax, at, b)
                if acc >= base_acc - max_drop - 1e-9 and (best is None or asr < best["asr"]):
                    best = {"epoch": epoch + 1, "acc": round(acc, 4), "asr": round(asr, 4)}
        runs.append({"weight": weight, **(best or {})})
    feasible = [r for r in runs if "asr" in r]
    top = min(feasible, key=lambda r: r["asr"]) if feasible else {}
    return {"model": folder.name, "acc_before": base_acc, "asr_before": base_asr, "best": top, "runs": runs}


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    relaxed = "--relaxed" in sys.argv
    names = args or sorted(p.parent.name for p in (ROOT / "sample_models").glob("*/attack.npz"))
    for name in names:
        fn = relaxed_oracle if relaxed else oracle
        print(json.dumps(fn(ROOT / "sample_models" / name)), flush=True)
