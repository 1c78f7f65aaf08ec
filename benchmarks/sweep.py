"""evaluate.py over a grid of models x seeds x settings, one process per run.

Seed variance on the sample models is 10-25 points of ASR (docs/experiments.md, section 13),
so a setting is judged on several seeds; on a many-core machine the runs go side by side.
Each worker runs one torch thread. Usage:
    python benchmarks/sweep.py --seeds 0,1,2 --config default= --config area10=mask_area=0.1 \
        [--models a,b] [--jobs N] [--device cpu] --out sweep.json
A config is NAME=key=value,key=value (empty after the first '=' for the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from evaluate import parse_value  # noqa: E402


def parse_config(text: str) -> tuple[str, dict]:
    name, _, rest = text.partition("=")
    pairs = [p.split("=", 1) for p in rest.split(",") if p]
    return name, {k: parse_value(v) for k, v in pairs}


def run_one(folder: str, seed: int, name: str, overrides: dict, device: str, detect: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    from evaluate import evaluate

    row = evaluate(Path(folder), overrides | {"seed": seed}, "channel", "mmac", detect, device)
    row.pop("history", None)
    return row | {"config": name, "seed": seed, "overrides": overrides}


def summarise(rows: list[dict]) -> str:
    lines = ["| model | config | seeds | ACC after (mean, min) | ASR after (mean, min-max) |", "|---|---|---|---|---|"]
    keys = sorted({(r["model"], r["config"]) for r in rows})
    for model, config in keys:
        rs = [r for r in rows if r["model"] == model and r["config"] == config]
        acc = [100 * r["acc_after"] for r in rs]
        asr = [100 * r["asr_after"] for r in rs if r["asr_after"] is not None]
        a = f"{st.mean(asr):.1f} ({min(asr):.1f}-{max(asr):.1f})" if asr else "-"
        lines.append(
            f"| {model} | {config} | {len(rs)} | {st.mean(acc):.1f} ({min(acc):.1f}) "
            f"[before {100 * rs[0]['acc_before']:.1f}] | {a} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated folder names (default: all)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--config", action="append", default=[], help="NAME=key=value,... (repeatable)")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--detect", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    configs = [parse_config(c) for c in args.config] or [("default", {})]
    folders = sorted(p.parent for p in (ROOT / "sample_models").glob("*/model.onnx"))
    if args.models:
        wanted = set(args.models.split(","))
        folders = [f for f in folders if f.name in wanted]
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(str(f), s, n, o) for n, o in configs for s in seeds for f in folders]
    # Longest first (wide CNNs, ResNets) so the pool does not wait on one straggler at the end.
    jobs.sort(key=lambda j: (-os.path.getsize(Path(j[0]) / "model.onnx"), j[1]))
    rows, t0 = [], time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futs = {pool.submit(run_one, *j, args.device, args.detect): j for j in jobs}
        for fut in as_completed(futs):
            f, s, n, _ = futs[fut]
            try:
                r = fut.result()
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                print(f"FAILED {Path(f).name} seed {s} {n}: {type(e).__name__}: {e}", flush=True)
                continue
            rows.append(r)
            asr = "-" if r["asr_after"] is None else f"{100 * r['asr_after']:.1f}"
            print(
                f"[{time.perf_counter() - t0:6.0f}s {len(rows)}/{len(jobs)}] {r['model']:26} {n:10} seed {s} "
                f"ACC {100 * r['acc_after']:.1f} ASR {asr} ({r['seconds']:.0f}s)",
                flush=True,
            )
            Path(args.out).write_text(json.dumps({"rows": rows}, indent=1))
    print(summarise(rows))


if __name__ == "__main__":
    main()
