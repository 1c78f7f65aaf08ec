"""mmexport's defaults beside the published peers on the real-size tier, in one run.

    python benchmarks/bench_peers.py [--models a,b] [--defences mmac,mmdf,anp,...] [--out bench-results]

Every defence gets the model and the same clean set D (clean.npz, 20 images per class) and
nothing else; every number is measured under onnxruntime CPU on the model's test set (ACC) and
attack set (ASR: triggered images sent to the target; RA: sent to their true class). Rows:

- none: the model as it is.
- mmac: `harden` with its defaults (stamp unlearning, where no stamp stands out the scan's target's
  stamp and universal perturbation, else the max-margin search).
- mmac-ft: `harden --method mmac-ft` (MMAC, then a found stamp unlearned in the weights too).
- mmdf: `detect` with its defaults (detection rate on the attack set, FPR on the test set).
- mmac-ft+mmdf: `detect --serve` the mmac-ft model (the run's own where mmac-ft ran before it):
  MMDF's tests on the original, the inputs it does not flag get the mmac-ft model's logits.
- fine-tuning, fine-pruning, clp, adversarial-unlearning (i-BAU-like: a universal perturbation
  unlearnt by alternating steps): mmexport.defences.baselines.peers.
- anp: adversarial neuron pruning with the paper's eps, alpha, lr and threshold, 32 rows per
  iteration, for as long as `harden`'s default time limit on the model (240 s + 24 s per
  million parameters, at most 480 s) or 2,000 iterations: the same compute as mmexport. The
  paper's 2,000 iterations of 128 rows take 12 h on a ResNet-18 on one core here.

One JSON per model in <out>/peers/ (a model run again replaces its file, so models can run in
separate processes), and <out>/peers.md from all of them: the table, the means over the
backdoored models and the issue's targets (average ASR <= 1%, average drop <= 2 points, every
model ASR <= 5%, clean models drop <= 1), against BackdoorBench's ANP anchor (85.4% / 0.8% ASR
on CIFAR-10 with 2,500 images; its threshold picked on the test set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "sample_models"))

import build_real  # noqa: E402
from bench_defences import measure  # noqa: E402

from mmexport.core.data import load_npz  # noqa: E402
from mmexport.defences.baselines import peers  # noqa: E402
from mmexport.defences.common.config import auto_time_limit  # noqa: E402
from mmexport.defences.harden import harden  # noqa: E402
from mmexport.defences.mmdf.detector import detect  # noqa: E402

DEFENCES = ("none", "mmac", "mmac-ft", "mmdf", "mmac-ft+mmdf", "fine-tuning", "fine-pruning", "clp", "anp",
            "adversarial-unlearning")
ANP_BATCH = 32


def parameters(proto: onnx.ModelProto) -> int:
    return int(sum(np.prod(i.dims) for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT))


# mmac-ft's model and seconds by (folder, seed), for the stacked row of the same run.
_HARDENED: dict[tuple[str, int], tuple[onnx.ModelProto, float]] = {}


def run_defence(name: str, folder: Path, seed: int) -> tuple[onnx.ModelProto, dict]:
    model = folder / "model.onnx"
    original = onnx.load(str(model))
    clean = load_npz(folder / "clean.npz")
    if name == "none":
        return original, {}
    if name == "mmac-ft+mmdf":
        key = (str(folder), seed)
        reused = key in _HARDENED
        if not reused:
            run_defence("mmac-ft", folder, seed)
        served, seconds = _HARDENED[key]
        res = detect(model, clean, seed=seed, threads=torch.get_num_threads(), serve=served)
        return res.model, {"focus": res.report.focus, "gated": res.report.gated, "mmac_ft_seconds": seconds,
                           "mmac_ft_reused": reused}
    if name in ("mmac", "mmac-ft"):
        t0 = time.perf_counter()
        res = harden(model, clean, method=name, seed=seed, threads=torch.get_num_threads())
        if name == "mmac-ft":
            _HARDENED[(str(folder), seed)] = (res.model, time.perf_counter() - t0)
        stamp = res.report.stamp or {}
        keep = ("target", "found", "outlier", "source", "stand_ins")
        info = {"stage": res.report.stage, "stamp": {k: stamp.get(k) for k in keep}}
        if (stamp.get("scan") or {}).get("shift"):  # the scan's universal perturbation: what it moved
            info["stamp"]["shift"] = stamp["scan"]["shift"]
        return res.model, info | ({"finetune": res.report.finetune} if res.report.finetune else {})
    if name == "mmdf":
        res = detect(model, clean, seed=seed, threads=torch.get_num_threads())
        return res.model, {"focus": res.report.focus, "gated": res.report.gated}
    if name == "anp":
        limit = auto_time_limit(parameters(original))
        return peers.anp(original, clean.x, clean.y, seed=seed, batch_size=ANP_BATCH, max_seconds=limit)
    return peers.PEERS[name](original, clean.x, clean.y, seed=seed)


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def markdown(results: dict[str, dict]) -> str:
    out = [
        "# mmexport against the peers on the real-size tier",
        "",
        "ACC / ASR / RA in % under onnxruntime (test set; attack set); MMDF adds detection and FPR; "
        "[seconds] of the defence; D = 20 clean images per class for every defence.",
        "",
    ]
    names = [d for d in DEFENCES if any(d in r["rows"] for r in results.values())]
    out += ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, r in results.items():
        cells = []
        for d in names:
            row = r["rows"].get(d)
            if row is None:
                cells.append("")
                continue
            cell = f"{pct(row['acc'])} / {pct(row['asr'])} / {pct(row['ra'])}"
            if row.get("detection") is not None:
                cell += f" (det {pct(row['detection'])}, FPR {pct(row['fpr'])})"
            cells.append(cell + f" [{row['seconds']:.0f}]")
        out.append(f"| {model} | " + " | ".join(cells) + " |")

    out += ["", "Over the backdoored models (ACC drop in points; the issue's targets: average ASR <= 1%, "
            "average drop <= 2, every model ASR <= 5%), and the clean models' drop (target <= 1):", ""]
    out += ["| defence | models | mean ACC drop | mean ASR | worst ASR | models ASR <= 5% | clean drop |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for d in names:
        have = [r["rows"] for r in results.values() if d in r["rows"] and "none" in r["rows"]]
        bd = [rows for rows in have if rows["none"]["asr"] is not None]
        cl = [rows for rows in have if rows["none"]["asr"] is None]
        if not bd and not cl:
            continue
        drops = [rows["none"]["acc"] - rows[d]["acc"] for rows in bd]
        asr = [rows[d]["asr"] for rows in bd]
        clean = ", ".join(pct(rows["none"]["acc"] - rows[d]["acc"]) for rows in cl) or "-"
        out.append(
            f"| {d} | {len(bd)} | {pct(np.mean(drops)) if bd else '-'} | {pct(np.mean(asr)) if bd else '-'} | "
            f"{pct(max(asr)) if bd else '-'} | {sum(a <= 0.05 for a in asr)} / {len(bd)} | {clean} |"
        )
    out += ["", "BackdoorBench's ANP anchor (CIFAR-10, PreAct-ResNet-18, 2,500 clean images, threshold "
            "chosen on the test set): 85.4% / 0.8% ASR, 5.9 points below no defence.", ""]
    for model, r in results.items():
        out.append(f"- {model}: {r['when']}, seed {r['seed']}, torch threads {r['threads']}")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated build_real models (default: all built ones)")
    ap.add_argument("--defences", default=",".join(DEFENCES), help=f"comma-separated subset of {','.join(DEFENCES)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    ap.add_argument("--cache", type=Path, default=build_real.CACHE)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "1")))
    wanted = args.defences.split(",")
    unknown = sorted(set(wanted) - set(DEFENCES))
    if unknown:
        ap.error(f"unknown defences: {', '.join(unknown)}")
    if args.models:
        folders = build_real.ensure(args.models.split(","), out=args.cache)
    else:
        folders = sorted(p.parent for p in args.cache.glob("*/model.onnx"))
    store = args.out / "peers"
    store.mkdir(parents=True, exist_ok=True)
    failures = 0
    for folder in folders:
        path = store / f"{folder.name}.json"
        old = json.loads(path.read_text()) if path.exists() else {"rows": {}}
        result = {
            "when": datetime.date.today().isoformat(), "seed": args.seed, "threads": torch.get_num_threads(),
            "rows": {k: v for k, v in old["rows"].items() if k not in wanted},
        }
        for name in wanted:
            t0 = time.perf_counter()
            try:
                proto, info = run_defence(name, folder, args.seed)
            except Exception as e:  # one defence failing on one model: said in its row, the run goes on
                print(f"{folder.name:26} {name:13} failed: {type(e).__name__}: {e}", flush=True)
                failures += 1
                continue
            seconds = time.perf_counter() - t0
            if info.get("mmac_ft_reused"):
                seconds += info["mmac_ft_seconds"]  # its harden ran in mmac-ft's row
            row = {"seconds": seconds, "info": info, **measure(proto, folder)}
            row.pop("per_class", None)
            result["rows"][name] = row
            det = f" det {pct(row['detection'])} FPR {pct(row['fpr'])}" if row["detection"] is not None else ""
            print(f"{folder.name:26} {name:13} ACC {pct(row['acc'])} ASR {pct(row['asr'])} RA {pct(row['ra'])}"
                  f"{det} {seconds:.0f}s {json.dumps(info, default=str)[:200]}", flush=True)
            result["rows"] = {k: result["rows"][k] for k in DEFENCES if k in result["rows"]}
            path.write_text(json.dumps(result, indent=1, default=float))
    results = {p.stem: json.loads(p.read_text()) for p in sorted(store.glob("*.json"))}
    (args.out / "peers.md").write_text(markdown(results))
    print(f"wrote {args.out / 'peers.md'}" + (f"; {failures} defence(s) failed" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
