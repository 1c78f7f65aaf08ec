"""How low can MMDF's false-positive rate go on a model, whatever its thresholds?

For each statistic, the threshold is chosen on the attack set itself (an oracle MMDF cannot
have): the highest one that still flags enough triggered inputs for ASR <= 2%. The clean
test inputs it flags are a floor on the false-positive rate of any threshold set on D. The
inputs the model itself sends to the suspected target by mistake are counted apart: a
statistic that asks "does this input look like its predicted class?" flags them first.

Statistics: MMDF's own margin gap and feature score (`detect` defaults, read from the
graph), their union (the best pair of thresholds), and per-site class-conditional Gaussians
fitted on D and its shifts (`mmexport.features.fit_site`) on channel statistics, 2x2- and
4x4-average-pooled maps or the full maps, scored as the distance to the predicted class or
as that distance minus the distance to the nearest class. Usage:
    python benchmarks/mmdf_floor.py sample_models/digits-cnn-warp [more model folders]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmexport.core.data import load_npz  # noqa: E402
from mmexport.core.model import load_model  # noqa: E402
from mmexport.defences.mmdf.bounds import shifted  # noqa: E402
from mmexport.defences.mmdf.detector import detect  # noqa: E402
from mmexport.defences.mmdf.features import channel_stats, fit_site  # noqa: E402
from mmexport.defences.mmdf.graph import FEATURE_SCORE, SCORE  # noqa: E402
from mmexport.runtime.sessions import session, tensor_summaries  # noqa: E402

ASR_AT_MOST = 0.02


def features_of(a: np.ndarray, kind: str) -> np.ndarray:
    if a.ndim == 2:
        return a
    n, c, h, w = a.shape
    if kind == "stats":
        return channel_stats(a)
    if kind == "full":
        return a.reshape(n, -1)
    g = int(kind[4:])  # pool2, pool4
    if h % g or w % g:
        return channel_stats(a)
    return a.reshape(n, c, g, h // g, g, w // g).mean(axis=(3, 5)).reshape(n, -1)


def distances(g, f: np.ndarray) -> np.ndarray:
    """[N, K]: the site score of every input against every class."""
    return np.stack([g.score(f, np.full(len(f), c)) for c in range(len(g.means))], axis=1)


def floor(on_attack: np.ndarray, sent_attack: np.ndarray, on_test: np.ndarray,
          sent_test: np.ndarray) -> np.ndarray:
    """Clean inputs flagged at the highest threshold that leaves ASR <= 2%."""
    need = sent_attack.mean() - ASR_AT_MOST
    if need <= 0:
        return np.zeros(len(on_test), bool)
    scores = np.sort(on_attack[sent_attack])[::-1]
    k = int(np.ceil(need * len(sent_attack)))
    return (on_test >= scores[k - 1]) & sent_test


def union_floor(da, fa, dt, ft, sent_attack, sent_test) -> np.ndarray:
    best = None
    need = int(np.ceil((sent_attack.mean() - ASR_AT_MOST) * len(sent_attack)))
    for a in np.concatenate([np.unique(da[sent_attack]), [np.inf]]):
        caught = (da >= a) & sent_attack
        rest = np.sort(fa[sent_attack & ~caught])[::-1]
        missing = need - int(caught.sum())
        if missing > len(rest):
            continue
        b = np.inf if missing <= 0 else rest[missing - 1]
        flagged = ((dt >= a) | (ft >= b)) & sent_test
        if best is None or flagged.sum() < best.sum():
            best = flagged
    return best


def run(folder: Path) -> None:
    m = load_model(folder / "model.onnx")
    clean, test = load_npz(folder / "clean.npz"), load_npz(folder / "test.npz")
    attack = load_npz(folder / "attack.npz", attack=True)
    t = int(attack.y[0])
    res = detect(m, clean, device="cpu")
    sess, _ = session(res.model, provider="cpu")
    names = [o.name for o in sess.get_outputs()]
    out = {part: dict(zip(names, sess.run(None, {m.input_name: data.x}), strict=True))
           for part, data in (("test", test), ("attack", attack))}
    sites = [s.name for s in m.sites if s.channels is not None]
    xs = shifted(clean.x)
    ys = np.tile(clean.y, len(xs) // len(clean))
    acts = {part: tensor_summaries(m.proto, [m.output_name, *sites], x, lambda _n, a: a,
                                   input_name=m.input_name)
            for part, x in (("D", xs), ("test", test.x), ("attack", attack.x))}
    predicted = {part: a[m.output_name].argmax(1) for part, a in acts.items()}
    sent_attack, sent_test = predicted["attack"] == t, predicted["test"] == t
    errors = sent_test & (test.y != t)
    print(f"{folder.name}: target {t}; the attack set sent to it {100 * sent_attack.mean():.1f}%; "
          f"{len(test)} clean test inputs, {int(sent_test.sum())} sent to {t}, {int(errors.sum())} of "
          f"them by mistake ({100 * errors.mean():.1f}% of the test set)")

    def show(label: str, flagged: np.ndarray) -> None:
        print(f"  {label:58s} FPR {100 * flagged.mean():5.1f}%  ({int((flagged & errors).sum())} "
              f"of the {int(errors.sum())} mistakes, {int((flagged & ~errors).sum())} others)")

    d = {p: out[p][SCORE] for p in out}
    f = {p: out[p][FEATURE_SCORE] for p in out}
    show("MMDF margin gap d", floor(d["attack"], sent_attack, d["test"], sent_test))
    show("MMDF feature score", floor(f["attack"], sent_attack, f["test"], sent_test))
    show("MMDF union of both", union_floor(d["attack"], f["attack"], d["test"], f["test"],
                                           sent_attack, sent_test))
    for kind in ("stats", "pool2", "pool4", "full"):
        for site in sites:
            feats = {p: features_of(a[site], kind) for p, a in acts.items()}
            g = fit_site(site, feats["D"], ys, acts["D"][m.output_name].shape[1])
            both = {}
            for part in ("attack", "test"):
                s = distances(g, feats[part])
                own = s[np.arange(len(s)), predicted[part]]
                both[part] = {"distance": own, "minus nearest class": own - s.min(1)}
            short = site.split("/")[-2] if "/" in site else site
            for form in ("distance", "minus nearest class"):
                show(f"{kind} site {short}, {form}", floor(both["attack"][form], sent_attack,
                                                          both["test"][form], sent_test))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    for folder in ap.parse_args().folders:
        run(folder)


if __name__ == "__main__":
    main()
