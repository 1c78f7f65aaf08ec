"""Unlearning a reverse-engineered trigger through the bounds (the default where one is found).

The max-margin objective shrinks what its maximisers find, but on many models the trigger
pathway on natural images survives it (docs/experiments.md sections 13-16). A patch-like
trigger can be found without the attack set: one stamped pattern of bounded area per class
(the masked maximisers), ascended on the original model. A backdoor shows as one class whose
stamp buys far more margin than any other class's. When that happens the stamp is taken as
the trigger, put on half of D's images of the other classes, and the bounds are fitted to
keep D's logits while those stamped images go back to their own labels; the stamp's weight is
driven up while accuracy on D (and its shifts) stays above a floor. The bounds that send the
fewest stamped images of the other half of D to the suspect class win. Where no stamp stands
out, the MM-BD scan may name the class instead (`scan_stamp`), and its universal perturbation
toward that class joins the stamp as a second stand-in: a global additive trigger (a smooth
pattern, a blend) that no stamp of bounded area reproduces (docs/experiments.md#scan-shift).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from ..common import ranks
from ..common.config import SearchConfig, judge_rows
from ..common.margins import Box, MaskedMaximisers, margins, stamped
from ..common.search import (
    MIN_GROWTH,
    SearchResult,
    conclude,
    descend,
    fit_backward,
    floor_set,
    initial_bounds,
    kept_correct,
    predict,
    restore,
    subset,
)
from ..mmbd.stats import MIN_CLASSES  # a stamp is judged against two other classes at least


@dataclass
class Stamp:
    """The stamped patterns found on the original model and what they say about a backdoor."""

    target: int  # class whose stamp buys the largest mean margin
    margins: list[float]  # mean stamped margin per class over all of D's other-class images
    fooled: list[float]  # fraction of D's other-class images each class's stamp sends to it
    outlier: float  # (largest - second largest margin) / MAD of the other classes' margins
    found: bool  # treated as a trigger: beyond the gate, or the scan's target (`source`)
    mask: torch.Tensor = field(repr=False)  # of the target class, shaped like a sample, 1 channel
    pattern: torch.Tensor = field(repr=False)
    source: str = "stamp"  # what named the target: the stamp's outlier score, or the scan
    scan: dict | None = None  # the scan's verdict where it was asked (no stamp stood out, or shift "always")
    maximisers: object = field(default=None, repr=False, compare=False)  # every class's stamp
    # the scan's universal perturbation toward the target, where it moves most of D
    shift: torch.Tensor | None = field(default=None, repr=False)
    box: Box | None = field(default=None, repr=False)  # what the shifted images are clamped to
    use_stamp: bool = True  # the stamp is a stand-in (the scan's route may keep the shift alone)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return stamped(x, self.mask, self.pattern)

    @property
    def stand_ins(self) -> list[str]:
        """What stands in for the trigger: the stamp, the scan's shift, or both."""
        return ["stamp"] * self.use_stamp + ["shift"] * (self.shift is not None)

    @property
    def copies(self) -> int:
        """How many triggered copies of an image `triggered` makes: one per stand-in."""
        return len(self.stand_ins)

    def triggered(self, x: torch.Tensor) -> torch.Tensor:
        """x under every stand-in of the trigger, copy after copy (labels: `y.repeat(copies)`)."""
        parts = [self.apply(x)] if self.use_stamp else []
        if self.shift is not None:
            parts.append(self.box.clamp(x + self.shift))
        return torch.cat(parts)

    def to_json(self) -> dict:
        return {
            "target": self.target,
            "found": self.found,
            "outlier": self.outlier,
            "margins": self.margins,
            "fooled": self.fooled,
            "mask_area": float(self.mask.sum()),
            "source": self.source,
            "scan": self.scan,
            "stand_ins": self.stand_ins if self.found else [],
        }


