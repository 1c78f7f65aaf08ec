"""harden and scan under torchrun: wall time on 1 and N ranks, each rank's share, same results.

    python benchmarks/bench_dist.py [--out bench-results] [--ranks 1,2] [--only a,b] [--threads 1]
                                    [--cache DIR] [--no-build]

Each command runs as a user runs it, `torchrun --standalone --nproc-per-node N -m mmexport CMD
... --settings FILE`, once per rank count, timed wall-clock from this script. The settings pin a
short, fixed schedule (time limit 0: with a limit, more ranks would buy a longer schedule and
the times would not compare). Cases: the real tier's PreAct-ResNet-18 (BadNets; built first
where missing, about 40 min, unless --no-build), and random-weight VGG-style nets at 32x32x3
with 100 and 1,000 classes (timing does not depend on the weights; the work grows with the
classes). Each row has the ranks' rows (forward or forward+backward, from the report's
`distributed`) and whether the result equals the 1-rank run's (bounds file byte for byte; the
scan's statistics). On a CUDA machine one more row per case: 1 rank on the GPU.

On a 2-core machine two ranks of one thread each can at most halve the time; other jobs on the
machine take their share. Writes <out>/dist.md and dist.json and prints the table as it goes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "sample_models"))

# (name, source, classes, clean images per class); source "real:<tier model>" or "random:<arch>:<width>"
CASES = [
    ("real-resnet18-badnet", "real:real-resnet18-badnet", 10, None),
    ("vgg-32-k100", "random:vgg-bn:32", 100, 5),
    ("vgg-32-k1000", "random:vgg-bn:32", 1000, 2),
]
HARDEN = {"unlearn": "off", "restarts": 2, "warmup_steps": 4, "steps": 2, "max_epochs": 4, "check_every": 2,
          "probe_steps": 4, "fit_rows": 64, "floor_rows": 256, "time_limit": 0}
SCAN = {"restarts": 2, "ascent_steps": 10, "universal_steps": 5, "universal_batch": 5, "judge_rows": 20,
        "time_limit": 0}
COLUMNS = ("case", "params", "classes", "command", "ranks", "device", "wall s", "speed-up", "rows per rank",
           "same as 1 rank")  # fmt: skip


def case_files(name: str, source: str, k: int, per_class: int | None, tmp: Path, args) -> tuple[Path, Path]:
    if source.startswith("real:"):
        import build_real

        spec = source.split(":", 1)[1]
        folder = args.cache / spec
        if not (folder / "model.onnx").exists():
            if args.no_build:
                raise FileNotFoundError(f"{folder / 'model.onnx'} missing (--no-build)")
            build_real.main(["--only", spec, "--out", str(args.cache)])
        return folder / "model.onnx", folder / "clean.npz"
    from bench_cost import random_case

    _, arch, width = source.split(":")
    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    return random_case(folder, arch, int(width), 32, k, per_class)


def torchrun(n: int, argv: list[str], log: Path) -> tuple[dict, float]:
    """`torchrun -m mmexport *argv --json` on n ranks; its JSON and wall seconds."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo on the loopback, whatever the hostname resolves to
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m",
           "mmexport", *argv, "--json", "-q"]
    t0 = time.perf_counter()
    with open(log, "wb") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("error")]
        raise RuntimeError(f"{' '.join(argv[:2])} on {n} ranks exited {proc.returncode}: "
                           f"{tail[-1] if tail else 'see ' + str(log)}")
    return json.loads(proc.stdout), wall


def run_case(name, source, k, per_class, tmp: Path, args) -> list[dict]:
    import numpy as np
    import onnx

    model, data = case_files(name, source, k, per_class, tmp, args)
    params = sum(int(np.prod(t.dims)) for t in onnx.load(str(model)).graph.initializer)
    rows, first = [], {}
    devices = ["cpu"] + (["cuda"] if args.cuda else [])
    for command, settings in (("harden", HARDEN), ("scan", SCAN)):
        spec = tmp / f"{name}-{command}.settings.json"
        spec.write_text(json.dumps(settings))
        for device in devices:
            for n in (args.ranks if device == "cpu" else [1]):
                where = tmp / f"{name}-{command}-{device}-{n}"
                where.mkdir(parents=True, exist_ok=True)
                argv = [command, str(model), "--data", str(data), "--settings", str(spec), "--device", device,
                        "--threads", str(args.threads)]
                if command == "harden":
                    argv += ["-o", str(where / "model.mmac.onnx"), "--force"]
                report, wall = torchrun(n, argv, where / "log.txt")
                result = ((where / "model.mmac.onnx.bounds.json").read_bytes() if command == "harden"
                          else json.dumps([report["tests"], report["p_value"]]))
                share = (report.get("distributed") or {}).get("rows_per_rank", [])
                base = first.setdefault((command, device), (wall, result))
                row = {"case": name, "params": params, "classes": k, "command": command, "ranks": n, "device": device,
                       "wall s": round(wall, 1), "speed-up": round(base[0] / wall, 2),
                       "rows per rank": " / ".join(f"{r} ({100 * r / max(1, sum(share)):.0f}%)" for r in share),
                       "same as 1 rank": "yes" if result == base[1] else "NO"}
                rows.append(row)
                print(" | ".join(str(row[c]) for c in COLUMNS), flush=True)
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = [
        "# harden and scan under torchrun",
        "",
        f"{datetime.date.today().isoformat()}, {platform.node()}: {os.cpu_count()} cores, {args.threads} thread(s) "
        f"per rank, Python {platform.python_version()}. Settings (time limit 0): harden {json.dumps(HARDEN)}; "
        f"scan {json.dumps(SCAN)}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    ap.add_argument("--ranks", default="1,2", help="rank counts to compare [1,2]")
    ap.add_argument("--only", default=None, help="comma-separated case names")
    ap.add_argument("--threads", type=int, default=1, help="threads per rank [1]")
    ap.add_argument("--cache", type=Path, default=ROOT / "sample_models" / "real")
    ap.add_argument("--no-build", action="store_true", help="skip real-tier models that are not built")
    args = ap.parse_args(argv)
    args.ranks = [int(v) for v in args.ranks.split(",")]
    import torch

    args.cuda = torch.cuda.is_available()
    only = set(args.only.split(",")) if args.only else None
    tmp = args.out / "dist"
    tmp.mkdir(parents=True, exist_ok=True)
    print(" | ".join(COLUMNS), flush=True)
    rows, failed = [], 0
    for case in CASES:
        if only and case[0] not in only:
            continue
        try:
            rows += run_case(*case, tmp, args)
        except (RuntimeError, FileNotFoundError) as exc:
            failed += 1
            rows.append({"case": case[0], "command": "-", "wall s": f"failed: {exc}"})
            print(f"{case[0]}: {exc}", file=sys.stderr, flush=True)
    (args.out / "dist.md").write_text(markdown(rows, args))
    (args.out / "dist.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out / 'dist.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
