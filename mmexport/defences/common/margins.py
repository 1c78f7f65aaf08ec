"""Classification margins and their maximisation over the input box.

m_c(x) = g_c(x) - max_{k != c} g_k(x). A backdoor (or overfitting) shows as one class
whose maximum margin over all valid inputs is unusually large; the bound search shrinks
those maxima, so it needs good estimates of them: projected gradient ascent from many
starts per class, all classes and starts in one batch, warm-started between refreshes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ranks
from .ranks import row_slices  # noqa: F401  (the searches' helpers take it from here)


def margins(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """m_c for each row's class c: its logit minus the largest other logit."""
    own = logits.gather(1, classes[:, None])[:, 0]
    others = logits.scatter(1, classes[:, None], float("-inf"))
    return own - others.max(dim=1).values


def chunked_margins(engine, rows, n: int, classes: torch.Tensor, bounds, chunk: int | None,
                    unit: int | None = None) -> torch.Tensor:
    """Margins of n class-major rows (`unit` per class) without autograd, `rows(slice)` building
    each chunk's inputs; in a distributed run each rank runs its classes' and all are gathered."""
    with torch.no_grad():
        return ranks.gather_rows([margins(engine(rows(sl), bounds), classes[sl])
                                  for _, sl in ranks.runs(n, chunk, unit, "margins")], classes.device)


@dataclass
class Box:
    """The valid input region, per-element lower and upper limits shaped like one sample.

    `channel_axis`: the input's channel axis in a batch (1 for NCHW, 3 for NHWC; None for
    flat inputs), which stamps share their mask over and shifts move across.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    channel_axis: int | None = 1

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(x, self.hi), self.lo)

    def uniform(self, n: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.rand((n, *self.lo.shape), generator=generator, device="cpu")
        return self.lo + (self.hi - self.lo) * u.to(self.lo.device)

    def to(self, device) -> Box:
        return Box(self.lo.to(device), self.hi.to(device), self.channel_axis)


def input_box(x_clean: torch.Tensor, input_range: tuple[float, float] | None = None, *,
              channel_axis: int | None = 1) -> Box:
    """Per-channel min/max of the clean set (over samples and every other axis), or a fixed
    range. `channel_axis` is the batch's channel axis (1: NCHW, 3: NHWC; see
    `mmexport.core.conventions.input_layout`); flat inputs (N, F) get one range per feature."""
    shape = x_clean.shape[1:]
    axis = channel_axis if x_clean.dim() >= 3 else None
    if input_range is not None:
        lo, hi = input_range
        return Box(torch.full(shape, float(lo)), torch.full(shape, float(hi)), axis)
    if axis is not None:
        dims = [d for d in range(x_clean.dim()) if d != axis]
        keep = [1] * (x_clean.dim() - 1)
        keep[axis - 1] = -1
        lo = x_clean.amin(dim=dims).view(keep).expand(shape)
        hi = x_clean.amax(dim=dims).view(keep).expand(shape)
    else:  # flat inputs: one range per feature
        lo, hi = x_clean.amin(dim=0), x_clean.amax(dim=0)
    return Box(lo.contiguous().clone(), hi.contiguous().clone(), axis)


class Maximisers:
    """Persistent ascent points: `restarts` per class, refreshed with a few steps per epoch.

    Half of the starts are uniform noise in the box and half are clean images of D:
    triggers act on natural images, and noise alone finds other, easier maxima.
    """

    def __init__(
        self,
        box: Box,
        num_classes: int,
        restarts: int,
        *,
        generator: torch.Generator,
        clean_x: torch.Tensor | None = None,
        clean_fraction: float = 0.5,
        step_size: float = 0.02,
    ):
        self.box = box
        self.num_classes = num_classes
        self.restarts = restarts
        n = num_classes * restarts
        x = box.uniform(n, generator)
        if clean_x is not None and clean_fraction > 0:
            k = int(round(restarts * clean_fraction))
            if k:
                pick = torch.randint(0, clean_x.shape[0], (num_classes * k,), generator=generator)
                idx = torch.arange(n).view(num_classes, restarts)[:, :k].reshape(-1)
                x[idx] = clean_x[pick.to(clean_x.device)].to(x.device)
        self.x = x
        self.classes = torch.arange(num_classes, device=x.device).repeat_interleave(restarts)
        self.step = step_size * (box.hi - box.lo)
        self.chunk: int | None = None  # rows per forward/backward (None: all at once)

    def rows(self, sl: slice) -> torch.Tensor:
        return self.x[sl]

    def ascend(self, engine, bounds, steps: int) -> torch.Tensor:
        """Projected signed-gradient ascent on each point's own-class margin; returns margins.

        Each row moves on its own, so a rank ascends only its classes' rows."""
        for _ in range(steps):
            grads = []
            for _, sl in ranks.runs(len(self.x), self.chunk, self.restarts, "ascent"):
                xs = self.x[sl].detach().requires_grad_(True)
                (g,) = torch.autograd.grad(margins(engine(xs, bounds), self.classes[sl]).sum(), xs)
                grads.append((sl, g))
            x = self.x.detach().clone()
            for sl, g in grads:
                x[sl] = self.box.clamp(x[sl] + self.step * g.sign())
            self.x = x
        return chunked_margins(engine, self.rows, len(self.x), self.classes, bounds, self.chunk, self.restarts)

    def per_class(self, m: torch.Tensor, how: str = "max") -> torch.Tensor:
        """Reduce point margins [K*J] to one estimate per class [K]."""
        m = m.view(self.num_classes, self.restarts)
        return m.max(dim=1).values if how == "max" else m.mean(dim=1)


