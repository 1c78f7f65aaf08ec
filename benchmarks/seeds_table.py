"""The real-tier defaults over several seeds: bench_peers outputs side by side.

    python benchmarks/seeds_table.py bench-results/seeds/seed0 bench-results/seeds/seed1 ... [--out FILE]

Each folder is one `bench_peers.py --seed N --out FOLDER` run (its peers/*.json). Prints, and
writes to --out (default: seeds.md beside the folders), ACC / ASR per model, defence and seed,
then per defence and seed the issue's aggregates over the backdoored models (mean ACC drop, mean
ASR, worst ASR, models at ASR <= 5%) and the clean models' drop, and their means over the seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def load(folder: Path) -> tuple[int, dict[str, dict]]:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((folder / "peers").glob("*.json"))}
    seeds = {r["seed"] for r in runs.values()}
    if len(seeds) != 1:
        raise SystemExit(f"{folder}: expected one seed, found {sorted(seeds)}")
    return seeds.pop(), {model: r["rows"] for model, r in runs.items()}


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def aggregates(rows_by_model: dict[str, dict], defence: str) -> dict | None:
    have = [rows for rows in rows_by_model.values() if defence in rows and "none" in rows]
    bd = [rows for rows in have if rows["none"]["asr"] is not None]
    cl = [rows for rows in have if rows["none"]["asr"] is None]
    if not bd:
        return None
    asr = [rows[defence]["asr"] for rows in bd]
    return {
        "models": len(bd),
        "drop": float(np.mean([rows["none"]["acc"] - rows[defence]["acc"] for rows in bd])),
        "asr": float(np.mean(asr)),
        "worst": float(max(asr)),
        "met": sum(a <= 0.05 for a in asr),
        "clean_drop": [rows["none"]["acc"] - rows[defence]["acc"] for rows in cl],
    }


def table(runs: dict[int, dict[str, dict]]) -> str:
    seeds = sorted(runs)
    models = sorted({m for rows in runs.values() for m in rows})
    defences = [d for d in ("mmac", "mmac-ft", "mmdf", "mmac-ft+mmdf")
                if any(d in r for rows in runs.values() for r in rows.values())]
    out = ["# The real-tier defaults over seeds", "",
           f"ACC / ASR in % (onnxruntime, test set / attack set), seeds {', '.join(map(str, seeds))}; "
           "MMDF adds detection / FPR.", ""]
    head = ["model", "none"] + [f"{d} seed {s}" for d in defences for s in seeds]
    out += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for model in models:
        first = next(runs[s][model] for s in seeds if model in runs[s])
        cells = [model, f"{pct(first['none']['acc'])} / {pct(first['none']['asr'])}" if "none" in first else "-"]
        for d in defences:
            for s in seeds:
                row = runs[s].get(model, {}).get(d)
                if row is None:
                    cells.append("not run")
                    continue
                cell = f"{pct(row['acc'])} / {pct(row['asr'])}"
                if row.get("detection") is not None:
                    cell += f" ({pct(row['detection'])} / {pct(row['fpr'])})"
                cells.append(cell)
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "Over the backdoored models (targets: mean ASR <= 1%, mean drop <= 2 points, every model "
            "ASR <= 5%; clean models drop <= 1):", "",
            "| defence | seed | models | mean ACC drop | mean ASR | worst ASR | ASR <= 5% | clean drop |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for d in defences:
        per_seed = {s: aggregates(runs[s], d) for s in seeds}
        done = {s: a for s, a in per_seed.items() if a is not None}
        most = max((a["models"] for a in done.values()), default=0)
        for s, a in done.items():
            out.append(f"| {d} | {s} | {a['models']} | {pct(a['drop'])} | {pct(a['asr'])} | {pct(a['worst'])} | "
                       f"{a['met']} / {a['models']} | {', '.join(pct(v) for v in a['clean_drop']) or '-'} |")
        full = [a for a in done.values() if a["models"] == most]  # a seed on fewer models is not averaged in
        if len(full) > 1:
            mean = {key: float(np.mean([a[key] for a in full])) for key in ("drop", "asr", "worst")}
            out.append(f"| {d} | mean of {len(full)} | {most} | {pct(mean['drop'])} | {pct(mean['asr'])} | "
                       f"{pct(mean['worst'])} | | |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="bench_peers --out folders, one per seed")
    ap.add_argument("--out", type=Path, help="Markdown file [seeds.md beside the folders]")
    args = ap.parse_args()
    runs = {}
    for folder in args.folders:
        seed, rows = load(folder)
        runs[seed] = rows
    text = table(runs)
    out = args.out or args.folders[0].parent / "seeds.md"
    out.write_text(text)
    print(text + f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
