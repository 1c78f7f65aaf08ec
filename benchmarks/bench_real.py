"""Wall time and peak memory of harden, detect and scan on the real-size tier, against targets.

    python benchmarks/bench_real.py [--models a,b] [--commands harden,detect,scan] [--out bench-results]
                                    [--threads N] [--cache DIR] [--no-build] [--extra ARGS]

Each command runs as the user runs it: `mmexport CMD MODEL --data clean.npz --json` in its own
process, timed wall-clock (seconds) and measured by the child's own rusage (peak RSS, GiB), so
nothing of this script's memory is counted. The models of sample_models/build_real.py (32x32x3,
PreAct-ResNet-18 11M parameters, VGG, MobileNetV2, ConvNeXt) are built first where missing (about
10 min per ResNet-18). The hardened and MMDF models go to <out>/real/<model>/ with each command's
JSON report and log; `mmexport validate` (onnxruntime, test.npz and attack.npz) then measures
accuracy and ASR before and after, and MMDF's detection and false-positive rates.

Targets (wall seconds): preact-resnet18 harden 600, detect 300, scan 180; vgg-bn and mobilenetv2
harden 300; every command at most 4 GiB peak RSS. A missed target shows by how much.
Writes <out>/real.md and <out>/real.json, and prints the table as it goes.

--extra passes arguments to every benchmarked command (not to validate); prefix them with
command names to scope them, e.g. --extra "harden,detect:--max-epochs 2" (repeatable).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "sample_models"))
import build_real  # noqa: E402

COMMANDS = ("harden", "detect", "scan")
WRITES = {"harden": "model.mmac.onnx", "detect": "model.mmdf.onnx"}
TARGET_S = {
    ("preact-resnet18", "harden"): 600, ("preact-resnet18", "detect"): 300, ("preact-resnet18", "scan"): 180,
    ("vgg-bn", "harden"): 300, ("mobilenetv2", "harden"): 300,
}  # fmt: skip
TARGET_RSS_GIB = 4.0
# The parts of each command's JSON report worth showing; the full report is kept beside the model.
KEEP = {
    "harden": ("stage", "seconds", "epochs", "schedule"),
    "detect": ("bounds_source", "statistic", "threshold", "false_positive_rate_clean_set"),
    "scan": ("verdict", "target_class", "p_value", "seconds"),
}
METRICS = ("accuracy", "balanced_accuracy", "asr", "ra", "detection_rate", "false_positive_rate")
HEADER = ("model", "arch", "params", "command", "wall s", "target s", "met / gap", "peak RSS GiB",
          "acc before->after", "ASR before->after", "MMDF detection / FPR", "notes")  # fmt: skip


class BenchError(Exception):
    """A failed step; main() reports it on one line. Carries the step's wall seconds and peak RSS."""

    def __init__(self, message: str, wall: float = 0.0, rss: float = 0.0):
        super().__init__(message)
        self.wall, self.rss = wall, rss


def run(argv: list[str], log: Path) -> tuple[dict, float, float]:
    """Run `mmexport *argv --json`; return its JSON report, wall seconds and peak RSS (GiB)."""
    stdout = log.with_suffix(".json")
    with open(stdout, "wb") as out, open(log, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "mmexport", *argv, "--json"], stdout=out, stderr=err,
                                cwd=ROOT)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the whole process tree's
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss / 2**30 if sys.platform == "darwin" else usage.ru_maxrss / 2**20  # bytes vs KiB
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else "no output"
        raise BenchError(f"`mmexport {argv[0]}` on {argv[1]} exited {proc.returncode}: {last} (log: {log})",
                         wall, rss)  # fmt: skip
    try:
        report = json.loads(stdout.read_text())
    except ValueError as e:
        msg = f"`mmexport {argv[0]}` on {argv[1]} printed no JSON report ({e}; see {stdout})"
        raise BenchError(msg, wall, rss) from None
    return report, wall, rss


