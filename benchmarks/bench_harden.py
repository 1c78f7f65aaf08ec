"""Harden wall time per sample model with the default settings; writes the bounds.

    python benchmarks/bench_harden.py [--models a,b] [--out bench-results]

The bounds land in <out>/bounds/<model>.bounds.json, where bench_latency.py --bounds reads
them, so the latency table measures the bounds the defaults really produce.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmexport.pipeline import harden  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated sample folders (default: all)")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "bounds").mkdir(parents=True, exist_ok=True)
    folders = sorted(p.parent for p in (ROOT / "sample_models").glob("*/model.onnx"))
    if args.models:
        wanted = set(args.models.split(","))
        folders = [f for f in folders if f.name in wanted]
    rows = []
    print(
        f"harden wall time, default settings, device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    print(f"{'model':28} {'seconds':>8} {'epochs':>7} {'sites':>6}")
    for f in folders:
        t0 = time.perf_counter()
        res = harden(f / "model.onnx", f / "clean.npz", device=args.device)
        seconds = time.perf_counter() - t0
        (out / "bounds" / f"{f.name}.bounds.json").write_text(res.bounds.dumps())
        rows.append(
            {
                "model": f.name,
                "seconds": seconds,
                "epochs": res.report["epochs"],
                "sites": res.report["sites"],
                "device": args.device,
            }
        )
        print(f"{f.name:28} {seconds:8.1f} {res.report['epochs']:7d} {res.report['sites']:6d}", flush=True)
    (out / "harden.json").write_text(json.dumps(rows, indent=1))
    lines = ["| model | harden seconds | epochs | sites |", "|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['seconds']:.1f} | {r['epochs']} | {r['sites']} |" for r in rows]
    (out / "harden.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
