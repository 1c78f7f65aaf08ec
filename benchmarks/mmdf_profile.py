"""Where an MMDF graph spends its time: onnxruntime's profiler, kernel time by part and op type.

    python benchmarks/mmdf_profile.py MODEL.onnx DATA.npz [--batches 1,64] [--runs 100] [--json]

Runs MODEL (any ONNX model; MMDF graphs are split into their parts) on random draws of DATA's
images with one intra-op thread and the profiler on, and adds up each node's kernel time by the
part of the graph its output belongs to: the original model, MMDF's screen, the feature test,
the bounded branch, the decision, the gate (the `If` and its gathers). Node names are read
from the graph onnxruntime actually runs (after its fusions), so fused nodes count where their
output lies; a node onnxruntime moves into its blocked layout can take a new output name and
count as the original's (the screen's GlobalMaxPools). The profiler's own cost per node inflates
the totals on small models; the shares are what to read.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

PARTS = (  # first match wins, on the name of a node's first output
    ("features", re.compile(r"^mmdf/(f\d+|features)/")),
    ("screen", re.compile(r"^mmdf/screen/")),
    ("bounded", re.compile(r"^mmdf/bounded/")),
    ("gate", re.compile(r"^mmdf/gated/")),
    ("decision", re.compile(r"^mmdf/")),
)


def part_of(node: onnx.NodeProto) -> str:
    if node.op_type == "If":
        return "gate"
    name = next((o for o in node.output if o), "")
    return next((part for part, rx in PARTS if rx.search(name)), "original")


def node_parts(graph: onnx.GraphProto, out: dict) -> dict:
    for n in graph.node:
        out[n.name] = part_of(n)
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                node_parts(a.g, out)
    return out


def options() -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def profile(path: Path, x: np.ndarray, batch: int, runs: int, seed: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:  # the optimised model and the profile (MBs)
        so = options()
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        parts = node_parts(onnx.load(Path(tmp) / "optimized.onnx").graph, {})
        so = options()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        fixed = sess.get_inputs()[0].shape[0]
        batch = fixed if isinstance(fixed, int) else batch
        rng = np.random.default_rng(seed)
        for _ in range(runs):
            sess.run(None, {name: x[rng.choice(len(x), batch, replace=batch > len(x))]})
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_part, by_op, nodes, run = collections.Counter(), collections.Counter(), collections.Counter(), 0.0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            run += e["dur"]
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        # Nodes not in the saved graph are ones onnxruntime adds when it runs (layout reorders).
        part = parts.get(e["name"][: -len("_kernel_time")], "onnxruntime")
        by_part[part] += e["dur"]
        by_op[f"{part}:{e['args']['op_name']}"] += e["dur"]
        nodes[part] += 1
    kernel = sum(by_part.values())
    return {
        "model": path.name, "batch": batch, "runs": runs,
        "run_ms": run / runs / 1e3, "kernel_ms": kernel / runs / 1e3,
        "parts": {p: {"ms": t / runs / 1e3, "share": t / kernel, "nodes": nodes[p] / runs}
                  for p, t in by_part.most_common()},
        "top_ops": {k: t / kernel for k, t in by_op.most_common(12)},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("data", type=Path, help=".npz with x")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    x = np.load(args.data)["x"].astype(np.float32)
    rows = [profile(args.model, x, int(b), args.runs) for b in args.batches.split(",")]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(f"{r['model']} batch {r['batch']}: run {r['run_ms']:.3f} ms, kernels {r['kernel_ms']:.3f} ms")
        for p, v in r["parts"].items():
            print(f"  {p:9s} {v['ms']:8.3f} ms {100 * v['share']:5.1f}%  {v['nodes']:5.0f} nodes")
        print("  top ops: " + ", ".join(f"{k} {100 * s:.1f}%" for k, s in r["top_ops"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
