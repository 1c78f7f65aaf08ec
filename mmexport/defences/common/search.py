"""The bound search: MMAC (logit preservation) and MMOM (cross-entropy), one loop.

min_Z  fit(D; Z) + lambda * R(max margins of the clipped model)

Bounds are parameterised relative to their data-derived start, Z = Z0 * s with s in [0, 1]:
Z0 is the largest activation seen on D per channel (or per site), so at s = 1 no clean
input is clipped and one learning rate suits every layer whatever its scale. The fit term
is divided by the logit scale of D and the margin term by its square root, so lambda is
unitless. lambda is driven up while accuracy on D stays above the floor and down when it
falls below; the best feasible bounds (lowest margin objective with the floor met) win.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ...core.bounds import Bounds
from . import ranks
from .config import REDUCTIONS, SearchConfig
from .margins import Box, MaskedMaximisers, Maximisers, UniversalMaximisers, chunked_margins, margins, row_slices

# After a back-off lambda still grows this much per feasible check: the floor is probed
# again and again while the maximisers keep adapting, instead of freezing the first answer.
MIN_GROWTH = 1.05


@dataclass
class SearchResult:
    bounds: Bounds
    lambda_: float
    accuracy: float  # on D, fraction of the originally-correct samples kept correct
    objective_before: float  # margin objective of the search's own maximisers
    objective_after: float
    epochs: int
    seconds: float
    history: list[dict] = field(default_factory=list)


def initial_bounds(engine, x: torch.Tensor, granularity: str, batch_size: int = 256) -> dict:
    """Largest activation per channel (or per site) over the clean set, at least 0.

    Channels are on each site's `axis` (the last one for a transformer's token features).
    A ReLU's maximum is >= 0, but a channel of a GELU, SiLU, ELU or LeakyRelu site can stay
    negative on every clean input (a dead channel). Its bound starts (and stays) at 0: every
    site kind reaches values <= 0 (GELU's minimum is -0.17, SiLU's -0.28, ELU's -alpha), so a
    bound of 0 never lies below the activation's whole range, leaves the channel's clean
    values as they are and cuts only what a trigger drives above 0. The search moves a bound
    within [0, its start] (`descend`), so no bound ever clips below the activation's minimum.
    """
    names = [s.name for s in engine.sites]
    axes = {s.name: s.axis for s in engine.sites}
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            _, acts = engine.run(x[i : i + batch_size], record=names, outputs=[engine.output_name])
            for name, a in acts.items():
                if granularity == "layer" or a.dim() < 2:
                    v = a.max()
                else:
                    c = a.movedim(axes[name], 0)  # channels first (the last axis of tokens)
                    v = c.reshape(c.shape[0], -1).max(dim=1).values
                out[name] = v if name not in out else torch.maximum(out[name], v)
    return {k: v.clamp_min(0) for k, v in out.items()}


class _NormalisedDescent:
    """Gradient descent scaled so the largest step over all bounds is `lr`.

    Unlike Adam, which moves every bound with a non-zero gradient at the same pace, this
    keeps the gradient's proportions: the channels that carry the largest margins move most.
    """

    def __init__(self, params, lr: float):
        self.params = params
        self.lr = lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        top = max(float(g.abs().max()) for g in grads)
        if top <= 0:
            return
        for p in self.params:
            if p.grad is not None:
                p.sub_(self.lr * p.grad / top)


def shifts(x: torch.Tensor, channel_axis: int | None = 1) -> list[torch.Tensor]:
    """The four 1-pixel shifts of an image batch [N, C, H, W] (or [N, H, W, C] with
    `channel_axis` 3), edges replicated."""
    if channel_axis not in (None, 1):  # shift in NCHW, hand back the input's layout
        return [s.movedim(1, channel_axis) for s in shifts(x.movedim(channel_axis, 1))]
    pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[2], x.shape[3]
    return [pad[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))]


def augment(x: torch.Tensor, gen: torch.Generator, channel_axis: int | None = 1) -> torch.Tensor:
    """Fresh neighbours of D for the logit term: random 1-pixel shifts, then mixup.

    Logit preservation only needs inputs, not labels, so it can cover more of the clean
    distribution than D itself; the bounds then cannot trade unseen clean inputs away.
    """
    n = x.shape[0]
    if x.dim() == 4:
        nchw = channel_axis in (None, 1)
        x = x if nchw else x.movedim(channel_axis, 1)
        pad = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
        h, w = x.shape[2], x.shape[3]
        off = torch.randint(0, 3, (n, 2), generator=gen)
        x = torch.stack([pad[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(off.tolist())])
        x = x if nchw else x.movedim(1, channel_axis)
    partner = torch.randint(0, n, (n,), generator=gen).to(x.device)
    lam = (0.5 * torch.rand(n, generator=gen)).to(x.device).view(n, *([1] * (x.dim() - 1)))
    return (1 - lam) * x + lam * x[partner]


def subset(gen: torch.Generator, rows: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A fresh draw of `rows` rows of each tensor (the same rows), or all of them where
    `rows` is 0 or covers them (no draw: the generator's stream is left as it was)."""
    n = tensors[0].shape[0]
    if not 0 < rows < n:
        return tensors
    pick = torch.randperm(n, generator=gen)[:rows].to(tensors[0].device)
    return tuple(t[pick] for t in tensors)


def floor_set(engine, x: torch.Tensor, y: torch.Tensor, *, shifted: bool = True,
              channel_axis: int | None = 1, chunk: int | None = None, rows: int = 0, seed: int = 0):
    """Where the accuracy floor is checked: D and its 1-pixel shifts (labels kept), or `rows`
    of them drawn once, and which of those the original model gets right (the floor counts
    only those).

    Bounds tuned on 200 images otherwise keep exactly those right while held-out accuracy slips.
    """
    if shifted and x.dim() == 4:
        xc, yc = torch.cat([x, *shifts(x, channel_axis)]), y.repeat(5)
    else:
        xc, yc = x, y
    xc, yc = subset(torch.Generator().manual_seed(seed + 7), rows, xc, yc)
    correct = predict(engine, xc, None, chunk).argmax(1) == yc
    if not correct.any():
        correct = torch.ones_like(correct)
    return xc, yc, correct


def predict(engine, x: torch.Tensor, bounds=None, chunk: int | None = None, *, shared: bool = True) -> torch.Tensor:
    """Logits of x without autograd, `chunk` rows at a time. `shared`: in a distributed run
    the rows are split among the ranks (every rank calls; each gets all logits); False: this
    rank computes them all (inside a loop over its own classes)."""
    with torch.no_grad():
        if not shared:
            parts = [engine(x[sl], bounds) for sl in row_slices(x.shape[0], chunk)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        return ranks.gather_rows([engine(x[sl], bounds) for _, sl in ranks.runs(x.shape[0], chunk, None, "forward")],
                                 x.device)


def kept_correct(engine, xc: torch.Tensor, yc: torch.Tensor, correct: torch.Tensor, bounds,
                 chunk: int | None = None) -> float:
    """The floor's measure: the fraction of the originally-correct inputs still correct."""
    pred = predict(engine, xc, bounds, chunk).argmax(1)
    return float((pred[correct] == yc[correct]).float().mean())


def descend(opt, loss: torch.Tensor | None, rel: dict) -> None:
    """One step on the relative bounds, kept in [0, 1]: never above the clean maxima.

    `loss` None: the gradients are already in place (accumulated chunk by chunk)."""
    if loss is not None:
        opt.zero_grad()
        loss.backward()
    opt.step()
    with torch.no_grad():
        for v in rel.values():
            v.clamp_(0.0, 1.0)


def fit_backward(engine, x: torch.Tensor, ref: torch.Tensor | None, bounds_fn, *, weight: float,
                 chunk: int | None, labels: torch.Tensor | None = None, grads: ranks.Gradients | None = None,
                 key: int = 0) -> float:
    """The logit term (squared distance to `ref`, or cross-entropy on `labels`), its mean over
    the rows, back-propagated `chunk` rows at a time with `weight`; returns the term's value.

    `grads` (needed in a distributed run) collects each block's gradient under (`key`, block)."""
    n, total, terms = x.shape[0], 0.0, {}
    for block, sl in ranks.runs(n, chunk, None, "fit"):
        out = engine(x[sl], bounds_fn())
        if labels is None:
            term = ((out - ref[sl]) ** 2).sum()
        else:
            term = torch.nn.functional.cross_entropy(out, labels[sl], reduction="sum")
        loss = term * (weight / n)
        if grads is None:
            loss.backward()
        else:
            grads.backward(loss, (key, block))
        total += float(term.detach())
        terms[block] = terms.get(block, 0.0) + float(term.detach())
    if ranks.active():  # every block's term, added in global order: the same value on any world size
        total = 0.0
        for _, v in sorted(ranks.gather_objects(list(terms.items()))):
            total += v
    return total / n


def objective_value(engine, sets, bounds, how: str, chunk: int | None) -> float:
    """The margin objective: each set's per-class mean margins, reduced by `how`, summed."""
    total = 0.0
    for ms in sets:
        m = chunked_margins(engine, ms.rows, len(ms.classes), ms.classes, bounds, chunk, ms.restarts)
        total += float(reduce_margins(ms.per_class(m, "mean"), how))
    return total


def objective_backward(engine, sets, bounds_fn, how: str, *, weight: float, chunk: int | None,
                       known: list | None = None, grads: ranks.Gradients | None = None, key: int = 1) -> float:
    """Back-propagate `weight` x the margin objective, in two passes: the margins of every row
    without autograd give each class's weight in the reduction (one class for "max"), then
    only rows of classes with a weight run forward and backward, `chunk` at a time.

    `known[i]`: set i's margins at the current bounds where the caller has them (the ascent
    that just ran returns them), so the first pass is not run twice. `grads`: as in
    `fit_backward` (blocks keyed (`key` + i, block))."""
    total = 0.0
    with torch.no_grad():
        bounds = {k: v.detach() for k, v in bounds_fn().items()}
    for i, ms in enumerate(sets):
        m = known[i] if known is not None and known[i] is not None else None
        if m is None:
            m = chunked_margins(engine, ms.rows, len(ms.classes), ms.classes, bounds, chunk, ms.restarts)
        per_class = ms.per_class(m, "mean").detach().requires_grad_(True)
        value = reduce_margins(per_class, how)
        (w,) = torch.autograd.grad(value, per_class)
        total += float(value.detach())
        row_w = w[ms.classes] / ms.restarts  # d(mean over a class's rows) / d(row)
        for block, sl in ranks.runs(len(row_w), chunk, ms.restarts, "objective", where=row_w != 0):
            out = engine(ms.rows(sl), bounds_fn())
            loss = weight * (row_w[sl] * margins(out, ms.classes[sl])).sum()
            if grads is None:
                loss.backward()
            else:
                grads.backward(loss, (key + i, block))
    return total


def restore(rel: dict, saved: dict) -> None:
    """Put the relative bounds back to a saved point (the floor controller's back-off)."""
    with torch.no_grad():
        for k, v in rel.items():
            v.copy_(saved[k])


def to_bounds(snap: dict) -> Bounds:
    """Bounds (float32 arrays keyed by site) from the search's tensors."""
    return Bounds({k: v.detach().cpu().numpy().astype(np.float32) for k, v in snap.items()})


def conclude(best, z0: dict, before: float, accuracy: Callable[[dict], float], *, weight: float,
             epochs: int, start: float, history: list[dict]) -> SearchResult:
    """The search's answer from its best feasible check, (objective, epoch, bounds, accuracy,
    weight); where the floor never held (`best` None), the unclipped start at `before`."""
    if best is None:
        snap = {k: v.clone() for k, v in z0.items()}
        best = (before, 0, snap, accuracy(snap), weight)
    objective, _, snap, acc, w = best
    return SearchResult(
        bounds=to_bounds(snap),
        lambda_=float(w),
        accuracy=float(acc),
        objective_before=before,
        objective_after=float(objective),
        epochs=epochs,
        seconds=time.perf_counter() - start,
        history=history,
    )


def reduce_margins(per_class: torch.Tensor, how: str) -> torch.Tensor:
    """One number from the per-class max margins; `how` picks which classes count."""
    if how == "mean":
        return per_class.mean()
    if how == "max":
        return per_class.max()
    if how == "excess":
        return (per_class - per_class.median().detach()).clamp_min(0).sum()
    if how == "softmax":
        temp = per_class.detach().std().clamp_min(1e-6)
        w = torch.softmax(per_class.detach() / temp, dim=0)
        return (w * per_class).sum()
    raise ValueError(f"unknown reduction {how!r}; choose from {', '.join(REDUCTIONS)}")


def fit_bounds(
    engine,
    x: torch.Tensor,
    y: torch.Tensor,
    box: Box,
    num_classes: int,
    config: SearchConfig | None = None,
    *,
    progress: Callable[[dict], None] | None = None,
    monitor: Callable[[dict], dict] | None = None,
    chunk: int | None = None,
) -> SearchResult:
    """Search bounds for every site of `engine` on the clean set (x, y).

    `monitor(bounds) -> dict` adds diagnostics to each check's row (research use: it must
    never feed back into the search). `chunk`: rows per forward/backward (None: all at once).
    """
    config = config or SearchConfig()
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    ref = predict(engine, x, None, chunk)
    scale = ref.var(dim=0).sum().clamp_min(1e-8)  # squared logit scale of D
    xc, yc, correct = floor_set(engine, x, y, shifted=config.augment, channel_axis=box.channel_axis,
                                chunk=chunk, rows=config.floor_rows, seed=config.seed)

    z0 = initial_bounds(engine, x, config.granularity, batch_size=chunk or 256)
    names = list(z0)
    rel = {k: torch.ones_like(v, requires_grad=True) for k, v in z0.items()}

    def new_optimiser():
        if config.optimiser == "ngd":
            return _NormalisedDescent(list(rel.values()), lr=config.lr)
        return torch.optim.Adam(list(rel.values()), lr=config.lr)

    opt = new_optimiser()
    grads = ranks.Gradients(list(rel.values()))

    def current() -> dict:
        return {k: z0[k] * rel[k] for k in names}

    def accuracy(bounds) -> float:
        return kept_correct(engine, xc, yc, correct, bounds, chunk)

    sets = []
    if config.maximisers in ("points", "both"):
        sets.append(
            Maximisers(
                box,
                num_classes,
                config.restarts,
                generator=gen,
                clean_x=x,
                clean_fraction=config.clean_fraction,
                step_size=config.step_size,
            )
        )
    if config.maximisers in ("universal", "both", "universal+masked"):
        sets.append(
            UniversalMaximisers(box, x, y, num_classes, generator=gen, budget=config.budget, batch=config.restarts)
        )
    if config.maximisers in ("masked", "universal+masked"):
        sets.append(
            MaskedMaximisers(box, x, y, num_classes, generator=gen, area=config.mask_area, batch=config.restarts)
        )
    if not sets:
        raise ValueError(f"unknown maximisers {config.maximisers!r}")
    for ms in sets:
        ms.chunk = chunk

    def objective(bounds) -> float:
        return objective_value(engine, sets, bounds, config.reduction, chunk)

    for ms in sets:
        ms.ascend(engine, None, config.warmup_steps)
    before = objective(None)

    lam = config.lambda0
    up = config.lambda_up
    best = None  # (objective, epoch, bounds snapshot, acc, lambda)
    last_ok = {k: v.detach().clone() for k, v in rel.items()}
    checks_since_best = 0
    history: list[dict] = []
    epoch = 0
    for epoch in range(1, config.max_epochs + 1):
        with torch.no_grad():
            bounds_now = {k: v.detach() for k, v in current().items()}
        known = []  # each set's margins at these bounds, where its ascent just gave them
        for ms in sets:
            if isinstance(ms, (UniversalMaximisers, MaskedMaximisers)):
                ms.resample()
            fresh = None
            if config.refresh_every == 1 or (epoch > 1 and (epoch - 1) % config.refresh_every == 0):
                fresh = ms.ascend(engine, bounds_now, config.steps)
            known.append(fresh)

        opt.zero_grad()
        xs, ys, refs = subset(gen, config.fit_rows, x, y, ref)
        if config.method == "mmom":
            fit = fit_backward(engine, xs, None, current, weight=1.0, chunk=chunk, labels=ys, grads=grads)
        elif config.augment:
            xa = augment(xs, gen, box.channel_axis)
            ref_a = predict(engine, xa, None, chunk)
            fit = fit_backward(engine, torch.cat([xs, xa]), torch.cat([refs, ref_a]), current,
                               weight=float(1 / scale), chunk=chunk, grads=grads) / float(scale)
        else:
            fit = fit_backward(engine, xs, refs, current, weight=float(1 / scale), chunk=chunk,
                               grads=grads) / float(scale)
        objective_backward(engine, sets, current, config.reduction, weight=lam / float(scale.sqrt()), chunk=chunk,
                           known=known, grads=grads)
        grads.reduce()
        descend(opt, None, rel)

        if epoch % config.check_every == 0 or epoch == config.max_epochs:
            with torch.no_grad():
                snap = {k: v.detach().clone() for k, v in current().items()}
            obj = objective(snap)
            acc = accuracy(snap)
            feasible = acc >= config.acc_floor
            row = {
                "epoch": epoch,
                "max_epochs": config.max_epochs,
                "lambda": lam,
                "accuracy": acc,
                "fit": fit,
                "objective": obj,
                "feasible": feasible,
                "seconds": time.perf_counter() - start,
            }
            if monitor is not None:
                row.update(monitor(snap))
            history.append(row)
            if progress is not None:
                progress(row)
            if config.controller == "fixed":
                # Fixed lambda (MMOM's cross-validated setting): the last bounds are the answer.
                best = (obj, epoch, snap, acc, lam)
            elif feasible:
                last_ok = {k: v.detach().clone() for k, v in rel.items()}
                if best is None or obj < best[0]:
                    best = (obj, epoch, snap, acc, lam)
                    checks_since_best = 0
                else:
                    checks_since_best += 1
                lam *= up
            else:
                # Back off: return to the last feasible bounds, with a smaller lambda and a
                # gentler growth, instead of letting Adam's momentum run through the floor.
                restore(rel, last_ok)
                opt = new_optimiser()
                lam /= config.lambda_down
                up = max(1.0 + (up - 1.0) / 2, MIN_GROWTH)
                checks_since_best += 1
            if checks_since_best >= config.patience:
                break

    return conclude(best, z0, before, accuracy, weight=lam, epochs=epoch, start=start, history=history)
