"""The stamp gate on every sample: which class's stamp stands out, by how much, and is it the trigger?

    python benchmarks/stamp_gate.py [--models a,b] [--seeds 0,1,2] [--out bench-results] [--threads 1]

MMAC's first stage ascends one stamped pattern per class on the original model and unlearns the
largest only where it stands out. This runs that stage alone (`find_stamp`, with the schedule
`harden` would fit to its default time limit) on the 16x16 samples and the built real-size
models, for several seeds, and puts two gates side by side on the same per-class stamp margins:
the shipped one (gap to the runner-up over the others' MAD >= `unlearn_gate`) and MM-BD's test
(a gamma null fitted to the other K-1 classes, p = 1 - F(max)^K, as the scan uses). Each row says
whether the stamp names the attack's target (cards) and what each gate decides. Writes
<out>/stamp_gate.md and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmexport.core.conventions import input_layout  # noqa: E402
from mmexport.core.data import load_npz  # noqa: E402
from mmexport.core.model import load_model  # noqa: E402
from mmexport.core.threads import using_threads  # noqa: E402
from mmexport.defences.common.checks import check_original, with_site_shapes  # noqa: E402
from mmexport.defences.common.margins import input_box  # noqa: E402
from mmexport.defences.harden import schedule_search  # noqa: E402
from mmexport.defences.mmac.config import MmacConfig  # noqa: E402
from mmexport.defences.mmac.unlearn import find_stamp  # noqa: E402
from mmexport.defences.mmbd.stats import mmbd_test  # noqa: E402
from mmexport.engine.executor import Engine  # noqa: E402
from mmexport.engine.threads import use_threads  # noqa: E402


def folders(names: list[str] | None) -> list[Path]:
    found = sorted(p.parent for p in (ROOT / "sample_models").glob("*/card.json"))
    found += sorted(p.parent for p in (ROOT / "sample_models" / "real").glob("*/model.onnx"))
    found = [f for f in found if (f / "model.onnx").exists() and (f / "clean.npz").exists()]
    return [f for f in found if names is None or f.name in names]


def study(folder: Path, seed: int, alpha: float) -> dict:
    card = json.loads((folder / "card.json").read_text())
    truth = (card.get("attack") or {}).get("target")
    m = load_model(folder / "model.onnx")
    k = check_original(m)
    clean = load_npz(folder / "clean.npz")
    m = with_site_shapes(m, clean.x)
    engine = Engine(m, memory_format="auto")
    x, y = torch.from_numpy(clean.x), torch.from_numpy(clean.y)
    box = input_box(x, channel_axis=input_layout(m, None).channel_axis)
    plan = schedule_search(engine, x, k, MmacConfig(seed=seed), torch.device("cpu"))
    t0 = time.perf_counter()
    stamp = find_stamp(engine, x, y, box, k, plan.config, chunk=plan.chunk)
    test = mmbd_test(stamp.margins)
    return {"model": folder.name, "seed": seed, "truth": truth, "target": stamp.target,
            "right": truth is not None and stamp.target == truth, "outlier": round(stamp.outlier, 2),
            "gate": plan.config.unlearn_gate, "gate_found": stamp.found, "p_value": test.p_value,
            "p_found": test.p_value < alpha, "margins": [round(v, 3) for v in stamp.margins],
            "seconds": round(time.perf_counter() - t0, 1)}


def verdict(row: dict, found_key: str) -> str:
    """What a gate's decision does: unlearns the trigger, misses it, or unlearns a wrong stamp."""
    found = row[found_key]
    if row["truth"] is None:
        return "false alarm" if found else "ok (clean)"
    if not found:
        return "missed"
    return "unlearns the trigger" if row["right"] else "unlearns a wrong stamp"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=None)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    cols = ("model", "seed", "truth", "target", "outlier", "gate", "p_value", "by outlier", "by p-value", "seconds")
    print(" | ".join(cols), flush=True)
    with using_threads(args.threads), use_threads(args.threads):
        for folder in folders(args.models.split(",") if args.models else None):
            for seed in seeds:
                row = study(folder, seed, args.alpha)
                row["by outlier"], row["by p-value"] = verdict(row, "gate_found"), verdict(row, "p_found")
                rows.append(row)
                print(" | ".join(f"{row[c]:.3g}" if c == "p_value" else str(row[c]) for c in cols), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stamp_gate.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# The stamp gate: outlier >= gate vs MM-BD p < {args.alpha}", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{r[c]:.3g}" if c == "p_value" else str(r[c]) for c in cols) + " |" for r in rows]
    (args.out / "stamp_gate.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