def outlier_score(values: torch.Tensor) -> float:
    """How far the largest value stands out: gap to the runner-up over the others' MAD.

    The gap, not the distance to the median: on clean models two classes can share the lead
    (a natural easy class), and a gap of zero then says no single class is special. Medians
    are the midpoints of even counts (torch's `median` takes the lower value: with two other
    classes the MAD was then 0 and every stamp stood out by millions). With one other class
    there is no spread to compare with: 0.
    """
    v = values.detach().cpu().double().sort(descending=True).values
    if v.numel() < MIN_CLASSES:
        return 0.0
    gap = float(v[0] - v[1])
    rest = v[1:]
    mad = float((rest - rest.quantile(0.5)).abs().quantile(0.5))
    return gap / max(mad, 1e-6)


def find_stamp(
    engine, x: torch.Tensor, y: torch.Tensor, box: Box, num_classes: int, config: SearchConfig,
    chunk: int | None = None,
) -> Stamp:
    """Ascend one stamp per class on the original model; name the outlier class, if any."""
    gen = torch.Generator().manual_seed(config.seed)
    ms = MaskedMaximisers(box, x, y, num_classes, generator=gen, area=config.mask_area, batch=config.restarts)
    ms.chunk = chunk
    ms.ascend(engine, None, config.warmup_steps + config.steps)
    # Each stamp is judged on all of D's images of the other classes, not on the ascent's
    # batch of `restarts`: measured on the samples over three seeds, the batch's mean margins
    # put the signal CNN's outlier at 2.9-9.4 and the wide blend's at 3.5-8.9, all of D at
    # 5.0-7.0 and 13.3-22.7, with the clean models at <= 1.2 either way.
    judged = []  # (margin, fooled) of this rank's classes (all of them in a single process)
    mine = set(ranks.owned(num_classes, 1))
    pick = torch.Generator().manual_seed(config.seed + 3)
    cap = judge_rows(num_classes)
    with torch.no_grad():
        for c in range(num_classes):
            others = x[y != c]
            if len(others) > cap:
                others = others[torch.randperm(len(others), generator=pick)[:cap].to(x.device)]
            if c not in mine:  # another rank's class (its draw above keeps the generator in step)
                continue
            out = predict(engine, stamped(others, ms.mask[c], ms.pattern[c]), None, chunk, shared=False)
            judged.append((float(margins(out, torch.full((len(others),), c, device=x.device)).mean()),
                           float((out.argmax(1) == c).float().mean())))
    judged = ranks.gather_objects(judged)
    per_class = torch.tensor([m for m, _ in judged])
    target = int(per_class.argmax())
    score = outlier_score(per_class)
    mask, pattern = ranks.from_owner((ms.mask[target].detach().cpu(), ms.pattern[target].detach().cpu()),
                                     target, num_classes)
    return Stamp(
        target=target,
        margins=[float(v) for v in per_class],
        fooled=[f for _, f in judged],
        outlier=score,
        found=score >= config.unlearn_gate,
        mask=mask.to(x.device),
        pattern=pattern.to(x.device),
        maximisers=ms,
    )


def scan_stamp(stamp: Stamp, engine, x: torch.Tensor, y: torch.Tensor, box: Box, num_classes: int,
               config: SearchConfig, chunk: int | None = None) -> Stamp:
    """Where no stamp stands out: the MM-BD scan's target, found (to be unlearned) if the scan
    names a target and its stamp, or the scan's universal perturbation toward it, sends at least
    `scan_fooled` of D's other classes to it; each that does is a stand-in. Else the stamp as
    it was, with the scan's verdict attached.

    A class's stamp can fail the outlier gate because natural classes' stamps also move many
    images (an MLP, a MobileNetV2 at 5% of a 32x32 image), while the scan's test still names
    the target; a stamp that moves most of D to that class is a trigger's stand-in. A global
    additive trigger (the LF-like VGG's smooth pattern) has no stamp of bounded area; the
    perturbation of the universal search (of the two norms, the one that moves more of D) is
    its stand-in: unlearned in the weights (mmac-ft) it took that model's ASR from 80% to
    2.7-4.0% (docs/experiments.md#scan-shift).
    """
    if num_classes < MIN_CLASSES:
        return replace(stamp, scan={"skipped": f"{num_classes} classes; the scan's null needs at least {MIN_CLASSES}"})
    summary, target, shift = ask_scan(engine, x, y, box, num_classes, config, chunk)
    if target is None:
        return replace(stamp, scan=summary)
    use_stamp = stamp.fooled[target] >= getattr(config, "scan_fooled", 0.5)
    if not use_stamp and shift is None:
        return replace(stamp, scan=summary)
    ms = stamp.maximisers
    mask, pattern = ranks.from_owner((ms.mask[target].detach().cpu(), ms.pattern[target].detach().cpu()),
                                     target, num_classes)
    return replace(stamp, target=target, found=True, source="scan", scan=summary,
                   mask=mask.to(x.device), pattern=pattern.to(x.device), shift=shift, box=box,
                   use_stamp=use_stamp)


