"""Harden every sample model with one configuration and measure it under onnxruntime.

The attack sets are read only to measure ASR/RA after hardening; nothing here feeds them
to the search. Usage:
    python benchmarks/evaluate.py [--models a,b] [--set key=value ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mmexport.core.data import load_npz  # noqa: E402
from mmexport.defences.harden import harden  # noqa: E402
from mmexport.runtime.metrics import validate  # noqa: E402


def parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def evaluate(
    folder: Path, overrides: dict, granularity: str, method: str, detect_too: bool = False, device: str = "cpu",
    serve: bool = False,
) -> dict:
    test = load_npz(folder / "test.npz")
    attack = load_npz(folder / "attack.npz", attack=True) if (folder / "attack.npz").exists() else None
    before = validate(folder / "model.onnx", test, attack=attack, provider="cpu")
    t0 = time.perf_counter()
    threads = int(os.environ["THREADS"]) if os.environ.get("THREADS") else None
    res = harden(
        folder / "model.onnx", folder / "clean.npz", method=method, granularity=granularity, device=device,
        threads=threads, **overrides,
    )
    seconds = time.perf_counter() - t0
    after = validate(res.model, test, attack=attack, provider="cpu")
    mmdf = {}
    if detect_too:
        from mmexport.defences.mmdf.detector import detect

        t1 = time.perf_counter()
        seed = {"seed": overrides["seed"]} if "seed" in overrides else {}  # --set seed=N: both methods
        det = detect(folder / "model.onnx", folder / "clean.npz", device="cpu", threads=threads, **seed)
        rep = validate(det.model, test, attack=attack, provider="cpu")
        mmdf = {
            "mmdf_acc": rep.accuracy,
            "mmdf_asr": rep.asr,
            "mmdf_detection": rep.detection_rate,
            "mmdf_fpr": rep.false_positive_rate,
            "mmdf_seconds": time.perf_counter() - t1,
        }
        if serve:  # what `detect --serve` writes: the same calibration, the hardened model behind it
            from mmexport.core.conventions import logits_of
            from mmexport.core.model import load_model
            from mmexport.defences.mmdf.serve import serve_unflagged

            m = load_model(folder / "model.onnx")
            stacked = serve_unflagged(det.model, res.model, m.output_name, logits=logits_of(m).name == m.output_name)
            rep = validate(stacked, test, attack=attack, provider="cpu")
            mmdf |= {"stack_acc": rep.accuracy, "stack_asr": rep.asr, "stack_ra": rep.ra}
    return mmdf | {
        "model": folder.name,
        "acc_before": before.accuracy,
        "acc_after": after.accuracy,
        "bal_before": before.balanced_accuracy,
        "bal_after": after.balanced_accuracy,
        "asr_before": before.asr,
        "asr_after": after.asr,
        "ra_after": after.ra,
        "per_class_before": before.per_class_accuracy,
        "per_class_after": after.per_class_accuracy,
        "lambda": res.report.lambda_,
        "stage": res.report.stage,
        "stamp": res.report.stamp,
        "epochs": res.report.epochs,
        "acc_D": res.report.clean_set_accuracy,
        "mm_before": res.report.max_margins_before,
        "history": res.report.history,
        "mm_after": res.report.max_margins_after,
        "seconds": seconds,
    }


def stage_text(r: dict) -> str:
    """Which search ran: the stamp's unlearning (with its class) or the max-margin search."""
    stamp = r.get("stamp")
    if r.get("stage") == "unlearn" and stamp:
        return f"unlearn {stamp['target']} ({stamp['outlier']:.1f})"
    if stamp:
        return f"max-margin ({stamp['outlier']:.1f})"
    return r.get("stage") or "-"


def fmt(v, pct=True):
    if v is None:
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.3g}"


