"""Dump what MMDF's decision is made of, per sample model, to compare rules offline.

For each model: the calibration scores on D (margin gap d, cross-fitted; feature score,
cross-fitted), the same two scores on the test and attack sets, the switched logits, the
original logits, and the scan's verdict and target (MM-BD, from the model and D alone).
The attack set is only measured. Usage:
    python benchmarks/mmdf_study.py --out DIR [--models a,b] [--no-scan]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmexport.core.data import load_npz  # noqa: E402
from mmexport.defences.mmdf import detector  # noqa: E402
from mmexport.defences.mmdf.graph import FEATURE_SCORE, SCORE  # noqa: E402
from mmexport.runtime.sessions import session  # noqa: E402


def study(folder: Path, scan_too: bool) -> dict:
    nulls = []
    real_fit_null = detector.fit_null

    def recording_fit_null(d, *a, **kw):
        nulls.append(np.asarray(d, np.float64).copy())
        return real_fit_null(d, *a, **kw)

    detector.fit_null = recording_fit_null
    try:
        t = time.perf_counter()
        res = detector.detect(folder / "model.onnx", folder / "clean.npz", device="cpu")
        seconds = time.perf_counter() - t
    finally:
        detector.fit_null = real_fit_null
    rep = res.report
    out = {"d_null": nulls[0], "f_null": nulls[1], "threshold": rep["threshold"],
           "feature_threshold": rep["features"]["threshold"], "seconds": seconds}
    sess, _ = session(res.model, provider="cpu")
    orig, _ = session(str(folder / "model.onnx"), provider="cpu")
    in_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    for part in ("test", "attack"):
        f = folder / f"{part}.npz"
        if not f.exists():
            continue
        data = load_npz(f, attack=part == "attack")
        got = dict(zip(names, sess.run(None, {in_name: data.x}), strict=True))
        out[f"{part}_y"] = data.y  # the attack set's y is the target; y_true the true class
        if part == "attack":
            out["attack_y_true"] = data.y_true
        out[f"{part}_d"] = got[SCORE] + rep["threshold"]
        out[f"{part}_f"] = got[FEATURE_SCORE] + rep["features"]["threshold"]
        out[f"{part}_switched"] = got[names[0]]
        out[f"{part}_original"] = orig.run(None, {orig.get_inputs()[0].name: data.x})[0]
    if scan_too:
        from mmexport.defences.mmbd.scan import scan

        s = scan(folder / "model.onnx", folder / "clean.npz", device="cpu")
        out["scan_target"] = -1 if s.target_class is None else s.target_class
        out["scan_p"] = s.p_value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-scan", action="store_true")
    args = ap.parse_args()
    folders = sorted(p.parent for p in (ROOT / "sample_models").glob("*/model.onnx"))
    if args.models:
        folders = [f for f in folders if f.name in set(args.models.split(","))]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for f in folders:
        r = study(f, not args.no_scan)
        np.savez(Path(args.out) / f"{f.name}.npz", **{k: np.asarray(v) for k, v in r.items()})
        print(json.dumps({"model": f.name, "seconds": round(r["seconds"], 1),
                          "scan_target": r.get("scan_target")}), flush=True)


if __name__ == "__main__":
    main()
