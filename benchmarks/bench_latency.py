"""onnxruntime CPU latency of hardened sample models, relative to the originals.

For every `sample_models/*/model.onnx`, per-channel bounds are FRACTION x each channel's
max activation on the model's `clean.npz` (or read from `--bounds DIR/<model>.bounds.json`),
and written three ways:

- min:   Relu + Min(., Z[C,1,1]) per site (`apply_bounds(form="min")`);
- fold:  the bounds folded into the weights, a unit clip per site, Min only where no exact
         folding exists (`apply_bounds(form="fold")`);
- layer: one scalar per site, the largest of its channel bounds: Clip(0, z).

The original and the three hardened models are timed in one process, interleaved: every
round runs each model once, the order rotating from round to round, so clock boosts, drift
and other load fall on all four alike. onnxruntime runs on the CPU with the intra-op thread
pool pinned (`--threads`, default 1; inter-op 1, sequential execution) so runs are
comparable. One thread: on a 2-core box two intra-op threads share the cores with Python and
the OS, and the original's p95 ran at up to 12x its median (1.1-1.4x with one thread).
Reported: median and p95 per model over `--runs` rounds after `--warmup`, at batch 1 and 64,
the ratio of medians to the original's, and per model how many sites fell back to Min in the
folded form. Folded and min-form outputs are checked to agree first.

A model whose batch is fixed at N (most exports outside PyTorch, and `--fixed-batch N`, which
times copies of the samples with their input and output batch set to N) is timed on batches of
N instead, and the report says so; its activations and outputs are computed N at a time.

Writes `bench-results/latency.md` and `latency.json`. Usage:
    python benchmarks/bench_latency.py [--models a,b] [--runs 300] [--threads 1] [--fixed-batch N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmexport.core.bounds import Bounds, load_bounds  # noqa: E402
from mmexport.core.model import find_sites  # noqa: E402
from mmexport.graph.edit import value_types  # noqa: E402
from mmexport.graph.rewrite import apply_bounds  # noqa: E402
from mmexport.runtime.sessions import run_batches  # noqa: E402

FORMS = ("original", "min", "fold", "layer")
TARGET = 1.02  # the goal for fold / original
AGREE_ATOL = 1e-4  # folded vs min outputs, relative to the largest |logit|


def session(proto: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def channel_max(proto: onnx.ModelProto, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Per-channel max of each named tensor over the samples (and spatial positions)."""
    tapped = onnx.ModelProto()
    tapped.CopyFrom(proto)
    have = {o.name for o in tapped.graph.output}
    for n in names:
        if n not in have:
            tapped.graph.output.append(onnx.helper.make_empty_tensor_value_info(n))
    sess = session(tapped, threads=os.cpu_count() or 1)
    values = run_batches(sess, x, names)  # a fixed batch runs that many at a time
    return {
        n: v.max(axis=tuple(i for i in range(v.ndim) if i != 1)).astype(np.float32)
        for n, v in zip(names, values, strict=True)
    }


def bounds_for(folder: Path, proto: onnx.ModelProto, x: np.ndarray, args) -> Bounds:
    if args.bounds:
        return load_bounds(Path(args.bounds) / f"{folder.name}.bounds.json")
    shapes, _ = value_types(proto)
    sites = [s for s in find_sites(proto, shapes) if s.rank and s.rank >= 2]
    maxima = channel_max(proto, x, [s.name for s in sites])
    return Bounds({k: args.fraction * v for k, v in maxima.items()})


def variants(proto: onnx.ModelProto, bounds: Bounds):
    """The four models to time, and the fold report."""
    folded, report = apply_bounds(proto, bounds, form="fold", report=True)
    layer = Bounds({k: float(np.max(v)) for k, v in bounds.items()})
    models = {
        "original": proto,
        "min": apply_bounds(proto, bounds, form="min"),
        "fold": folded,
        "layer": apply_bounds(proto, layer, form="min"),
    }
    return models, report


def agreement(models: dict, x: np.ndarray) -> float:
    """max |fold - min| over the clean set, relative to the largest |logit| of min."""
    outs = {}
    for form in ("min", "fold"):
        sess = session(models[form], threads=os.cpu_count() or 1)
        outs[form] = run_batches(sess, x, [sess.get_outputs()[0].name])[0]
    return float(np.abs(outs["fold"] - outs["min"]).max() / np.abs(outs["min"]).max())


def time_interleaved(models: dict, x: np.ndarray, *, runs: int, warmup: int, threads: int):
    """Milliseconds per run for each model; one run of each per round, rotating order."""
    names = list(models)
    sessions = {n: session(models[n], threads) for n in names}
    feeds = {n: {sessions[n].get_inputs()[0].name: x} for n in names}
    times = {n: [] for n in names}
    for i in range(warmup + runs):
        shift = i % len(names)
        for n in names[shift:] + names[:shift]:
            start = time.perf_counter_ns()
            sessions[n].run(None, feeds[n])
            if i >= warmup:
                times[n].append((time.perf_counter_ns() - start) / 1e6)
    return times


