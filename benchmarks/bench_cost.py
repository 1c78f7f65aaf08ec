"""What a harden costs as models grow: time and memory against parameters, input size, classes.

    python benchmarks/bench_cost.py [--out bench-results] [--limit 60] [--threads 1] [--only a,b] [--plan-only]

Random-weight nets (timing does not depend on the weights) from the real tier's architectures
(sample_models/real_nets.py) at inputs 16/32/64/224 and 10/100/1000 classes, and one 16x16
sample. For each: the per-row costs harden measures (`mmexport harden --plan`: forward+backward
and forward ms per row, MiB autograd saves per row, rows per memory chunk), the predicted time
of the default schedule, and the schedule the default (auto) limit gives. Then, where the floors
of the schedule fit in a short run, a real `mmexport harden --time-limit LIMIT` in a subprocess
(`--plan-only`: none):
wall seconds and peak RSS (os.wait4), beside the prediction, so the prediction's error is in
the table. Writes <out>/cost.md and cost.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "sample_models"))

from build import export  # noqa: E402
from real_nets import ARCHITECTURES  # noqa: E402

from mmexport.core.data import Dataset, save_npz  # noqa: E402
from mmexport.defences.harden import plan  # noqa: E402

# (name, architecture, width, input side, classes, clean images per class)
GRID = [
    ("resnet18-16", "preact-resnet18", 64, 16, 10, 20),
    ("resnet18-32", "preact-resnet18", 64, 32, 10, 20),
    ("resnet18-64", "preact-resnet18", 64, 64, 10, 20),
    ("resnet18-224", "preact-resnet18", 64, 224, 10, 20),
    ("resnet18-32-k100", "preact-resnet18", 64, 32, 100, 20),
    ("resnet18-32-k1000", "preact-resnet18", 64, 32, 1000, 5),
    ("mobilenetv2-32", "mobilenetv2", 16, 32, 10, 20),
    ("mobilenetv2-224", "mobilenetv2", 16, 224, 10, 20),
    ("vgg-32", "vgg-bn", 32, 32, 10, 20),
    ("convnext-32", "convnext", 32, 32, 10, 20),
]
SAMPLE = ROOT / "sample_models" / "digits-cnn-badnet"


def with_classes(model: nn.Module, k: int) -> nn.Module:
    """The net with its last Linear replaced by one with k outputs."""
    parent, name = None, None
    for mod in model.modules():
        for child_name, child in mod.named_children():
            if isinstance(child, nn.Linear):
                parent, name = mod, child_name
    old = getattr(parent, name)
    setattr(parent, name, nn.Linear(old.in_features, k))
    return model


def random_case(folder: Path, arch: str, width: int, side: int, k: int, per_class: int) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = with_classes(ARCHITECTURES[arch](width), k).eval()
    path = folder / "model.onnx"
    export(model, path, shape=(3, side, side))
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(k), per_class)
    x = rng.uniform(0, 1, size=(len(y), 3, side, side)).astype(np.float32)
    save_npz(folder / "clean.npz", Dataset(x, y.astype(np.int64)))
    return path, folder / "clean.npz"


def run_harden(model: Path, data: Path, out: Path, limit: float, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "mmexport", "harden", str(model), "--data", str(data), "-o", str(out), "--force",
           "--json", "-q", "--time-limit", str(limit)]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": stderr.decode().strip().splitlines()[-1] if stderr else f"exit {proc.returncode}"}
    report = json.loads(stdout)
    scale = 1024**3 if sys.platform != "darwin" else 1024**3 / 1024
    return {"wall_s": round(wall, 1), "search_s": round(report["seconds"], 1),
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / scale, 2), "stage": report["stage"],
            "planned_s": report["schedule"]["planned_seconds"]}


def row_for(name, arch, width, side, k, per_class, tmp: Path, args) -> dict:
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    if arch == "sample":
        model, data = SAMPLE / "model.onnx", SAMPLE / "clean.npz"
        params = json.loads((SAMPLE / "card.json").read_text())["architecture"]["params"]
    else:
        model, data = random_case(folder, arch, width, side, k, per_class)
        params = sum(int(np.prod(t.dims)) for t in onnx.load(str(model)).graph.initializer)
    default = plan(model, data, threads=args.threads, device="cpu")
    short = plan(model, data, threads=args.threads, device="cpu", time_limit=args.limit)
    row = {"name": name, "arch": arch, "params": params, "input": side, "classes": k, "clean_set": k * per_class,
           **{key: default.to_json()[key] for key in ("backward_ms_per_row", "forward_ms_per_row",
                                                      "saved_mib_per_row", "chunk_rows")},
           "default_schedule_s": round(default.default_seconds), "auto_limit_s": round(default.time_limit),
           "auto_scale": round(default.scale, 3), "auto_planned_s": round(default.planned_seconds),
           f"limit_{args.limit:g}_planned_s": round(short.planned_seconds)}
    if args.plan_only:
        row["note"] = "planned only (--plan-only)"
    elif short.planned_seconds <= 1.5 * args.limit:
        row |= run_harden(model, data, folder / "out.onnx", args.limit, args.threads)
    else:
        row["note"] = f"not run: even the schedule's floors are predicted at {short.planned_seconds:.0f} s"
    return row


COLUMNS = ["name", "params", "input", "classes", "clean_set", "backward_ms_per_row", "saved_mib_per_row",
           "chunk_rows", "default_schedule_s", "auto_limit_s", "auto_scale", "auto_planned_s"]


def markdown(rows: list[dict], limit: float) -> str:
    cols = COLUMNS + [f"limit_{limit:g}_planned_s", "wall_s", "search_s", "peak_rss_gib", "note"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, r.get("error", "-") if c == "note" else "-")) for c in cols)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--limit", type=float, default=60.0, help="--time-limit of the measured harden runs [60]")
    ap.add_argument("--threads", type=int, default=None, help="threads for every run [the CLI's default]")
    ap.add_argument("--only", default="", help="comma-separated row names")
    ap.add_argument("--plan-only", action="store_true", help="per-row costs and plans only: no harden runs")
    args = ap.parse_args(argv)
    grid = [("digits-cnn-badnet (sample)", "sample", 16, 16, 10, 20), *GRID]
    if args.only:
        grid = [g for g in grid if g[0] in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in grid:
            print(f"cost: {spec[0]} ...", file=sys.stderr, flush=True)
            rows.append(row_for(*spec, Path(tmp), args))
            print(json.dumps(rows[-1]), flush=True)
    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": args.threads, "limit": args.limit, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    (args.out / "cost.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1) + "\n")
    text = (f"# Harden cost against model size\n\n{info}\n\nPer-row costs as `harden --plan` measures them; "
            "`default_schedule_s`: the predicted time of the default schedule (stamp search, unlearning, "
            "margin check); `auto_*`: the default --time-limit and the schedule it gives; the measured "
            f"columns come from one `harden --time-limit {args.limit:g}` run each.\n\n" + markdown(rows, args.limit))
    (args.out / "cost.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
