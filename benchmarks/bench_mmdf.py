"""What MMDF costs on clean traffic: the ungated and the focus-gated graph against the original.

For every sample model (`sample_models/*/`, and `sample_models/real/*/` where the real-size
tier is built), MMDF is calibrated with the defaults (`detect`, seed 0, ungated), and the gated
graph is written from it (`mmexport.defences.mmdf.gate`). Both are checked against each other
on the model's test and attack sets (logits, flags and the tested rows' scores), then the
original, ungated and gated graphs are timed in one process, interleaved (every round runs each
once, the order rotating), at batch 1 and 64, each round on a different draw of clean test
images, one intra-op thread. Reported: median ms of the original, the two ratios of medians, the
files' sizes (a focus branch owns a copy of its conv weights), and detection / ASR / false
positives of both graphs on the test and attack sets.

With `--serve`, the model `harden --method mmac-ft` writes (seed 0, cached beside the MMDF
graphs) and the graph `detect --serve` writes from it (the gated graph with the hardened model
behind it, `mmexport.defences.mmdf.serve`) are timed in the same rounds and measured alike.

A model whose scan names no target gets no focus class and is gated on MMDF's screen (its row
says "screened"); its efficacy table also gives what the margin test would flag on every input.
The ungated graphs are kept in `--cache` (default `bench-results/mmdf`) and used again while
the model file is unchanged (its sha256 in their metadata), since the real tier's `detect`
takes minutes.

Writes `bench-results/mmdf.md` and `mmdf.json`. Usage:
    python benchmarks/bench_mmdf.py [--models a,b] [--runs 300] [--runs-64 300] [--real] [--serve] [--threads 1]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_latency import session  # noqa: E402

from mmexport.core.provenance import get_metadata  # noqa: E402
from mmexport.defences.mmdf.detector import detect  # noqa: E402
from mmexport.defences.mmdf.gate import gate_mmdf_graph  # noqa: E402
from mmexport.defences.mmdf.graph import DETECTED, FEATURE_SCORE, SCORE, is_gated  # noqa: E402
from mmexport.defences.mmdf.serve import serve_unflagged  # noqa: E402

TARGETS = {1: 1.15, 64: 1.5}  # gated / original, at batch 1 and 64


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ungated(folder: Path, cache: Path, log) -> onnx.ModelProto:
    """The default MMDF graph of a sample, ungated: from the cache or from `detect`."""
    kept = cache / f"{folder.name}.mmdf.onnx"
    source_sha = sha256(folder / "model.onnx")
    if kept.exists():
        proto = onnx.load(kept)
        meta = get_metadata(proto)  # made before the screen: made again
        if (meta.get("mmexport.source_sha256") == source_sha and "mmexport.mmdf.screen" in meta
                and not is_gated(proto)):
            return proto
    log(f"{folder.name}: detect (defaults, seed 0) ...")
    start = time.perf_counter()
    res = detect(folder / "model.onnx", folder / "clean.npz", gate=False, seed=0, provider="cpu")
    log(f"{folder.name}: detect took {time.perf_counter() - start:.0f} s")
    cache.mkdir(parents=True, exist_ok=True)
    onnx.save(res.model, kept)
    return res.model


def fine_tuned(folder: Path, cache: Path, log) -> onnx.ModelProto:
    """`harden --method mmac-ft` of a sample (seed 0): from the cache or made."""
    from mmexport.defences.harden import harden

    kept = cache / f"{folder.name}.mmac-ft.onnx"
    if kept.exists():
        proto = onnx.load(kept)
        if get_metadata(proto).get("mmexport.source_sha256") == sha256(folder / "model.onnx"):
            return proto
    log(f"{folder.name}: harden --method mmac-ft (seed 0) ...")
    start = time.perf_counter()
    res = harden(folder / "model.onnx", folder / "clean.npz", method="mmac-ft", seed=0, device="cpu")
    log(f"{folder.name}: harden took {time.perf_counter() - start:.0f} s")
    cache.mkdir(parents=True, exist_ok=True)
    onnx.save(res.model, kept)
    return res.model


def outputs(sess: ort.InferenceSession, x: np.ndarray, batch: int = 64) -> dict[str, np.ndarray]:
    names = [o.name for o in sess.get_outputs()]
    inp = sess.get_inputs()[0].name
    parts = [sess.run(names, {inp: x[i:i + batch]}) for i in range(0, len(x), batch)]
    return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}


def efficacy(out: dict, y: np.ndarray, logits: str, target: int | None, attack: bool) -> dict:
    """ACC (or ASR) and the flagged share, in % (None for a model without MMDF's flags)."""
    pred = out[logits].argmax(1)
    flagged = float(out[DETECTED].mean() * 100) if DETECTED in out else None
    if attack:
        return {"asr": float(np.mean(pred == target) * 100), "detection": flagged}
    return {"acc": float(np.mean(pred == y) * 100), "fpr": flagged}


def agree(full: dict, gated: dict, logits: str) -> float:
    """Largest |logit| difference; flags and tested scores must match exactly / closely."""
    assert (full[DETECTED] == gated[DETECTED]).all(), "flags differ"
    for name in (SCORE, FEATURE_SCORE):
        if name in full:
            tested = ~np.isnan(gated[name])
            np.testing.assert_allclose(gated[name][tested], full[name][tested], atol=1e-3, rtol=1e-3)
    return float(np.abs(full[logits] - gated[logits]).max())


def time_interleaved(sessions: dict, x: np.ndarray, batch: int, runs: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    names = list(sessions)
    inp = sessions[names[0]].get_inputs()[0].name
    times = {n: [] for n in names}
    for i in range(runs + 5):
        xb = x[rng.choice(len(x), batch, replace=False)]
        shift = i % len(names)
        for n in names[shift:] + names[:shift]:
            start = time.perf_counter_ns()
            sessions[n].run(None, {inp: xb})
            if i >= 5:
                times[n].append((time.perf_counter_ns() - start) / 1e6)
    return {n: float(np.median(t)) for n, t in times.items()}


def bench_model(folder: Path, args, log) -> dict:
    source = onnx.load(folder / "model.onnx")
    card = json.loads((folder / "card.json").read_text()) if (folder / "card.json").exists() else {}
    full = ungated(folder, Path(args.cache), log)
    meta = get_metadata(full)
    focus = int(meta["mmexport.mmdf.focus"]) if meta.get("mmexport.mmdf.focus") else None
    screen = float(meta["mmexport.mmdf.screen"]) if meta.get("mmexport.mmdf.screen") else None
    logits = meta.get("mmexport.mmdf.output") or full.graph.output[0].name
    row = {"model": folder.name, "focus": focus, "screen": screen,
           "params": int(sum(np.prod(i.dims) for i in source.graph.initializer))}
    models = {"original": source, "ungated": full}
    if focus is not None or screen is not None:
        ours = [o.name for o in full.graph.output if o.name in (DETECTED, SCORE, FEATURE_SCORE)]
        models["gated"] = gate_mmdf_graph(full, source, logits_name=logits, focus=focus, outputs=ours)
    name = source.graph.output[0].name  # the model's output; `logits` differs where it is probabilities
    if args.serve:  # what `detect --serve` writes: the gated graph (as detect's default) serving mmac-ft's model
        models["mmac-ft"] = fine_tuned(folder, Path(args.cache), log)
        models["stacked"] = serve_unflagged(models.get("gated", full), models["mmac-ft"], name,
                                            logits=logits == name)
    row["mb"] = {n: p.ByteSize() / 1e6 for n, p in models.items()}  # a focus branch owns its conv weights
    sessions = {n: session(p, args.threads) for n, p in models.items()}
    test = np.load(folder / "test.npz")
    x, y = test["x"].astype(np.float32), test["y"]
    target = (card.get("attack") or {}).get("target")
    for part, data, is_attack in (("test", (x, y), False), ("attack", None, True)):
        if is_attack:
            if target is None or not (folder / "attack.npz").exists():
                continue
            a = np.load(folder / "attack.npz")
            data = (a["x"].astype(np.float32), a["y"])
        got = {n: outputs(sessions[n], data[0]) for n in sessions if n != "original"}
        for n, out in got.items():  # argmax of the output where the logits are not one (mmac-ft's model)
            key = logits if logits in out else name
            row[f"{n}_{part}"] = efficacy(out, data[1], key, target, is_attack)
        if "gated" in got:
            row[f"max_logit_diff_{part}"] = agree(got["ungated"], got["gated"], logits)
        if screen is not None:  # what the margin test flags past the screen and without it
            full_out = got["ungated"]
            over = full_out[SCORE] > 0
            far = full_out[FEATURE_SCORE] > 0 if FEATURE_SCORE in full_out else np.zeros_like(over)
            row[f"unscreened_{part}"] = float(np.mean(over | far) * 100)
    for batch, runs in ((1, args.runs), (64, args.runs_64)):
        if batch > len(x):
            continue
        med = time_interleaved(sessions, x, batch, runs, seed=batch)
        row[f"b{batch}"] = {"runs": runs, "original_ms": med["original"],
                            **{n: med[n] / med["original"] for n in med if n != "original"}}
        log(f"{folder.name} batch {batch}: original {med['original']:.3f} ms, "
            + ", ".join(f"{n} {med[n] / med['original']:.3f}x" for n in med if n != "original"))
    return row


def markdown(rows: list[dict], args) -> str:
    out = [
        "# MMDF latency on clean traffic: ungated and gated graphs (focus class or screen)",
        "",
        f"onnxruntime {ort.__version__}, CPU, {args.threads} intra-op thread(s), "
        f"{platform.processor() or platform.machine()}; "
        "median of interleaved rounds (original, ungated, gated; with --serve mmac-ft's model and the stacked graph), "
        "a different draw of clean test images each round; the ratios are to the original. "
        f"Targets for the gated graph: <= {TARGETS[1]}x at batch 1, <= {TARGETS[64]}x at batch 64.",
        "",
        "| model | focus | batch | rounds | original ms | ungated | gated | met | mmac-ft | stacked "
        "| file MB (original / gated / stacked) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for b in (1, 64):
            t = r.get(f"b{b}")
            if t is None:
                continue
            gated = t.get("gated")
            met = "-" if gated is None else ("yes" if gated <= TARGETS[b] else "no")
            gate = (r["focus"] if r["focus"] is not None else
                    "none: screened" if r.get("screen") is not None else "none (not gated)")
            served = " | ".join(f"{t[n]:.2f}x" if n in t else "-" for n in ("mmac-ft", "stacked"))
            mb = " / ".join(f"{r['mb'][n]:.2f}" if n in r["mb"] else "-" for n in ("original", "gated", "stacked"))
            out.append(f"| {r['model']} | {gate} | {b} | "
                       f"{t['runs']} | {t['original_ms']:.3f} | {t['ungated']:.2f}x | "
                       f"{'-' if gated is None else f'{gated:.3f}x'} | {met} | {served} | {mb} |")
    out += ["", "Efficacy of both graphs (%), test set: ACC / false positives; attack set: ASR / detection; "
                "max |logit difference| between the graphs; unscreened: false positives / detection were the margin "
                "test run on every input (models without a focus class):", "",
            "| model | ungated test | gated test | ungated attack | gated attack | max diff | unscreened |",
            "|---|---|---|---|---|---|---|"]

    def cell(r, key, a, b):
        v = r.get(key)
        return "-" if v is None else f"{v[a]:.1f} / {v[b]:.1f}"

    for r in rows:
        diffs = [r[k] for k in ("max_logit_diff_test", "max_logit_diff_attack") if k in r]
        gated = (f"{cell(r, 'gated_test', 'acc', 'fpr')}", f"{cell(r, 'gated_attack', 'asr', 'detection')}",
                 f"{max(diffs):.1e}") if diffs else ("-", "-", "-")
        unscreened = " / ".join(f"{r[k]:.1f}" for k in ("unscreened_test", "unscreened_attack") if k in r) or "-"
        out.append(f"| {r['model']} | {cell(r, 'ungated_test', 'acc', 'fpr')} | {gated[0]} | "
                   f"{cell(r, 'ungated_attack', 'asr', 'detection')} | {gated[1]} | {gated[2]} | {unscreened} |")
    served = [r for r in rows if "stacked_test" in r]
    if served:
        out += ["", "With `--serve`: mmac-ft's model alone and the stacked graph (`detect --serve`), test ACC / "
                    "attack ASR (%), and the stacked graph's false positives / detection:", "",
                "| model | mmac-ft ACC / ASR | stacked ACC / ASR | stacked FPR / detection |", "|---|---|---|---|"]
        def pair(r, n):
            acc, asr = r[f"{n}_test"]["acc"], (r.get(f"{n}_attack") or {}).get("asr")
            return f"{acc:.1f} / {'-' if asr is None else f'{asr:.1f}'}"

        for r in served:
            det = (r.get("stacked_attack") or {}).get("detection")
            out.append(f"| {r['model']} | {pair(r, 'mmac-ft')} | {pair(r, 'stacked')} | "
                       f"{r['stacked_test']['fpr']:.1f} / {'-' if det is None else f'{det:.1f}'} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="", help="comma-separated sample names (default: all)")
    ap.add_argument("--real", action="store_true", help="also the real-size tier (sample_models/real)")
    ap.add_argument("--runs", type=int, default=300, help="rounds at batch 1")
    ap.add_argument("--runs-64", type=int, default=300, help="rounds at batch 64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--serve", action="store_true",
                    help="also time mmac-ft's model and MMDF serving it (detect --serve); hardens each model once")
    ap.add_argument("--cache", default="bench-results/mmdf")
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    folders = sorted(p.parent for p in (ROOT / "sample_models").glob("*/model.onnx"))
    if args.real:
        folders += sorted(p.parent for p in (ROOT / "sample_models" / "real").glob("*/model.onnx"))
    if args.models:
        wanted = set(args.models.split(","))
        folders = [f for f in folders if f.name in wanted]
    rows = []

    def log(msg):
        print(msg, flush=True)

    for folder in folders:
        rows.append(bench_model(folder, args, log))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mmdf.json").write_text(json.dumps(rows, indent=1))
    (out / "mmdf.md").write_text(markdown(rows, args))
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