def shift_stamp(stamp: Stamp, engine, x: torch.Tensor, y: torch.Tensor, box: Box, num_classes: int,
                config: SearchConfig, chunk: int | None = None) -> Stamp:
    """Where a stamp stood out (`shift="always"`): the scan is asked too, and its universal
    perturbation joins the stamp as a stand-in if the scan names the stamp's class and the
    perturbation moves at least `scan_fooled` of D's other classes to it."""
    if num_classes < MIN_CLASSES:
        return stamp
    summary, target, shift = ask_scan(engine, x, y, box, num_classes, config, chunk)
    if target != stamp.target or shift is None:
        return replace(stamp, scan=summary)
    return replace(stamp, scan=summary, shift=shift, box=box)


def ask_scan(engine, x: torch.Tensor, y: torch.Tensor, box: Box, num_classes: int, config: SearchConfig,
             chunk: int | None = None) -> tuple[dict, int | None, torch.Tensor | None]:
    """The MM-BD scan with its defaults (on harden's time limit where one is given): its verdict,
    its target (None: clean), and its universal perturbation toward the target, of the norm that
    moves more of D, where that moves at least `scan_fooled` of D's other classes (None too where
    `config.shift` is off)."""
    from ..mmbd.scan import ScanConfig, scan_engine, schedule_scan
    from ..mmbd.stats import decide

    scan_cfg = ScanConfig(seed=config.seed, time_limit=getattr(config, "time_limit", None))
    plan = schedule_scan(engine, x, num_classes, scan_cfg, x.device)
    kept: dict = {}
    tests = scan_engine(engine, x, y, num_classes, box, plan.config, chunk=plan.chunk, perturbations=kept)
    verdict, target, p, statistic = decide(tests, plan.config.alpha, plan.config.combine)
    summary = {"verdict": verdict, "target_class": target, "p_value": p, "statistic": statistic,
               "schedule": plan.to_json()}
    moved = {name: k["fooled"][target] for name, k in kept.items() if k.get("fooled")} if target is not None else {}
    if not moved:
        return summary, target, None
    name = max(moved, key=moved.get)
    summary["shift"] = {"statistic": name, "fooled": moved[name]}
    if moved[name] < getattr(config, "scan_fooled", 0.5) or getattr(config, "shift", "scan") == "off":
        return summary, target, None
    delta = ranks.from_owner(kept[name]["delta"][target].detach().cpu(), target, num_classes)
    return summary, target, delta.to(x.device)


def halves(y: torch.Tensor) -> torch.Tensor:
    """Every other image of each class: True for the half the stamp is unlearned on."""
    first = torch.zeros(len(y), dtype=torch.bool, device=y.device)
    for c in torch.unique(y):
        first[torch.nonzero(y == c).flatten()[::2]] = True
    return first


def choose_check(checks: list[tuple], held: int, tolerance: float):
    """The feasible check to return: the most accurate among those the held-out stamped images
    cannot tell from the best one.

    The held-out rate is a binomial estimate from `held` images; checks within `tolerance`
    standard errors of the lowest rate are indistinguishable by it (Breiman's one-standard-error
    rule), and among them the one that keeps most of D's accuracy costs the user least. With
    tolerance 0, or a best rate of 0, it is the lowest rate (ties: the most accurate).
    """
    if not checks:
        return None
    low = min(c[0] for c in checks)
    se = (low * (1.0 - low) / max(held, 1)) ** 0.5
    near = [c for c in checks if c[0] <= low + tolerance * se + 1e-12]
    return max(near, key=lambda c: (c[3], -c[0], -c[1]))