def max_margins(
    engine,
    box: Box,
    num_classes: int,
    *,
    bounds=None,
    restarts: int = 10,
    steps: int = 200,
    seed: int = 0,
    clean_x: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Estimated maximum margin of every class (the MM-BD statistic), shape [K]."""
    gen = torch.Generator().manual_seed(seed)
    maxi = Maximisers(box, num_classes, restarts, generator=gen, clean_x=clean_x)
    maxi.chunk = chunk
    return maxi.per_class(maxi.ascend(engine, bounds, steps), "max")


def project_capped_simplex(v: torch.Tensor, total: float, iterations: int = 40) -> torch.Tensor:
    """Euclidean projection of each row of v onto {m : 0 <= m <= 1, sum(m) <= total}.

    The projection is clamp(v - tau, 0, 1) with the smallest tau >= 0 that meets the sum,
    found by bisection: entries below tau vanish, so the result is sparse.
    """
    flat = v.flatten(1)
    clamped = flat.clamp(0.0, 1.0)
    over = clamped.sum(dim=1) > total
    if not bool(over.any()):
        return clamped.view_as(v)
    lo = torch.zeros(flat.shape[0], device=v.device, dtype=v.dtype)
    hi = flat.max(dim=1).values.clamp_min(0.0)
    for _ in range(iterations):
        tau = (lo + hi) / 2
        big = (flat - tau[:, None]).clamp(0.0, 1.0).sum(dim=1) > total
        lo = torch.where(big, tau, lo)
        hi = torch.where(big, hi, tau)
    shrunk = (flat - hi[:, None]).clamp(0.0, 1.0)
    return torch.where(over[:, None], shrunk, clamped).view_as(v)


def stamped(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """x with `pattern` stamped through `mask` (1: the pattern, 0: the image)."""
    return (1 - mask) * x + mask * pattern


class _OnCleanImages:
    """Per class, a batch of D's images of the other classes that a shared change is applied to."""

    def __init__(self, clean_x: torch.Tensor, clean_y: torch.Tensor, num_classes: int, *, generator, batch: int):
        self.num_classes = num_classes
        self.clean_x = clean_x
        self.generator = generator
        self.batch = batch
        # For each class, indices of clean images of the other classes.
        self.pools = [torch.nonzero(clean_y != c).flatten() for c in range(num_classes)]
        self.classes = torch.arange(num_classes, device=clean_x.device).repeat_interleave(batch)
        self.chunk: int | None = None  # rows per forward/backward (None: all at once)
        self.resample()

    def resample(self) -> None:
        picks = []
        for pool in self.pools:
            i = torch.randint(0, len(pool), (self.batch,), generator=self.generator)
            picks.append(pool[i.to(pool.device)])
        self.index = torch.cat(picks)

    def per_class(self, m: torch.Tensor, how: str = "mean") -> torch.Tensor:
        m = m.view(self.num_classes, self.batch)
        return m.max(dim=1).values if how == "max" else m.mean(dim=1)

    @property
    def restarts(self) -> int:
        return self.batch

    def _spread(self, t: torch.Tensor, sl: slice) -> torch.Tensor:
        """Per-class tensor t [K, ...] as one entry per row of the rows in sl."""
        if sl == slice(None):
            return t.repeat_interleave(self.batch, dim=0)
        return t[self.classes[sl]]

    def _ascent_grads(self, engine, bounds, params: tuple[torch.Tensor, ...], rows) -> tuple:
        """Gradients of the summed margins w.r.t. the per-class params, chunk by chunk."""
        n = len(self.classes)
        slices = [sl for _, sl in ranks.runs(n, self.chunk, self.batch, "ascent")]
        if len(slices) == 1 and not ranks.active():
            slices = [slice(None)]
        total = tuple(torch.zeros_like(p) for p in params) if not slices else None  # a rank with no class
        for sl in slices:
            m = margins(engine(rows(sl, *params), bounds), self.classes[sl])
            grads = torch.autograd.grad(m.sum(), params)
            total = grads if total is None else tuple(a + b for a, b in zip(total, grads, strict=True))
        return total


class UniversalMaximisers(_OnCleanImages):
    """One additive perturbation per class, applied to clean images of the other classes.

    A backdoor is a shortcut: one small input change that sends natural images of every
    class to the target with a large margin. Maximising each class's margin over a shared,
    norm-bounded perturbation of D's images finds that shortcut where free ascent points
    find other, easier maxima that the trigger pathway does not use.
    """

    def __init__(
        self,
        box: Box,
        clean_x: torch.Tensor,
        clean_y: torch.Tensor,
        num_classes: int,
        *,
        generator: torch.Generator,
        budget: float = 0.2,
        batch: int = 20,
        step_size: float = 0.1,
    ):
        self.box = box
        self.radius = budget * float((box.hi - box.lo).norm())
        self.step = step_size * self.radius
        self.delta = torch.zeros((num_classes, *box.lo.shape), device=clean_x.device)
        super().__init__(clean_x, clean_y, num_classes, generator=generator, batch=batch)

    def _shifted(self, sl: slice, delta: torch.Tensor) -> torch.Tensor:
        return self.box.clamp(self.clean_x[self.index[sl]] + self._spread(delta, sl))

    def rows(self, sl: slice) -> torch.Tensor:
        return self._shifted(sl, self.delta)

    def _project(self, delta: torch.Tensor) -> torch.Tensor:
        flat = delta.flatten(1)
        norm = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (flat * (self.radius / norm).clamp(max=1.0)).view_as(delta)

    def ascend(self, engine, bounds, steps: int) -> torch.Tensor:
        """Normalised-gradient ascent on each class's mean margin; returns point margins."""
        delta = self.delta
        for _ in range(steps):
            delta = delta.detach().requires_grad_(True)
            (grad,) = self._ascent_grads(engine, bounds, (delta,), self._shifted)
            g = grad.flatten(1)
            g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
            delta = self._project(delta.detach() + self.step * g.view_as(delta))
        self.delta = delta.detach()
        return chunked_margins(engine, self.rows, len(self.classes), self.classes, bounds, self.chunk, self.batch)

    @property
    def x(self) -> torch.Tensor:
        return self.rows(slice(None))


class MaskedMaximisers(_OnCleanImages):
    """One stamped pattern per class: x' = (1 - m) * x + m * p, the mask's area bounded.

    Patch triggers are sparse: an L2 budget lets the ascent spread its change over the whole
    image, where it finds dense adversarial directions rather than the patch. A mask whose
    total area is at most `area` of the image (Neural-Cleanse-like) can only buy margin by
    stamping a few pixels, so it looks for what a patch trigger does.
    """

    def __init__(
        self,
        box: Box,
        clean_x: torch.Tensor,
        clean_y: torch.Tensor,
        num_classes: int,
        *,
        generator: torch.Generator,
        area: float = 0.05,
        batch: int = 20,
        step_size: float = 0.1,
    ):
        super().__init__(clean_x, clean_y, num_classes, generator=generator, batch=batch)
        self.box = box
        mask_shape = list(box.lo.shape)
        if box.channel_axis is not None:  # shared over the image's channels
            mask_shape[box.channel_axis - 1] = 1
        mask_shape = tuple(mask_shape)
        self.area = area * float(torch.tensor(mask_shape).prod())
        self.mask = torch.full((num_classes, *mask_shape), area, device=clean_x.device)
        self.pattern = box.uniform(num_classes, generator)
        self.mask_step = step_size
        self.pattern_step = step_size * (box.hi - box.lo)

    def _stamp(self, sl: slice, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        return stamped(self.clean_x[self.index[sl]], self._spread(mask, sl), self._spread(pattern, sl))

    def rows(self, sl: slice) -> torch.Tensor:
        return self._stamp(sl, self.mask, self.pattern)

    def ascend(self, engine, bounds, steps: int) -> torch.Tensor:
        """Projected ascent on mask and pattern of each class's mean margin.

        The mask moves along its gradient scaled by the gradient's largest entry, not its
        sign, and is projected onto the capped simplex: the pixels that buy most margin
        grow and the rest fall to zero, so the mask concentrates on a patch. (Signed steps
        with a rescaling projection kept it spread thin over the whole image, a faint
        blend that never found a patch trigger.)
        """
        mask, pattern = self.mask, self.pattern
        for _ in range(steps):
            mask = mask.detach().requires_grad_(True)
            pattern = pattern.detach().requires_grad_(True)
            gm, gp = self._ascent_grads(engine, bounds, (mask, pattern), self._stamp)
            top = gm.flatten(1).abs().max(dim=1).values.clamp_min(1e-12)
            step = self.mask_step * gm / top.view(-1, *([1] * (gm.dim() - 1)))
            mask = project_capped_simplex(mask.detach() + step, self.area)
            pattern = self.box.clamp(pattern.detach() + self.pattern_step * gp.sign())
        self.mask, self.pattern = mask.detach(), pattern.detach()
        return chunked_margins(engine, self.rows, len(self.classes), self.classes, bounds, self.chunk, self.batch)

    @property
    def x(self) -> torch.Tensor:
        return self.rows(slice(None))
