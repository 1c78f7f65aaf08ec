"""The searches' work shared among the processes `torchrun` starts (torch.distributed).

A run is distributed when torch.distributed's default group is initialised (the CLI does it
under torchrun; a user's own script may do it before calling the API). Every sharded pass is
then cut into *blocks* that do not depend on the number of ranks: one class's rows of a
maximiser set (each class's ascent is independent of the others'), or `ROWS` rows of D.
Blocks go to ranks in contiguous runs; each block runs in the same forward/backward calls
whichever rank owns it; rows' results are gathered in global order, and gradients with
respect to the bounds are summed block by block in global order. So one seed gives the same
bounds, bit for bit, on 1, 2 or N ranks (same threads per rank). Random draws are made by
every rank for all blocks alike (the generators stay in step), so no draw depends on the rank.

A process that is not part of a group keeps the plain batching (`chunk` rows per call over
all rows) and plain backward: single-process results are exactly those of earlier versions.
"""

from __future__ import annotations

from collections import Counter

import torch

ROWS = 32  # rows of D per block in a distributed run

rows_run: Counter = Counter()  # rows this process ran in sharded passes, by kind ("fit", "ascent", ...)


def active() -> bool:
    """Is this process one rank of an initialised torch.distributed group?"""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def size() -> int:
    return torch.distributed.get_world_size() if active() else 1


def row_slices(n: int, chunk: int | None, start: int = 0) -> list[slice]:
    """Consecutive slices of rows start..n-1, `chunk` at a time (None: one slice)."""
    step = (n - start) if not chunk else chunk
    return [slice(i, min(n, i + step)) for i in range(start, n, max(step, 1))]


def owner(block: int, blocks: int, world: int) -> int:
    """The rank of a block: contiguous runs of blocks, in rank order."""
    return block * world // blocks


def runs(n: int, chunk: int | None, unit: int | None = None, kind: str = "rows", *,
         where: torch.Tensor | None = None) -> list[tuple[int, slice]]:
    """(block, rows) of the calls this process runs over n rows, `chunk` rows per call at most.

    Distributed: blocks of `unit` rows (a class's rows; None: ROWS rows of D), this rank's
    only, each cut into calls at `chunk`. Single process: every row, one block (0), calls of
    `chunk` rows across the whole batch, as before. `where` (a bool per row): only rows where
    it holds (single process: its runs of True; distributed: calls with any True, for weights
    that are the same for all of a class's rows)."""
    keep = None if where is None else where.tolist()
    out = split(n, chunk, unit or ROWS, rank(), size(), keep) if active() else split(n, chunk, None, 0, 1, keep)
    rows_run[kind] += sum(s.stop - s.start for _, s in out)
    return out


def split(n: int, chunk: int | None, unit: int | None, me: int, world: int,
          keep: list[bool] | None = None) -> list[tuple[int, slice]]:
    """`runs` for rank `me` of `world`; `unit` None: the single-process batching (no blocks)."""
    if unit is None:
        if keep is None:
            return [(0, s) for s in row_slices(n, chunk)]
        out, start = [], None
        for i, on in enumerate([*keep, False]):
            if on and start is None:
                start = i
            elif not on and start is not None:
                out += [(0, s) for s in row_slices(i, chunk, start)]
                start = None
        return out
    blocks = -(-n // unit)
    return [(b, s) for b in range(blocks) if owner(b, blocks, world) == me
            for s in row_slices(min(n, (b + 1) * unit), chunk, b * unit)
            if keep is None or any(keep[s])]


def owned(n: int, unit: int | None = None) -> list[int]:
    """Indices of the blocks of n rows (`unit` each) this process owns (all where single)."""
    unit = unit or ROWS
    blocks = -(-n // unit)
    if not active():
        return list(range(blocks))
    return [b for b in range(blocks) if owner(b, blocks, size()) == rank()]


def gather_objects(mine: list) -> list:
    """Every rank's list, concatenated in rank order (the global order of contiguous blocks)."""
    if not active():
        return list(mine)
    parts: list = [None] * size()
    torch.distributed.all_gather_object(parts, mine)
    return [v for p in parts for v in p]


def gather_rows(parts: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Rows computed in `runs` order, every rank's, concatenated in global order, on `device`
    (a rank that ran no rows has no tensor to take it from)."""
    if not active():
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    return torch.cat(gather_objects([p.detach().cpu() for p in parts])).to(device)


def broadcast(obj):
    """Rank 0's object on every rank (a schedule measured on rank 0, so all run the same)."""
    if not active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def from_owner(value, block: int, blocks: int):
    """The value the owner of `block` holds, on every rank (the stamp of the suspect class)."""
    if not active():
        return value
    box = [value if owner(block, blocks, size()) == rank() else None]
    torch.distributed.broadcast_object_list(box, src=owner(block, blocks, size()))
    return box[0]


class Gradients:
    """Gradients of a loss summed over blocks, with respect to `params` (the relative bounds).

    Single process: `backward` is `loss.backward()` (accumulated in .grad, as before).
    Distributed: each block's gradient is kept apart; `reduce` gathers every rank's blocks and
    adds them to .grad in global order, the same sums in the same order on any world size."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        self.blocks: dict[tuple, torch.Tensor] = {}

    def backward(self, loss: torch.Tensor, key: tuple) -> None:
        if not active():
            loss.backward()
            return
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                          for g, p in zip(grads, self.params, strict=True)])
        self.blocks[key] = self.blocks[key] + flat if key in self.blocks else flat

    def reduce(self) -> None:
        if not active():
            return
        mine = [(k, v.detach().cpu()) for k, v in self.blocks.items()]
        self.blocks = {}
        total = None
        for _, v in sorted(gather_objects(mine), key=lambda kv: kv[0]):
            total = v if total is None else total + v
        if total is None:
            return
        at = 0
        for p in self.params:
            g = total[at : at + p.numel()].view_as(p).to(p.device)
            at += p.numel()
            p.grad = g if p.grad is None else p.grad + g


def share() -> dict | None:
    """Rows each rank ran in sharded passes (the work's split), None where single."""
    if not active():
        return None
    counts = gather_objects([dict(rows_run)])
    return {"world_size": size(), "rows_per_rank": [sum(c.values()) for c in counts],
            "rows_per_rank_by_pass": counts}