def unlearn_bounds(
    engine,
    x: torch.Tensor,
    y: torch.Tensor,
    stamp: Stamp,
    config: SearchConfig,
    *,
    progress: Callable[[dict], None] | None = None,
    channel_axis: int | None = 1,
    chunk: int | None = None,
) -> SearchResult:
    """Fit bounds that keep D's logits and send stamped images of D back to their labels.

    The stamp's weight starts small and grows by `lambda_up` per check while the accuracy
    floor on D and its shifts holds (`unlearn_floor`), and backs off to the last feasible
    bounds when it does not: the same controller as the max-margin search, on another term.
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    ref = predict(engine, x, None, chunk)
    scale = ref.var(dim=0).sum().clamp_min(1e-8)
    xc, yc, correct = floor_set(engine, x, y, channel_axis=channel_axis, chunk=chunk, rows=config.floor_rows,
                                seed=config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    share = min(1.0, config.fit_rows / x.shape[0]) if config.fit_rows else 1.0

    first = halves(y)
    other = y != stamp.target
    fit_x, fit_y = stamp.triggered(x[first & other]), y[first & other].repeat(stamp.copies)
    held_x = stamp.triggered(x[~first & other])

    z0 = initial_bounds(engine, x, config.granularity, batch_size=chunk or 256)
    names = list(z0)
    rel = {k: torch.ones_like(v, requires_grad=True) for k, v in z0.items()}

    def current() -> dict:
        return {k: z0[k] * rel[k] for k in names}

    def new_optimiser():
        return torch.optim.Adam(list(rel.values()), lr=config.lr)

    opt = new_optimiser()
    grads = ranks.Gradients(list(rel.values()))
    weight, up = config.unlearn_weight0, config.lambda_up
    last_ok = {k: v.detach().clone() for k, v in rel.items()}
    checks = []  # feasible: (held-out fooled, epoch, bounds, accuracy, weight)
    history: list[dict] = []
    epochs = config.unlearn_epochs
    for epoch in range(1, epochs + 1):
        opt.zero_grad()
        xs, refs = subset(gen, config.fit_rows, x, ref)
        fit = fit_backward(engine, xs, refs, current, weight=float(1 / scale), chunk=chunk, grads=grads,
                           key=0) / float(scale)
        px, py = subset(gen, round(share * len(fit_y)), fit_x, fit_y)
        fit_backward(engine, px, None, current, weight=weight, chunk=chunk, labels=py, grads=grads, key=1)
        grads.reduce()
        descend(opt, None, rel)

        if epoch % config.check_every == 0 or epoch == epochs:
            with torch.no_grad():
                snap = {k: v.detach().clone() for k, v in current().items()}
            acc = kept_correct(engine, xc, yc, correct, snap, chunk)
            fooled = float((predict(engine, held_x, snap, chunk).argmax(1) == stamp.target).float().mean())
            feasible = acc >= config.unlearn_floor
            row = {
                "epoch": epoch,
                "max_epochs": epochs,
                "lambda": weight,
                "accuracy": acc,
                "fit": fit,
                "objective": fooled,  # held-out stamped images still sent to the suspect class
                "feasible": feasible,
                "seconds": time.perf_counter() - start,
                "phase": "unlearn",
            }
            history.append(row)
            if progress is not None:
                progress(row)
            if feasible:
                last_ok = {k: v.detach().clone() for k, v in rel.items()}
                checks.append((fooled, epoch, snap, acc, weight))
                weight *= up
            else:
                restore(rel, last_ok)
                opt = new_optimiser()
                weight /= config.lambda_down
                up = max(1.0 + (up - 1.0) / 2, MIN_GROWTH)

    before = float((predict(engine, held_x, None, chunk).argmax(1) == stamp.target).float().mean())
    best = choose_check(checks, len(held_x), getattr(config, "unlearn_tolerance", 0.0))
    return conclude(best, z0, before, lambda b: kept_correct(engine, xc, yc, correct, b, chunk), weight=0.0,
                    epochs=epochs, start=start, history=history)
