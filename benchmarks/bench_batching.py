"""What the engine's batching of a fixed-batch graph buys: vmap over groups of N against runs of N.

    python benchmarks/bench_batching.py [--rows 64] [--runs 10] [--threads 1] [--out DIR]

A vision transformer built on torch's `nn.TransformerEncoderLayer` (as torchvision's ViT is),
32x32x3, exported at a fixed batch N (1 and 4): its attention folds the batch into the heads
([L, N x H, E / H]), which shape scaling cannot follow, so the engine vectorises the graph at
batch N over the groups of N (`Engine.batching` "vmapped"). Timed, interleaved in one process:
forward and forward+backward (to the input and one site's bounds) of `rows` rows, vmapped and in
runs of N (the engine's last resort, forced); the median per mode and their ratio. Also checks
that both give the same logits and gradients. Random weights: timing does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmexport.core.model import load_model  # noqa: E402
from mmexport.engine.executor import Engine  # noqa: E402

IR_VERSION = 8


class TorchViT(nn.Module):
    """4x4 patches of a 32x32x3 image, a CLS token, `depth` nn.TransformerEncoderLayer blocks."""

    def __init__(self, width: int = 64, depth: int = 2, heads: int = 4, classes: int = 10):
        super().__init__()
        self.patch = nn.Conv2d(3, width, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 65, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, 0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        return self.head(self.norm(self.blocks(h))[:, 0])


def export_fixed(model: nn.Module, n: int, path: Path) -> None:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(n, 3, 32, 32), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"])
    proto = onnx.load(str(path))
    proto.ir_version = IR_VERSION
    onnx.save(proto, str(path))


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(model, x: torch.Tensor, runs: int) -> dict:
    """Both modes on one fixed-batch model: agreement, then interleaved medians."""
    site = model.sites[0]
    vm, ch = Engine(model), Engine(model)
    n = vm.fixed_batch
    with torch.no_grad():
        vm(x[: 2 * n])  # the first call at a new size picks the mode
    ch._chunked = True  # the last resort, forced
    z = torch.full((site.channels,), 1.0, requires_grad=True)

    def forward(engine):
        with torch.no_grad():
            return engine(x)

    def backward(engine):
        xb = x.clone().requires_grad_(True)
        out = engine(xb, {site.name: z})
        return torch.autograd.grad(out.square().sum(), [xb, z])

    same_logits = float((forward(vm) - forward(ch)).abs().max())
    same_grads = max(float((a - b).abs().max()) for a, b in zip(backward(vm), backward(ch), strict=True))
    times = {"forward": ([], []), "backward": ([], [])}
    for _ in range(runs):  # interleaved: the machine's load falls on both modes alike
        for kind, fn in (("forward", forward), ("backward", backward)):
            times[kind][0].extend(timed(lambda fn=fn: fn(vm), 1))
            times[kind][1].extend(timed(lambda fn=fn: fn(ch), 1))
    row = {"fixed_batch": n, "batching": vm.batching, "rows": x.shape[0], "max_logit_diff": same_logits,
           "max_grad_diff": same_grads}
    for kind, (a, b) in times.items():
        row[f"{kind}_ms_vmapped"] = 1e3 * statistics.median(a)
        row[f"{kind}_ms_chunks"] = 1e3 * statistics.median(b)
        row[f"{kind}_speedup"] = statistics.median(b) / statistics.median(a)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="", help="write batching.md and batching.json here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = TorchViT()
    x = torch.rand(args.rows, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 4):
            path = Path(tmp) / f"vit-b{n}.onnx"
            export_fixed(net, n, path)
            rows.append(measure(load_model(path), x, args.runs))
    lines = [f"torch {torch.__version__}, {args.threads} thread(s), {args.rows} rows, median of {args.runs} "
             "interleaved runs", "",
             "| fixed batch | engine batching | forward ms: vmapped / runs of N | speed-up | forward+backward ms: "
             "vmapped / runs of N | speed-up | max diff: logits / gradients |",
             "|---:|---|---|---:|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['fixed_batch']} | {r['batching']} | {r['forward_ms_vmapped']:.1f} / "
                     f"{r['forward_ms_chunks']:.1f} | {r['forward_speedup']:.2f}x | {r['backward_ms_vmapped']:.1f} / "
                     f"{r['backward_ms_chunks']:.1f} | {r['backward_speedup']:.2f}x | "
                     f"{r['max_logit_diff']:.1e} / {r['max_grad_diff']:.1e} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "batching.md").write_text(text + "\n")
        (out / "batching.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