def main() -> None:
    import torch

    if os.environ.get("THREADS"):
        torch.set_num_threads(int(os.environ["THREADS"]))
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="", help="comma-separated folder names (default: all)")
    ap.add_argument("--set", action="append", default=[], help="search option override key=value")
    ap.add_argument("--granularity", default="channel")
    ap.add_argument("--method", default="mmac")
    ap.add_argument("--out", default="", help="write rows as JSON here")
    ap.add_argument(
        "--oracle",
        action="store_true",
        help="also measure the oracle limit per backdoored model (benchmarks/oracle.py)",
    )
    ap.add_argument("--report", default="", help="write Markdown + JSON tables into this folder")
    ap.add_argument("--detect", action="store_true", help="also build and measure MMDF (mmexport detect)")
    ap.add_argument("--serve", action="store_true",
                    help="with --detect, also measure MMDF serving the hardened model (detect --serve)")
    ap.add_argument("--device", default="cpu", help="torch device of the search (cpu, cuda, auto)")
    args = ap.parse_args()
    if args.serve and not args.detect:
        ap.error("--serve needs --detect")
    overrides = {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.set)}
    # The shipped schedule, not what the time limit leaves of it on a busy machine: the limit is
    # a resource control (measured by bench_real.py on the real tier); --set time_limit=auto
    # measures with it.
    overrides.setdefault("time_limit", 0)
    if overrides["time_limit"] == "auto":
        overrides["time_limit"] = None
    folders = sorted(p.parent for p in (ROOT / "sample_models").glob("*/model.onnx"))
    if args.models:
        wanted = set(args.models.split(","))
        folders = [f for f in folders if f.name in wanted]
    rows = []
    print(f"settings: {overrides or 'defaults'} granularity={args.granularity} method={args.method}")
    print(
        f"{'model':28} {'acc':>11} {'bal':>11} {'ASR':>11} {'RA':>5} {'lambda':>7} {'ep':>4} {'s':>6}  "
        "mm(max/med) before->after"
    )
    for f in folders:
        r = evaluate(f, overrides, args.granularity, args.method, args.detect, args.device, args.serve)
        rows.append(r)
        import statistics as st

        mb, ma = r["mm_before"], r["mm_after"]
        print(
            f"{r['model']:28} {fmt(r['acc_before'])}->{fmt(r['acc_after'])} "
            f"{fmt(r['bal_before'])}->{fmt(r['bal_after'])} {fmt(r['asr_before'])}->{fmt(r['asr_after'])} "
            f"{fmt(r['ra_after']):>5} {r['lambda']:7.3g} {r['epochs']:4d} {r['seconds']:6.1f}  "
            f"{max(mb):.1f}/{st.median(mb):.1f} -> {max(ma):.1f}/{st.median(ma):.1f}  {stage_text(r)}",
            flush=True,
        )
        if "mmdf_acc" in r:
            print(f"{'':28} MMDF: ACC {fmt(r['mmdf_acc'])} ASR {fmt(r['mmdf_asr'])} "
                  f"det {fmt(r['mmdf_detection'])} FPR {fmt(r['mmdf_fpr'])}", flush=True)
        if "stack_acc" in r:
            print(f"{'':28} MMDF serving it: ACC {fmt(r['stack_acc'])} ASR {fmt(r['stack_asr'])} "
                  f"RA {fmt(r['stack_ra'])}", flush=True)
        if args.oracle and r["asr_before"] is not None:
            from oracle import oracle

            o = oracle(f)
            r["oracle_acc"], r["oracle_asr"] = o.get("acc"), o.get("asr")
            print(f"{'':28} oracle: ACC {fmt(r['oracle_acc'])} ASR {fmt(r['oracle_asr'])}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"settings": overrides, "rows": rows}, indent=1))
    if args.report:
        write_report(Path(args.report), overrides, args, rows)


def write_report(folder: Path, overrides: dict, args, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    slim = [{k: v for k, v in r.items() if k != "history"} for r in rows]
    (folder / "eval-defence.json").write_text(
        json.dumps(
            {"settings": overrides, "method": args.method, "granularity": args.granularity, "rows": slim}, indent=1
        )
    )
    head = (
        "| model | ACC | ASR | RA | search (stamp outlier) | oracle ACC / ASR | MMDF ACC / ASR / det / FPR "
        "| MMDF serving it ACC / ASR / RA | seconds |"
    )
    lines = [
        f"settings: {overrides or 'defaults'}, method {args.method}, granularity {args.granularity}",
        "",
        head,
        "|---|---|---|---:|---|---|---|---|---:|",
    ]
    for r in slim:
        orc = f"{fmt(r.get('oracle_acc'))} / {fmt(r.get('oracle_asr'))}" if r.get("oracle_acc") is not None else "-"
        mmdf = (
            " / ".join(fmt(r[k]) for k in ("mmdf_acc", "mmdf_asr", "mmdf_detection", "mmdf_fpr"))
            if "mmdf_acc" in r
            else "-"
        )
        stack = " / ".join(fmt(r[k]) for k in ("stack_acc", "stack_asr", "stack_ra")) if "stack_acc" in r else "-"
        lines.append(
            f"| {r['model']} | {fmt(r['acc_before'])} -> {fmt(r['acc_after'])} | "
            f"{fmt(r['asr_before'])} -> {fmt(r['asr_after'])} | {fmt(r['ra_after'])} | {stage_text(r)} | "
            f"{orc} | {mmdf} | {stack} | "
            f"{r['seconds']:.0f} |"
        )
    (folder / "eval-defence.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
