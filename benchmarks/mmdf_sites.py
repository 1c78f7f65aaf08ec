"""Where MMDF's feature test finds triggers, site by site, and how the sites' scores are joined.

For each model (`sample_models/NAME` or `sample_models/real/NAME`): the channel statistics of
every site on D (with its 1-pixel shifts), the test set, the attack set and, for the real tier,
fresh clean scenes (`mmdf_null.fresh_clean`); each site's Gaussian fitted and cross-fitted
alone (`fit_features`, ten folds, seed 0). Then, with no focus class (every input scored against
its predicted class), the feature test alone at alpha / 2 = 0.25% (`fit_image_null`):

- each site alone, and all sites with their scores put on one scale before the max:
  quantile (divided by the 0.9 quantile of the site's clean scores: shipped), tail
  ((s - u) / b, u that quantile, b the mean excess over it), held out (the tail fitted, for each
  fold of D, on the other folds' scores).

Prints FPR on the test set (and test + fresh on the real tier) and detection on the attack set,
in %. docs/experiments.md#mmdf-site-tails has the results. Usage:
    python benchmarks/mmdf_sites.py --models digits-gelu-cnn,real-vgg-badnet [--renders 4]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmexport.core.conventions import input_layout  # noqa: E402
from mmexport.core.data import as_dataset  # noqa: E402
from mmexport.core.model import as_model  # noqa: E402
from mmexport.core.threads import using_threads  # noqa: E402
from mmexport.defences.common.checks import check_original, with_site_shapes  # noqa: E402
from mmexport.defences.common.stats import fold_ids  # noqa: E402
from mmexport.defences.mmdf.bounds import shifted  # noqa: E402
from mmexport.defences.mmdf.features import fit_features, site_feature_arrays  # noqa: E402
from mmexport.defences.mmdf.null import fit_image_null, fit_null  # noqa: E402

ALPHA_EACH = 0.0025
QUANTILE = 0.9
RULES = ("quantile", "tail", "held out")


def tail_of(scores: np.ndarray) -> tuple[float, float]:
    """(u, b) of MMDF's exponential-tail law (`fit_null`): the QUANTILE quantile and the mean
    excess over it; (0, 1) without a tail."""
    params = fit_null(scores, law="exponential-tail", tail=1 - QUANTILE).params
    u, b = params["u"], params["beta"]
    return (u, b) if np.isfinite(b) and b > 0 else (0.0, 1.0)


def raw_scores(m, k: int, x_d, y_d, folds, sets: dict) -> tuple[np.ndarray, dict]:
    """Per site: D's cross-fitted scores [sites, rows] and each set's scores [sites, n]."""
    def stats(x):
        return site_feature_arrays(m.proto, m.sites, x, input_name=m.input_name, output_name=m.output_name)

    feats_d, logits_d = stats(x_d)
    got = {name: stats(x) for name, x in sets.items()}
    null, scored = [], {name: [] for name in sets}
    for site in feats_d:
        fit = fit_features({site: feats_d[site]}, y_d, logits_d.argmax(1), k, folds)
        g = fit.sites[0]
        null.append(fit.null * g.scale)  # undo the shipped division: the raw score
        for name, (feats, logits) in got.items():
            scored[name].append(g.score(feats[site], logits.argmax(1)) * g.scale)
    return np.array(null), {name: np.array(v) for name, v in scored.items()}


def flags(null: np.ndarray, scored: dict, images: int, folds: np.ndarray, rule: str,
          sites: list[int] | None = None) -> dict:
    """Each set's flags under one way of joining the sites (or the sites listed, quantile)."""
    if sites is not None:
        null, scored = null[sites], {n: s[sites] for n, s in scored.items()}
    if rule == "quantile":
        u, b = np.zeros((len(null), 1)), np.quantile(null, QUANTILE, axis=1)[:, None]
    else:
        u, b = np.hsplit(np.array([tail_of(s) for s in null]), 2)
    normed = (null - u) / b
    if rule == "held out":  # each fold of D on the tail of the other folds
        for j in np.unique(folds):
            out = folds == j
            for i, s in enumerate(null):
                uu, bb = tail_of(s[~out])
                normed[i, out] = (s[out] - uu) / bb
    top = normed.max(axis=0)
    threshold = fit_image_null(top, images, np.ones(len(top), bool), ALPHA_EACH).threshold
    return {n: ((s - u) / b).max(axis=0) > threshold for n, s in scored.items()}


def study(name: str, renders: int) -> list[str]:
    folder = ROOT / "sample_models" / ("real" if name.startswith("real") else "") / name
    m = as_model(folder / "model.onnx")
    k = check_original(m)
    clean = as_dataset(folder / "clean.npz", model=m)
    m = with_site_shapes(m, clean.x)
    x_d = shifted(clean.x, input_layout(m, None).channel_axis)
    copies = len(x_d) // len(clean)
    folds = np.tile(fold_ids(clean.y, 10, 0), copies)
    sets = {"test": np.load(folder / "test.npz")["x"].astype(np.float32)}
    if (folder / "attack.npz").exists():
        sets["attack"] = np.load(folder / "attack.npz")["x"].astype(np.float32)
    if name.startswith("real") and renders:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from mmdf_null import fresh_clean

        sets["fresh"] = fresh_clean(renders)[0]
    null, scored = raw_scores(m, k, x_d, np.tile(clean.y, copies), folds, sets)

    def row(f: dict) -> str:
        fpr = f["test"].mean() * 100
        if "fresh" in f:
            both = np.concatenate([f["test"], f["fresh"]]).mean() * 100
            fpr_text = f"{fpr:.2f} (with fresh {both:.2f})"
        else:
            fpr_text = f"{fpr:.2f}"
        det = f"{f['attack'].mean() * 100:.1f}" if "attack" in f else "-"
        return f"{fpr_text} / {det}"

    lines = [f"{name}: {len(null)} sites; FPR / detection, %"]
    for rule in RULES:
        lines.append(f"  all sites, {rule}: {row(flags(null, scored, len(clean), folds, rule))}")
    for i in range(len(null)):
        lines.append(f"  site {i} alone: {row(flags(null, scored, len(clean), folds, 'quantile', [i]))}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True, help="comma-separated sample names")
    ap.add_argument("--renders", type=int, default=4, help="fresh scene seeds for the real tier (0: none)")
    args = ap.parse_args()
    with using_threads(1):
        for name in args.models.split(","):
            print("\n".join(study(name, args.renders)), flush=True)


if __name__ == "__main__":
    main()