def fixed_batch(proto: onnx.ModelProto) -> int | None:
    """The batch size the model's input is fixed at, or None."""
    inits = {i.name for i in proto.graph.initializer}
    vi = next(i for i in proto.graph.input if i.name not in inits)
    dim = vi.type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def with_fixed_batch(proto: onnx.ModelProto, n: int) -> onnx.ModelProto:
    """A copy with the batch dimension of every graph input and output set to n."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    inits = {i.name for i in out.graph.initializer}
    for vi in [*out.graph.input, *out.graph.output]:
        if vi.name not in inits:
            dim = vi.type.tensor_type.shape.dim[0]
            dim.Clear()
            dim.dim_value = n
    del out.graph.value_info[:]
    onnx.checker.check_model(out)
    return out


def stats(t: list[float]) -> dict:
    a = np.asarray(t)
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "runs": len(a)}


def markdown(rows: list[dict], env: dict) -> str:
    fixed = sorted({str(r["fixed_batch"]) for r in rows if r.get("fixed_batch")})
    lines = [
        "# Latency of hardened models (onnxruntime CPU)",
        "",
        f"onnxruntime {env['onnxruntime']}, {env['threads']} intra-op thread(s), "
        f"{env['runs']} interleaved runs after {env['warmup']} warm-up, on {env['cpu']} "
        f"({env['cpu_count']} logical CPUs). Bounds: {env['bounds']}.",
        *([f"Batch fixed in the models at {', '.join(fixed)}: timed on batches of that size."] if fixed else []),
        "",
        "Ratios are median latency / the original's median (p95 / original p95 in brackets).",
        "",
        "| model | batch | original ms (p95) | min | fold | layer | sites | fold: Min fallbacks |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        o = r["original"]
        cells = [
            f"{r[f]['ratio']:.3f} ({r[f]['p95_ratio']:.2f})" for f in ("min", "fold", "layer")
        ]
        lines.append(
            f"| {r['model']} | {r['batch']} | {o['median_ms']:.3f} ({o['p95_ms']:.3f}) | "
            + " | ".join(cells)
            + f" | {r['sites']} | {r['fallbacks']} |"
        )
    fallbacks = {r["model"]: r["fallback_sites"] for r in rows if r["fallback_sites"]}
    if fallbacks:
        lines += ["", "Sites left as Min in the folded form:", ""]
        for model, sites in fallbacks.items():
            for s in sites:
                lines.append(f"- {model}: `{s['site']}`: {s['reason']}")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    ap.add_argument("--models", default="", help="comma-separated sample folders (default: all)")
    ap.add_argument("--bounds", default="", help="folder of <model>.bounds.json (default: data)")
    ap.add_argument("--fraction", type=float, default=0.7, help="bound = fraction x channel max")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--runs", type=int, default=300, help="timed rounds (>= 200 for the report)")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    ap.add_argument("--fixed-batch", type=int, default=0,
                    help="time copies of the samples with their batch fixed at N (timed at N)")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    args = ap.parse_args()

    folders = sorted(p.parent for p in (ROOT / "sample_models").glob("*/model.onnx"))
    if args.models:
        wanted = set(args.models.split(","))
        folders = [f for f in folders if f.name in wanted]
    batches = [int(b) for b in args.batches.split(",")]
    env = {
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "runs": args.runs,
        "warmup": args.warmup,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "bounds": args.bounds or f"{args.fraction} x per-channel max activation on clean.npz",
    }
    print(f"onnxruntime {ort.__version__} CPU, intra-op threads {args.threads}, "
          f"{args.runs} interleaved runs after {args.warmup} warm-up; bounds: {env['bounds']}")
    print(f"{'model':26} {'batch':>5} {'orig ms':>8}  {'min':>6} {'fold':>6} {'layer':>6}  "
          "Min fallbacks / sites")
    rows, worst = [], 0.0
    for folder in folders:
        proto = onnx.load(str(folder / "model.onnx"))
        if args.fixed_batch:
            proto = with_fixed_batch(proto, args.fixed_batch)
        fixed = fixed_batch(proto)
        clean = np.load(folder / "clean.npz")["x"].astype(np.float32)
        if args.bounds and not (Path(args.bounds) / f"{folder.name}.bounds.json").exists():
            print(f"{folder.name}: no bounds in {args.bounds}, skipped")
            continue
        bounds = bounds_for(folder, proto, clean, args)
        models, report = variants(proto, bounds)
        diff = agreement(models, clean)
        if diff > AGREE_ATOL:
            print(f"{folder.name}: folded and min forms differ by {diff:.2e} x logit scale")
            return 1
        if fixed and batches != [fixed]:
            print(f"{folder.name}: batch fixed at {fixed} in the model: timed on batches of {fixed}, "
                  f"not {', '.join(map(str, batches))}")
        for batch in [fixed] if fixed else batches:
            x = np.ascontiguousarray(np.resize(clean, (batch,) + clean.shape[1:]))
            times = time_interleaved(models, x, runs=args.runs, warmup=args.warmup,
                                     threads=args.threads)
            row = {"model": folder.name, "batch": batch, "fixed_batch": fixed, "agreement": diff,
                   "sites": len(report.sites), "fallbacks": report.count("min"),
                   "fallback_sites": [s.__dict__ for s in report.fallbacks]}
            base = stats(times["original"])
            for form in FORMS:
                st = stats(times[form])
                st["ratio"] = st["median_ms"] / base["median_ms"]
                st["p95_ratio"] = st["p95_ms"] / base["p95_ms"]
                row[form] = st
            rows.append(row)
            worst = max(worst, row["fold"]["ratio"])
            print(f"{folder.name:26} {batch:5d} {base['median_ms']:8.3f}  "
                  f"{row['min']['ratio']:6.3f} {row['fold']['ratio']:6.3f} "
                  f"{row['layer']['ratio']:6.3f}  {row['fallbacks']}/{row['sites']}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latency.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    (out / "latency.md").write_text(markdown(rows, env))
    verdict = "PASSED" if worst <= TARGET else "FAILED"
    print(f"wrote {out / 'latency.md'} and latency.json")
    print(f"{verdict}: worst fold/original median ratio {worst:.3f} (target <= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
