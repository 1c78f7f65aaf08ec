"""Does MMDF's false-positive rate hold at alpha on new clean data? The null's scores, kept.

Runs `detect` (defaults, ungated so every row is scored) on each real-tier model, keeps D's
cross-fitted calibration scores (margin gap d and feature score, per row: copy j of image i
is row j*N + i) and scores the test set, fresh clean scenes (the test split's digits
rendered again with other scene seeds: new backgrounds, colours, poses) and the attack set
with the built graph. Everything goes to one .npz per model, so threshold rules can be
compared offline (`--rules`) without building again. Usage:
    python benchmarks/mmdf_null.py [--models a,b] [--renders 4] [--seed 0] [--out bench-results/mmdf-null]
    python benchmarks/mmdf_null.py --rules [--out ...]   # the table, from the kept scores

Rules compared (both tests, alpha = 0.5%, alpha / 2 each where split):
- rows: the conformal rank over D's rows, shifted copies counted as images, at alpha / 2 / p
  over the focus share p (the rule before 2026-12-01);
- images: `fit_image_null`, the rank over D's images at alpha / 2 (shipped);
- joint: both tests on their exponential tails' scale, z = (s - u) / beta (u the 0.75 quantile of
  the tested images), one rank over images at alpha (tried, not kept).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sample_models"))

import build_real  # noqa: E402
from build import split_indices  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from mmexport.core.data import load_npz  # noqa: E402
from mmexport.defences.mmdf import detector  # noqa: E402
from mmexport.defences.mmdf.bounds import shifted  # noqa: E402
from mmexport.defences.mmdf.null import fit_image_null, fit_null, image_scores  # noqa: E402

OUT = ROOT / "bench-results" / "mmdf-null"


def fresh_clean(renders: int) -> tuple[np.ndarray, np.ndarray]:
    """The test split's digits as new scenes: render seeds 1..renders (the tier uses seed 0)."""
    digits = load_digits()
    test = split_indices(digits.target.astype(np.int64)).test
    xs = [build_real.render(digits.images[test], seed=s) for s in range(1, renders + 1)]
    return np.concatenate(xs), np.tile(digits.target[test].astype(np.int64), renders)