def measure(model: Path, folder: Path, threads: list[str], log: Path) -> dict:
    """validate's metrics of `model` on the sample's test set (and attack set where there is one)."""
    argv = ["validate", str(model), "--data", str(folder / "test.npz"), *threads]
    if (folder / "attack.npz").exists():
        argv += ["--attack", str(folder / "attack.npz")]
    report, _, _ = run(argv, log)
    return {k: report.get(k) for k in METRICS}


def extra_args(specs: list[str]) -> dict[str, list[str]]:
    """--extra values as arguments per command ("harden,detect:ARGS" scopes them)."""
    scoped = {c: [] for c in COMMANDS}
    for spec in specs:
        m = re.match(rf"^((?:{'|'.join(COMMANDS)})(?:,(?:{'|'.join(COMMANDS)}))*):(.*)$", spec, re.S)
        names, args = (m.group(1).split(","), m.group(2)) if m else (COMMANDS, spec)
        for name in names:
            scoped[name] += shlex.split(args)
    return scoped


def verdict(row: dict) -> str:
    """'met', or each target missed and by how much."""
    gaps = []
    if row["target_s"] is not None and row["wall_s"] > row["target_s"]:
        gaps.append(f"time missed by {row['wall_s'] / row['target_s']:.1f}x")
    if row["peak_rss_gib"] > TARGET_RSS_GIB:
        gaps.append(f"RSS over by {row['peak_rss_gib'] / TARGET_RSS_GIB:.1f}x")
    if row.get("failed"):
        gaps.insert(0, "FAILED")
    return "; ".join(gaps) or ("met" if row["target_s"] is not None else "met (RSS only)")


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def cells(row: dict) -> list[str]:
    b, a, r = row.get("before") or {}, row.get("after") or {}, row.get("report") or {}
    changed = row["command"] in WRITES and a
    notes = {
        "harden": lambda: f"stage {r.get('stage')}, search {r.get('seconds', 0):.0f} s",
        "detect": lambda: f"bounds {r.get('bounds_source')}",
        "scan": lambda: f"{r.get('verdict')} (target {r.get('target_class')}, p={r.get('p_value', 0):.2g})",
    }[row["command"]]
    return [
        row["model"], row["arch"], f"{row['params'] / 1e6:.2f}M" if row["params"] else "-", row["command"],
        f"{row['wall_s']:.1f}", str(row["target_s"] or "-"), row["status"], f"{row['peak_rss_gib']:.2f}",
        f"{pct(b.get('accuracy'))}->{pct(a.get('accuracy'))}" if changed else "-",
        f"{pct(b.get('asr'))}->{pct(a.get('asr'))}" if changed and b.get("asr") is not None else "-",
        f"{pct(a.get('detection_rate'))} / {pct(a.get('false_positive_rate'))}" if row["command"] == "detect" and a
        else "-",
        row.get("error") or (notes() if r else "-"),
    ]  # fmt: skip


def line(values) -> str:
    return "| " + " | ".join(str(v) for v in values) + " |"


