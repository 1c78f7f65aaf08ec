"""mmexport beside the defences a user would otherwise pick, measured in one run.

    python benchmarks/bench_defences.py [--models a,b] [--speed-models a,b] [--out bench-results]

Four sections, every figure from this run (nothing typed by hand), all models exported to
ONNX and measured under onnxruntime CPU on the sample's test and attack sets:

1. Efficacy on every backdoored sample and the clean one: no defence, MMAC (channel and
   layer bounds), MMDF, and four peers from mmexport.defences.baselines (earlier activation
   clipping, fine-pruning, CLP, fine-tuning), each given the same clean set D only.
2. Long-tailed samples: MMOM, MMOM + last-layer refit, and the long-tail baselines
   (tau-normalisation, post-hoc logit adjustment with priors estimated from the model's
   own predictions on D, re-training the last layer on D).
3. Harden wall time, defaults vs the paper code's schedule (300 epochs, 50 noise starts per
   class, 300 ascent steps every 100 epochs, mean of the margins, floor 0.95), with the
   efficacy of both.
4. onnxruntime latency of original, hardened (channel, layer) and MMDF models: median and
   p95 of interleaved runs at batch 1 and 64, as ratios to the original.

Writes <out>/bench.md and bench.json, and the MMAC channel bounds to <out>/bounds/ for
bench_latency.py. Seeds are fixed (--seed); the attack sets are read only to measure.
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
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_latency import stats, time_interleaved  # noqa: E402

from mmexport.core.data import load_npz  # noqa: E402
from mmexport.core.model import load_model  # noqa: E402
from mmexport.defences.baselines.peers import PEERS  # noqa: E402
from mmexport.defences.common.stats import balanced_accuracy  # noqa: E402
from mmexport.defences.harden import harden  # noqa: E402
from mmexport.defences.mmdf.detector import detect  # noqa: E402
from mmexport.defences.mmom.refit import classifier_weights, features, find_classifier, refit, write_classifier  # noqa: E402
from mmexport.engine.executor import Engine  # noqa: E402
from mmexport.runtime.metrics import validate  # noqa: E402

# The reference schedule of the authors' mmac.py, in our search's terms.
PAPER_SCHEDULE = dict(
    maximisers="points",
    clean_fraction=0.0,
    restarts=50,
    warmup_steps=300,
    steps=300,
    refresh_every=100,
    max_epochs=300,
    reduction="mean",
    acc_floor=0.95,
    lambda_up=1.2,
    check_every=10,
    augment=False,
    patience=10**6,
)
SPEED_MODELS = ("digits-cnn-badnet", "digits-cnn-wide-badnet", "digits-cnn-blend", "digits-resnet-badnet")
TAUS = tuple(round(0.1 * i, 1) for i in range(21))


def card(folder: Path) -> dict:
    return json.loads((folder / "card.json").read_text())


def measure(proto, folder: Path) -> dict:
    test = load_npz(folder / "test.npz")
    attack = load_npz(folder / "attack.npz", attack=True) if (folder / "attack.npz").exists() else None
    r = validate(proto, test, attack=attack, provider="cpu")
    return {
        "acc": r.accuracy,
        "bal": r.balanced_accuracy,
        "asr": r.asr,
        "ra": r.ra,
        "per_class": r.per_class_accuracy,
        "detection": r.detection_rate,
        "fpr": r.false_positive_rate,
    }


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# --- 1. backdoor defences ----------------------------------------------------------------


def defences(folder: Path, seed: int, bounds_dir: Path, device: str) -> tuple[list[dict], dict]:
    """Rows for one model, and the models to time (original, channel, layer, MMDF)."""
    model = folder / "model.onnx"
    original = onnx.load(str(model))
    clean = load_npz(folder / "clean.npz")
    rows = [{"defence": "none", "seconds": 0.0, **measure(original, folder)}]
    protos = {"original": original}

    for gran in ("channel", "layer"):
        res, s = timed(lambda g=gran: harden(model, clean, granularity=g, device=device, seed=seed))
        protos[gran] = res.model
        rows.append({"defence": f"mmac-{gran}", "seconds": s, **measure(res.model, folder)})
        if gran == "channel":
            (bounds_dir / f"{folder.name}.bounds.json").write_text(res.bounds.dumps())
    res, s = timed(lambda: detect(model, clean, seed=seed, device=device))
    protos["mmdf"] = res.model
    rows.append({"defence": "mmdf", "seconds": s, **measure(res.model, folder)})

    for name, peer in PEERS.items():
        (proto, info), s = timed(lambda p=peer: p(original, clean.x, clean.y, seed=seed))
        rows.append({"defence": name, "seconds": s, "info": info, **measure(proto, folder)})
    return rows, protos


# --- 2. long tail -------------------------------------------------------------------------


def tau_normalised(folder: Path, x: np.ndarray, y: np.ndarray) -> tuple[onnx.ModelProto, dict]:
    """Kang et al. 2020: rows of the last layer divided by ||w_k||^tau, tau chosen on D."""
    m = load_model(folder / "model.onnx")
    clf = find_classifier(m)
    w, b = classifier_weights(m, clf)
    f = features(Engine(m), torch.from_numpy(x), clf)
    norms = np.linalg.norm(w, axis=1, keepdims=True)
    best = None
    for tau in TAUS:
        wt = w / norms**tau
        pred = (f @ torch.from_numpy(wt).T + torch.from_numpy(b)).argmax(1)
        score = balanced_accuracy(pred, torch.from_numpy(y), len(b))
        if best is None or score > best[0]:
            best = (score, tau, wt)
    return write_classifier(m, best[2], b), {"tau": best[1], "balanced_accuracy_D": best[0]}


def logit_adjusted(folder: Path, x: np.ndarray) -> tuple[onnx.ModelProto, dict]:
    """Menon et al. 2021, post hoc: logits - log(prior); the prior is the model's mean
    softmax on D (the training frequencies are unknown to the user)."""
    m = load_model(folder / "model.onnx")
    clf = find_classifier(m)
    w, b = classifier_weights(m, clf)
    with torch.no_grad():
        prior = torch.softmax(Engine(m)(torch.from_numpy(x)).double(), 1).mean(0).numpy()
    return write_classifier(m, w, b - np.log(prior)), {"prior": prior.round(4).tolist()}


def long_tail(folder: Path, seed: int, device: str) -> list[dict]:
    model = folder / "model.onnx"
    clean = load_npz(folder / "clean.npz")
    m = load_model(model)
    rows = [{"method": "none", "seconds": 0.0, **measure(m.proto, folder)}]
    for method in ("mmom", "mmom-refit"):
        res, s = timed(lambda me=method: harden(model, clean, method=me, device=device, seed=seed))
        rows.append({"method": method, "seconds": s, **measure(res.model, folder)})
    (proto, info), s = timed(lambda: tau_normalised(folder, clean.x, clean.y))
    rows.append({"method": "tau-normalisation", "seconds": s, "info": info, **measure(proto, folder)})
    (proto, info), s = timed(lambda: logit_adjusted(folder, clean.x))
    rows.append({"method": "logit-adjustment", "seconds": s, "info": info, **measure(proto, folder)})

    def retrain():
        engine = Engine(m)
        w, b, table = refit(engine, torch.from_numpy(clean.x), torch.from_numpy(clean.y), m.num_classes, seed=seed)
        return write_classifier(m, w, b), {"cross_validation": table}

    (proto, info), s = timed(retrain)
    rows.append({"method": "last-layer-retrain", "seconds": s, "info": info, **measure(proto, folder)})
    return rows


# --- 3. schedule --------------------------------------------------------------------------


def schedule(folder: Path, seed: int, default_row: dict, device: str) -> dict:
    clean = load_npz(folder / "clean.npz")
    res, s = timed(lambda: harden(folder / "model.onnx", clean, device=device, seed=seed, **PAPER_SCHEDULE))
    paper = {"seconds": s, **measure(res.model, folder)}
    return {
        "model": folder.name,
        "defaults": {k: default_row[k] for k in ("seconds", "acc", "asr")},
        "paper": {k: paper[k] for k in ("seconds", "acc", "asr")},
        "ratio": default_row["seconds"] / s,
    }


# --- 4. latency ---------------------------------------------------------------------------


def latency(name: str, protos: dict, x: np.ndarray, runs: int, threads: int) -> list[dict]:
    rows = []
    for batch in (1, 64):
        xb = np.ascontiguousarray(np.resize(x, (batch,) + x.shape[1:]))
        times = time_interleaved(protos, xb, runs=runs, warmup=20, threads=threads)
        base = stats(times["original"])
        row = {"model": name, "batch": batch}
        for k, t in times.items():
            st = stats(t)
            st["ratio"] = st["median_ms"] / base["median_ms"]
            st["p95_ratio"] = st["p95_ms"] / base["p95_ms"]
            row[k] = st
        rows.append(row)
    return rows


# --- report -------------------------------------------------------------------------------


def pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def secs(v: float) -> str:
    return f"{v:.1f}s" if v < 10 else f"{v:.0f}s"


def markdown(result: dict) -> str:
    env = result["env"]
    out = [
        "# mmexport benchmark",
        "",
        f"torch {env['torch']} ({env['torch_threads']} threads), onnxruntime {env['onnxruntime']} CPU, "
        f"{env['cpu_count']} logical CPUs, searches on {env.get('device', 'cpu')}"
        f"{' (' + env['gpu'] + ')' if env.get('gpu') else ''}, seed {env['seed']}. "
        "All accuracies measured under onnxruntime on the sample's test set (ASR, RA on its attack set); "
        "every defence saw only clean.npz."
        + (f" Rows of {', '.join(env['updated_models'])} were re-run later (--update)." if env.get("updated_models")
           else ""),
        "",
        "## 1. Backdoor defences",
        "",
        "ACC / ASR / RA in %; MMDF also shows detection rate on the attack set and false-positive rate "
        "on the test set; seconds = wall time of the defence.",
        "",
    ]
    defences_ = [r["defence"] for r in next(iter(result["efficacy"].values()))]
    out.append("| model | " + " | ".join(defences_) + " |")
    out.append("|---|" + "---|" * len(defences_))
    for model, rows in result["efficacy"].items():
        cells = []
        for r in rows:
            cell = f"{pct(r['acc'])} / {pct(r['asr'])} / {pct(r['ra'])}"
            if r["detection"] is not None:
                cell += f" (det {pct(r['detection'])}, FPR {pct(r['fpr'])})"
            cells.append(cell + f" [{secs(r['seconds'])}]")
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    out += ["", "Mean over the backdoored models (ACC drop, ASR, seconds):", ""]
    out += ["| defence | ACC drop | ASR | RA | seconds | models with ASR <= 5% and drop <= 3 |"]
    out += ["|---|---:|---:|---:|---:|---:|"]
    backdoored = [rows for rows in result["efficacy"].values() if rows[0]["asr"] is not None]
    for i, d in enumerate(defences_):
        drops = [rows[0]["acc"] - rows[i]["acc"] for rows in backdoored]
        asr = [rows[i]["asr"] for rows in backdoored]
        ra = [rows[i]["ra"] for rows in backdoored]
        sec = [rows[i]["seconds"] for rows in backdoored]
        wins = sum(a <= 0.05 and dr <= 0.03 for a, dr in zip(asr, drops, strict=True))
        if backdoored:
            out.append(
                f"| {d} | {pct(np.mean(drops))} | {pct(np.mean(asr))} | {pct(np.mean(ra))} | {secs(np.mean(sec))} | "
                f"{wins} / {len(backdoored)} |"
            )

    if result["long_tail"]:
        out += ["", "## 2. Long-tailed models", ""]
        out += ["| model | method | ACC | balanced ACC | rarest class | 2nd rarest | seconds |"]
        out += ["|---|---|---:|---:|---:|---:|---:|"]
        for model, block in result["long_tail"].items():
            c1, c2 = block["rarest"]
            for r in block["rows"]:
                out.append(
                    f"| {model} | {r['method']} | {pct(r['acc'])} | {pct(r['bal'])} | "
                    f"{c1}: {pct(r['per_class'][c1])} | {c2}: {pct(r['per_class'][c2])} | {r['seconds']:.0f} |"
                )

    if result["schedule"]:
        out += ["", "## 3. Harden wall time: defaults vs the paper code's schedule", ""]
        out += [f"Paper schedule in our search: `{json.dumps(PAPER_SCHEDULE)}`.", ""]
        out += ["| model | defaults s | ACC | ASR | paper s | ACC | ASR | defaults / paper time |"]
        out += ["|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in result["schedule"]:
            d, p = r["defaults"], r["paper"]
            out.append(
                f"| {r['model']} | {d['seconds']:.0f} | {pct(d['acc'])} | {pct(d['asr'])} | {p['seconds']:.0f} | "
                f"{pct(p['acc'])} | {pct(p['asr'])} | {r['ratio']:.2f} |"
            )

    if result["latency"]:
        out += ["", "## 4. onnxruntime CPU latency, ratio of medians to the original (p95 ratio)", ""]
        out += [f"{env['latency_runs']} interleaved runs after 20 warm-up, {env['ort_threads']} intra-op threads.", ""]
        out += ["| model | batch | original ms (p95) | mmac channel | mmac layer | mmdf |"]
        out += ["|---|---:|---:|---:|---:|---:|"]
        for r in result["latency"]:
            o = r["original"]
            cells = [f"{r[k]['ratio']:.3f} ({r[k]['p95_ratio']:.2f})" for k in ("channel", "layer", "mmdf")]
            head = f"| {r['model']} | {r['batch']} | {o['median_ms']:.3f} ({o['p95_ms']:.3f}) | "
            out.append(head + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated sample folders (default: all)")
    ap.add_argument("--speed-models", default=",".join(SPEED_MODELS), help="models for the schedule comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                    help="torch device of mmexport's searches (peers run on the CPU; onnxruntime always CPU)")
    ap.add_argument("--runs", type=int, default=200, help="latency rounds per batch size")
    ap.add_argument("--threads", type=int, default=1,
                    help="onnxruntime intra-op threads for latency (1: steadier on a small box)")
    ap.add_argument("--out", default=str(ROOT / "bench-results"))
    ap.add_argument("--update", action="store_true",
                    help="re-run only --models into the existing <out>/bench.json, keeping its other rows")
    args = ap.parse_args()
    if os.environ.get("THREADS"):
        torch.set_num_threads(int(os.environ["THREADS"]))

    out = Path(args.out)
    (out / "bounds").mkdir(parents=True, exist_ok=True)
    folders = sorted(p.parent for p in (ROOT / "sample_models").glob("*/model.onnx"))
    if args.models:
        wanted = set(args.models.split(","))
        folders = [f for f in folders if f.name in wanted]
    speed = set(args.speed_models.split(",")) if args.speed_models else set()
    result = {
        "env": {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "onnxruntime": ort.__version__,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "seed": args.seed,
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "latency_runs": args.runs,
            "ort_threads": args.threads,
        },
        "efficacy": {},
        "long_tail": {},
        "schedule": [],
        "latency": [],
    }
    if args.update and (out / "bench.json").exists():
        # Rows of the models run now are replaced; every other row keeps the settings it was run with.
        old = json.loads((out / "bench.json").read_text())
        names = {f.name for f in folders}
        result["efficacy"] = {k: v for k, v in old["efficacy"].items() if k not in names}
        result["long_tail"] = {k: v for k, v in old["long_tail"].items() if k not in names}
        result["schedule"] = [r for r in old["schedule"] if r["model"] not in names]
        result["latency"] = [r for r in old["latency"] if r["model"] not in names]
        result["env"]["updated_models"] = sorted(names)
    for folder in folders:
        c = card(folder)
        if c.get("imbalance"):
            counts = np.asarray(c["imbalance"]["train_per_class"])
            rarest = [int(i) for i in np.argsort(counts, kind="stable")[:2]]
            rows = long_tail(folder, args.seed, args.device)
            result["long_tail"][folder.name] = {"rarest": rarest, "rows": rows}
            for r in rows:
                print(f"{folder.name:26} {r['method']:20} ACC {pct(r['acc'])} bal {pct(r['bal'])} "
                      f"rarest {pct(r['per_class'][rarest[0]])}/{pct(r['per_class'][rarest[1]])} "
                      f"{r['seconds']:.0f}s", flush=True)
            continue
        rows, protos = defences(folder, args.seed, out / "bounds", args.device)
        result["efficacy"][folder.name] = rows
        for r in rows:
            det = f" det {pct(r['detection'])} FPR {pct(r['fpr'])}" if r["detection"] is not None else ""
            print(f"{folder.name:26} {r['defence']:20} ACC {pct(r['acc'])} ASR {pct(r['asr'])} RA {pct(r['ra'])}"
                  f"{det} {r['seconds']:.0f}s", flush=True)
        x = np.load(folder / "clean.npz")["x"].astype(np.float32)
        result["latency"] += latency(folder.name, protos, x, args.runs, args.threads)
        if folder.name in speed:
            row = schedule(folder, args.seed, next(r for r in rows if r["defence"] == "mmac-channel"), args.device)
            result["schedule"].append(row)
            print(f"{folder.name:26} schedule: defaults {row['defaults']['seconds']:.0f}s vs paper "
                  f"{row['paper']['seconds']:.0f}s (ASR {pct(row['paper']['asr'])})", flush=True)
        (out / "bench.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "bench.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "bench.md").write_text(markdown(result))
    print(f"wrote {out / 'bench.md'} and bench.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