def run_graph(proto, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    feed = sess.get_inputs()[0].name
    parts = [sess.run(None, {feed: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}


def collect(name: str, renders: int, seed: int, out: Path) -> None:
    real = name.startswith("real-")
    folder = build_real.CACHE / name if real else ROOT / "sample_models" / name
    card = json.loads((folder / "card.json").read_text())
    clean, test = load_npz(folder / "clean.npz"), load_npz(folder / "test.npz")
    kept = {}
    original = detector._calibrate

    def keep(*args, **kwargs):
        cal = original(*args, **kwargs)
        kept["cal"] = cal
        return cal

    detector._calibrate = keep
    t0 = time.perf_counter()
    try:
        res = detector.detect(folder / "model.onnx", clean, seed=seed, gate=False, threads=1)
    finally:
        detector._calibrate = original
    cal = kept["cal"]
    sets = {"test": (test.x, test.y)}
    if real and renders:
        sets["fresh"] = fresh_clean(renders)
    if (folder / "attack.npz").exists():
        a = np.load(folder / "attack.npz")
        sets["attack"] = (a["x"], a["y_true"])
    arrays = {"d_null": cal.d, "f_null": cal.features.null if cal.features is not None else np.zeros(0),
              "images": np.array(len(clean)), "threshold": np.array(cal.null.threshold),
              "f_threshold": np.array(cal.feature_null.threshold if cal.feature_null else np.nan),
              "focus": np.array(-1 if cal.plan["class"] is None else cal.plan["class"]),
              "null_y": np.tile(clean.y, len(cal.d) // len(clean))}
    source = onnx.load(str(folder / "model.onnx"))
    logits_name = card["output"]["name"]
    x_null = shifted(clean.x, 1) if len(cal.d) > len(clean) else clean.x
    arrays["null_pred"] = run_graph(source, x_null)[logits_name].argmax(1)
    for key, (x, y) in sets.items():
        o = run_graph(res.model, x)
        logits = o[logits_name]
        arrays[f"{key}_y"] = y
        arrays[f"{key}_flag"] = o["mmdf_detected"]
        arrays[f"{key}_d"] = o["mmdf_score"] + cal.null.threshold
        if "mmdf_feature_score" in o:
            arrays[f"{key}_f"] = o["mmdf_feature_score"] + cal.feature_null.threshold
        arrays[f"{key}_final"] = logits.argmax(1)
    orig = run_graph(source, np.concatenate([sets[k][0] for k in sets]))[logits_name].argmax(1)
    start = 0
    for key in sets:
        arrays[f"{key}_pred"] = orig[start:start + len(sets[key][1])]
        start += len(sets[key][1])
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / f"{name}.npz", **arrays)
    meta = {"name": name, "seed": seed, "renders": renders, "seconds": time.perf_counter() - t0,
            "target": (card.get("attack") or {}).get("target"), "focus": cal.plan,
            "null": cal.null.to_json(), "feature_null": cal.feature_null.to_json() if cal.feature_null else None}
    (out / f"{name}.json").write_text(json.dumps(meta, indent=1))
    fresh = f" fresh {arrays['fresh_flag'].mean():.4f}" if "fresh_flag" in arrays else ""
    print(f"{name}: {meta['seconds']:.0f} s, focus {cal.plan['class']}, FPR test "
          f"{arrays['test_flag'].mean():.4f}{fresh}", flush=True)


def thresholds(z: dict, alpha: float = 0.005) -> dict[str, tuple[float, float]]:
    """{rule: (margin threshold, feature threshold)} from the kept null scores."""
    images, focus = int(z["images"]), int(z["focus"])
    d, f = z["d_null"], z["f_null"] if len(z["f_null"]) else None
    tested = z["null_pred"] == focus if focus >= 0 else np.ones(len(d), bool)
    each = alpha / 2 if f is not None else alpha
    floor = 1e-5 * max(1.0, float(np.abs(d).max()))
    level = min(each / tested.mean(), 0.25) if focus >= 0 else each
    out = {"rows": (fit_null(d[tested], level, floor=floor).threshold,
                    fit_null(f[tested], level).threshold if f is not None else np.inf),
           "images": (fit_image_null(d, images, tested, each, floor=floor).threshold,
                      fit_image_null(f, images, tested, each).threshold if f is not None else np.inf)}
    per = [image_scores(v, images, tested) for v in ([d] if f is None else [d, f])]
    scale = []
    for v in per:
        on = v[np.isfinite(v)]
        u = float(np.quantile(on, 0.75))
        beta = float((on[on > u] - u).mean()) if (on > u).any() else 1e-6
        scale.append((u, beta))
    zs = np.max([(v - u) / b for v, (u, b) in zip(per, scale, strict=True)], axis=0)
    t = float(np.sort(zs)[min(math.ceil((images + 1) * (1 - alpha)), images) - 1])
    joint = [max(u + b * t, floor if i == 0 else -np.inf) for i, (u, b) in enumerate(scale)]
    out["joint"] = (joint[0], joint[1] if f is not None else np.inf)
    return out


def rates(z: dict, key: str, thr: tuple[float, float], target: int | None) -> tuple[float, float]:
    """(flagged share, ASR) of a set under a rule; ASR: still sent to the target unflagged."""
    if f"{key}_d" not in z:
        return float("nan"), float("nan")
    focus = int(z["focus"])
    tested = z[f"{key}_pred"] == focus if focus >= 0 else np.ones(len(z[f"{key}_d"]), bool)
    feat = z[f"{key}_f"] if f"{key}_f" in z else np.full(len(tested), -np.inf)
    flagged = tested & ((z[f"{key}_d"] > thr[0]) | (feat > thr[1]))
    asr = float(np.mean((z[f"{key}_pred"] == target) & ~flagged)) if target is not None else float("nan")
    return float(flagged.mean()), asr


def table(folders: list[Path]) -> str:
    pct = lambda v: "-" if v != v else f"{100 * v:.2f}"  # noqa: E731
    lines = ["| model | seed | focus | rule | FPR test | FPR fresh | FPR both | detection | ASR |",
             "|---|---|---|---|---|---|---|---|---|"]
    for folder in folders:
        for path in sorted(folder.glob("*.npz")):
            z = dict(np.load(path))
            meta = json.loads(path.with_suffix(".json").read_text())
            for rule, thr in thresholds(z).items():
                test, fresh = rates(z, "test", thr, None)[0], rates(z, "fresh", thr, None)[0]
                both = (test * len(z["test_d"]) + fresh * len(z["fresh_d"])) / (
                    len(z["test_d"]) + len(z["fresh_d"])) if "fresh_d" in z else test
                det, asr = rates(z, "attack", thr, meta["target"])
                focus = "-" if int(z["focus"]) < 0 else str(int(z["focus"]))
                lines.append(f"| {path.stem} | {meta['seed']} | {focus} | {rule} | {pct(test)} | {pct(fresh)} | "
                             f"{pct(both)} | {pct(det)} | {pct(asr)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(s.name for s in build_real.SPECS[:6]))
    ap.add_argument("--renders", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT, nargs="+")
    ap.add_argument("--rules", action="store_true", help="print the rules' table from the kept scores")
    args = ap.parse_args()
    if args.rules:
        print(table(args.out))
        return
    torch.set_num_threads(1)
    for name in args.models.split(","):
        collect(name, args.renders, args.seed, args.out[0])


if __name__ == "__main__":
    main()