def write(out: Path, result: dict) -> None:
    (out / "real.json").write_text(json.dumps(result, indent=2) + "\n")
    m, settings = result["machine"], result["settings"]
    md = [
        "# Real-size tier: wall time and peak RSS against targets", "",
        f"{m['time']}, {m['platform']}, {m['cpu_count']} CPUs ({m['cpus_usable']} usable), torch {m['torch']}, "
        f"threads {settings['threads'] or 'CLI default'}, extra {'; '.join(settings['extra']) or 'none'}.",
        f"Targets: wall seconds as listed; peak RSS <= {TARGET_RSS_GIB:g} GiB for every command. "
        "Accuracy, ASR, detection and FPR in % on test.npz / attack.npz (onnxruntime).", "",
        line(HEADER), line(["---"] * len(HEADER)), *(line(cells(r)) for r in result["rows"]),
    ]  # fmt: skip
    if result.get("error"):
        md += ["", f"**Stopped:** {result['error']}"]
    (out / "real.md").write_text("\n".join(md) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated build_real models (default: all)")
    ap.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated subset of harden,detect,scan")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results")
    ap.add_argument("--threads", type=int, help="--threads of every command (default: the CLI's choice)")
    ap.add_argument("--cache", type=Path, default=build_real.CACHE, help="where the models are built")
    ap.add_argument("--no-build", action="store_true", help="fail if a model is not built instead of building it")
    ap.add_argument("--extra", action="append", default=[], help="arguments for the commands (see above)")
    args = ap.parse_args()

    specs = {s.name: s for s in build_real.SPECS}
    names = [n for n in args.models.split(",") if n] or list(specs)
    commands = [c for c in args.commands.split(",") if c]
    bad = [n for n in names if n not in specs] + [c for c in commands if c not in COMMANDS]
    if bad:
        print(f"error: unknown model or command {', '.join(bad)}; models: {', '.join(specs)}", file=sys.stderr)
        return 1
    missing = [n for n in names if not build_real.cached(args.cache / n)]
    if missing and args.no_build:
        print(f"error: not built in {args.cache}: {', '.join(missing)} (run `make zoo-real` or drop --no-build)",
              file=sys.stderr)  # fmt: skip
        return 1
    folders = build_real.ensure(names, out=args.cache, log=lambda m: print(m, file=sys.stderr, flush=True))
    threads = ["--threads", str(args.threads)] if args.threads else []
    extra = extra_args(args.extra)

    import torch  # already loaded by build_real

    result = {
        "machine": {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "settings": {"threads": args.threads, "extra": args.extra, "commands": commands, "cache": str(args.cache)},
        "targets": {"wall_s": {f"{a} {c}": s for (a, c), s in TARGET_S.items()}, "peak_rss_gib": TARGET_RSS_GIB},
        "rows": [], "error": None,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    print(line(HEADER) + "\n" + line(["---"] * len(HEADER)), flush=True)
    try:
        for folder in folders:
            spec, dest = specs[folder.name], args.out / "real" / folder.name
            dest.mkdir(parents=True, exist_ok=True)
            params = json.loads((folder / "card.json").read_text()).get("architecture", {}).get("params")
            before = measure(folder / "model.onnx", folder, threads, dest / "validate-original.log")
            for cmd in commands:
                row = {"model": folder.name, "arch": spec.arch, "params": params, "command": cmd,
                       "target_s": TARGET_S.get((spec.arch, cmd)), "before": before}  # fmt: skip
                argv = [cmd, str(folder / "model.onnx"), "--data", str(folder / "clean.npz"), *threads]
                if cmd in WRITES:
                    argv += ["-o", str(dest / WRITES[cmd]), "--force"]
                print(f"running mmexport {cmd} on {folder.name}", file=sys.stderr, flush=True)
                try:
                    report, row["wall_s"], row["peak_rss_gib"] = run(argv + extra[cmd], dest / f"{cmd}.log")
                    row["report"] = {k: report[k] for k in KEEP[cmd] if k in report}
                    if cmd in WRITES:
                        row["after"] = measure(dest / WRITES[cmd], folder, threads, dest / f"validate-{cmd}.log")
                except BenchError as e:  # keep the failed row (with the command's own figures if it got that far)
                    row.setdefault("wall_s", e.wall)
                    row.setdefault("peak_rss_gib", e.rss)
                    row.update(failed=True, error=str(e))
                    row["status"] = verdict(row)
                    result["rows"].append(row)
                    print(line(cells(row)), flush=True)
                    raise
                row["status"] = verdict(row)
                result["rows"].append(row)
                print(line(cells(row)), flush=True)
                write(args.out, result)
    except BenchError as e:
        result["error"] = str(e)
        write(args.out, result)
        print(f"error: {e}", file=sys.stderr)
        return 1
    write(args.out, result)
    missed = sum(r["status"] not in ("met", "met (RSS only)") for r in result["rows"])
    print(f"\n{len(result['rows'])} runs, {missed} missed a target; {args.out / 'real.md'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
