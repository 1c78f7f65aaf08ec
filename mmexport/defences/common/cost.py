"""What one row of a batch costs the engine: seconds and bytes.

The search's work is counted in row passes (one sample through the network, forward and
backward) and row forwards; a cost per row turns a schedule into seconds, and the bytes
autograd saves per row turn a memory budget into a chunk size. Peak memory then depends on
the chunk, not on restarts x classes x activations held at once.

Two costs: `measure` times the passes here and now (a limit in seconds on this machine), and
`reference_cost` counts the passes' work and prices it at fixed rates (the default limit: the
same model gets the same schedule, and a seed the same result, on any machine at any load).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

GIB = 1024**3
AUTO_MEMORY_CAP = 2 * GIB  # "auto": a quarter of what is available, at most this


@dataclass(frozen=True)
class RowCost:
    """Per-row costs of one model on one device, at the measured batch size."""

    backward_seconds: float  # forward + backward to the input and the bounds
    forward_seconds: float  # forward without autograd
    saved_bytes: int  # what autograd keeps per row for the backward
    kind: str = "measured"  # or "reference": counted work at fixed rates (`reference_cost`)

    def slower(self, factor: float) -> RowCost:
        """The costs scaled by what a stage actually took over what they predicted for it."""
        return RowCost(self.backward_seconds * factor, self.forward_seconds * factor, self.saved_bytes, self.kind)

    def to_json(self) -> dict:
        return {
            "costs": self.kind,
            "backward_ms_per_row": round(1e3 * self.backward_seconds, 3),
            "forward_ms_per_row": round(1e3 * self.forward_seconds, 3),
            "saved_mib_per_row": round(self.saved_bytes / 2**20, 3),
        }


def available_memory() -> int:
    """Bytes the process could still take (MemAvailable on Linux; 8 GiB where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def memory_budget(max_memory_gib: float, device: torch.device) -> int:
    """Bytes of activations the search may hold at once; `max_memory_gib` 0 means auto."""
    if max_memory_gib > 0:
        return int(max_memory_gib * GIB)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free // 2)
    return int(min(available_memory() // 4, AUTO_MEMORY_CAP))


def saved_bytes_per_row(engine, x: torch.Tensor, bounds) -> int:
    """Bytes autograd saves for one row of a margin backward (measured on two rows)."""
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
        return t

    rows = x[:2].detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = engine(rows, bounds)
    out.sum().backward()
    return max(1, total // rows.shape[0])


def measure(engine, x: torch.Tensor, bounds, *, rows: int | None = None, repeat: int = 2,
            seconds: float = 0.5, most: int = 128) -> RowCost:
    """Time forward and forward+backward per row (best of `repeat`, after a warm-up) on
    `rows` rows of x; None: as many as take about `seconds` a pass (2 to `most`: small models
    pay a per-call overhead that a batch of 2 would charge to every row)."""
    saved = saved_bytes_per_row(engine, x, bounds)
    params = [v for v in (bounds or {}).values() if v.requires_grad]
    if rows is None:
        probe = x[:2].detach().clone().requires_grad_(True)
        t0 = time.perf_counter()
        torch.autograd.grad(engine(probe, bounds).sum(), [probe, *params])
        per_row = (time.perf_counter() - t0) / probe.shape[0]
        rows = int(min(most, max(2, seconds // max(per_row, 1e-9))))
    batch = x[:rows].detach()
    if batch.shape[0] < rows:
        batch = batch.repeat((rows + batch.shape[0] - 1) // batch.shape[0], *([1] * (x.dim() - 1)))[:rows]

    def backward() -> None:
        xb = batch.clone().requires_grad_(True)
        out = engine(xb, bounds).sum()
        torch.autograd.grad(out, [xb, *params])

    def forward() -> None:
        with torch.no_grad():
            engine(batch, bounds)

    times = []
    for fn in (backward, forward):
        fn()
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        times.append(best / batch.shape[0])
    return RowCost(backward_seconds=times[0], forward_seconds=times[1], saved_bytes=saved)


def chunk_rows(cost: RowCost, budget_bytes: int, *, floor: int = 1) -> int:
    """Rows per chunk so that what autograd saves stays within the budget."""
    return max(floor, int(budget_bytes // max(cost.saved_bytes, 1)))



# --------------------------------------------------------------------------- reference costs

# Milliseconds per GFLOP of dense matrix products and convolutions, per GFLOP of grouped
# (depthwise) convolutions, and per MiB of tensors written, (backward pass, forward): one
# torch thread of the 2-core x86 machines the defaults were sized on, fitted to the measured
# costs of the 19 digits samples and the 6 real-tier models (docs/experiments.md#reference-costs:
# within 0.8-1.4x on the real tier; the 16x16 samples run 2-5x slower than counted, well
# inside their limits either way). Depthwise convolutions run ~75x slower per FLOP.
REFERENCE_RATES = {"dense": (17.0, 14.5), "grouped": (1300.0, 700.0), "mib": (0.045, 0.0)}


@dataclass(frozen=True)
class RowWork:
    """Work counted in one pass, per row: FLOPs of dense and grouped products, bytes written."""

    dense_flops: float
    grouped_flops: float
    bytes_written: float

    def milliseconds(self, which: int) -> float:
        r = {k: v[which] for k, v in REFERENCE_RATES.items()}
        return (r["dense"] * self.dense_flops + r["grouped"] * self.grouped_flops) / 1e9 + r["mib"] * (
            self.bytes_written / 2**20)


class _Counter(TorchDispatchMode):
    """Counts the FLOPs (torch's formulas) and output bytes of every op dispatched under it."""

    def __init__(self):
        super().__init__()
        self.dense = self.grouped = self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            if _groups(packet, args) > 1:
                self.grouped += flops
            else:
                self.dense += flops
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.bytes += t.numel() * t.element_size()
        return out


def _groups(packet, args) -> int:
    aten = torch.ops.aten
    if packet in (aten.convolution, aten._convolution) and len(args) > 8:
        return int(args[8])
    if packet is aten.convolution_backward and len(args) > 9:
        return int(args[9])
    return 1


def count_work(engine, x: torch.Tensor, bounds, *, backward: bool) -> RowWork:
    """The work of one forward (and backward to the input and the bounds) per row of x."""
    counter = _Counter()
    params = [v for v in (bounds or {}).values() if v.requires_grad]
    with counter:
        if backward:
            rows = x.detach().clone().requires_grad_(True)
            torch.autograd.grad(engine(rows, bounds).sum(), [rows, *params])
        else:
            with torch.no_grad():
                engine(x, bounds)
    n = x.shape[0]
    return RowWork(counter.dense / n, counter.grouped / n, counter.bytes / n)


def reference_cost(engine, x: torch.Tensor, bounds) -> RowCost:
    """The per-row costs on the reference machine, from the work counted on two rows of x:
    no clock is read, so the schedule they price is the same on every machine and load."""
    rows = x[:2]
    back, fwd = (count_work(engine, rows, bounds, backward=b) for b in (True, False))
    return RowCost(backward_seconds=back.milliseconds(0) / 1e3, forward_seconds=fwd.milliseconds(1) / 1e3,
                   saved_bytes=saved_bytes_per_row(engine, x, bounds), kind="reference")
