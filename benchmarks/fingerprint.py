"""Hash what the defences produce on the samples, to show a refactor changed no result.

Runs `harden` (MMAC, and MMOM on the long-tailed samples), `detect` and `scan` through the
public API at a fixed seed and prints one JSON line per sample with sha256 digests of the
bounds, the written graphs (metadata holding the version excluded) and the scan's verdict.
Run it on two checkouts and diff the outputs:
    python benchmarks/fingerprint.py [--models a,b] [--fast] > fingerprints.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mmexport  # noqa: E402

FAST = dict(max_epochs=6, restarts=2, warmup_steps=10)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def graph_digest(proto) -> dict:
    """The graph, and apart from it the metadata that describe the method (not the version)."""
    meta = {p.key: p.value for p in proto.metadata_props if p.key != "mmexport.version"}
    return {"graph": digest(proto.graph.SerializeToString()), "meta": digest(json.dumps(meta, sort_keys=True).encode())}


def report(res) -> dict:
    return res.report if isinstance(res.report, dict) else res.report.to_json()


def fingerprint(folder: Path, fast: bool) -> dict:
    model, clean = folder / "model.onnx", folder / "clean.npz"
    card = json.loads((folder / "card.json").read_text())
    extra = FAST if fast else {}
    row = {"model": folder.name}
    method = "mmom" if "imbalanced" in folder.name else "mmac"
    res = mmexport.harden(model, clean, method=method, device="cpu", seed=0, **extra)
    row[method] = {"bounds": digest(res.bounds.dumps().encode()), **graph_digest(res.model),
                   "stage": report(res)["stage"], "lambda": report(res)["lambda"]}
    det = mmexport.detect(model, clean, device="cpu", seed=0)
    row["mmdf"] = {**graph_digest(det.model), "threshold": det.threshold}
    sc = mmexport.scan(model, clean, device="cpu", seed=0)
    row["scan"] = {"verdict": sc.verdict, "target": sc.target_class, "p": round(sc.p_value, 6)}
    row["backdoored"] = card.get("attack") is not None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated sample names (default: all)")
    ap.add_argument("--fast", action="store_true", help="short searches: checks the code paths, not the defaults")
    args = ap.parse_args()
    torch.set_num_threads(1)
    folders = sorted(p.parent for p in (ROOT / "sample_models").glob("*/model.onnx"))
    if args.models:
        folders = [f for f in folders if f.name in args.models.split(",")]
    from mmexport.core.threads import using_threads

    with using_threads(1):  # the digests hold at one thread; torch sums in another order on more
        for folder in folders:
            print(json.dumps(fingerprint(folder, args.fast)), flush=True)


if __name__ == "__main__":
    main()
