"""Schedules that fit a time limit: the search's work counted in rows, priced per model.

The defaults (10 restarts per class, 100 warm-up steps, 150 epochs, ...) were set on models
whose forward pass costs microseconds; on a PreAct-ResNet-18 at 32x32 the same schedule is
hours. Each method states its work as row passes (forward and backward) and row forwards
as a function of its settings; with the per-row costs measured on the model (`cost.measure`)
that is a time. Where the default schedule would run past the limit, every knob that sets
the amount of work shrinks by the same factor f^exponent (never below its floor) and f is the
largest (on a coarse grid) that fits: restarts, ascent steps and epochs go down together
rather than one of them collapsing. Where the default fits, nothing changes.

The costs are measured, not derived from FLOPs: depthwise convolutions ran 7x slower per
FLOP than a ResNet's here (MobileNetV2-style 47 ms per row for 0.16 GFLOP, PreAct-ResNet-18
84 ms for 2.2 GFLOP; docs/experiments.md, "Real-size models").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from .config import judge_rows
from .cost import RowCost


@dataclass(frozen=True)
class Knob:
    """A setting that sets the amount of work: value x f^exponent, at least `floor`."""

    field: str
    floor: int
    exponent: float = 0.5


@dataclass(frozen=True)
class Work:
    """Row passes (forward + backward) and row forwards."""

    passes: float = 0.0
    forwards: float = 0.0

    def __add__(self, other: Work) -> Work:
        return Work(self.passes + other.passes, self.forwards + other.forwards)

    def __mul__(self, k: float) -> Work:
        return Work(self.passes * k, self.forwards * k)

    def seconds(self, cost: RowCost) -> float:
        return self.passes * cost.backward_seconds + self.forwards * cost.forward_seconds


@dataclass(frozen=True)
class Schedule:
    """The settings a run uses, and why: the limit, the costs and the shrink factor."""

    config: object  # the method's config as run
    scale: float  # 1: the defaults as they are
    default_seconds: float  # predicted for the unscaled config
    planned_seconds: float  # predicted for `config`
    time_limit: float
    cost: RowCost
    chunk: int | None  # rows per forward/backward (None: all at once)
    changed: dict  # field: (default, as run) for every knob that moved
    finetune_seconds: float | None = None  # mmac-ft: the weights' fine-tune, outside the limit
    # `config` priced at costs timed on this machine, where the schedule was counted at reference
    # rates (`harden --plan`): small models run several times slower per row than their FLOPs count
    measured_seconds: float | None = None
    # the stage fitted again after the stamp search (`after_stamp`): its name, what its default
    # would take and the time the limit left it
    second: dict | None = None

    def to_json(self) -> dict:
        return {
            "time_limit": self.time_limit,
            "scale": round(self.scale, 4),
            "default_seconds": round(self.default_seconds, 1),
            "planned_seconds": round(self.planned_seconds, 1),
            "chunk_rows": self.chunk,
            "changed": {k: list(v) for k, v in self.changed.items()},
            **self.cost.to_json(),
        } | ({"finetune_seconds": round(self.finetune_seconds, 1)} if self.finetune_seconds is not None else {}) | (
            {"measured_seconds": round(self.measured_seconds, 1)} if self.measured_seconds is not None else {}) | (
            {"second_stage": self.second} if self.second is not None else {})


def merge(first: Schedule, second: Schedule, stage: str | None = None) -> Schedule:
    """The schedule as run when a later stage was fitted again: `second`'s config and plan,
    every knob's move counted from the defaults, `first`'s default time and factor; `stage`
    names the stage refitted (kept with its own default time and the time it was left)."""
    changed = dict(first.changed)
    for field, (_, now) in second.changed.items():
        was = first.changed.get(field, (now, now))[0] if field in first.changed else getattr(first.config, field)
        changed[field] = (was, now)
    changed = {f: v for f, v in changed.items() if v[0] != v[1]}
    note = None if stage is None else {"stage": stage, "default_seconds": round(second.default_seconds, 1),
                                       "time_left": round(second.time_limit, 1)}
    return replace(first, config=second.config, scale=min(first.scale, second.scale),
                   planned_seconds=first.planned_seconds, changed=changed, second=note)


def scaled(config, knobs: list[Knob], f: float):
    """The config with every knob at value x f^exponent (rounded, floored, never raised)."""
    values = {}
    for k in knobs:
        v = getattr(config, k.field)
        values[k.field] = min(v, max(k.floor, round(v * f**k.exponent)))
    return replace(config, **values)


def fit_schedule(
    config,
    knobs: list[Knob],
    work: Callable[[object], Work],
    cost: RowCost,
    time_limit: float,
    chunk: int | None = None,
) -> Schedule:
    """The largest f on the grid 2^(-j/2) whose scaled config's predicted time is within
    `time_limit` (the floors may leave it above: then the floors are the schedule).

    The grid keeps the schedule, and with it the result of a seeded run, the same from run
    to run on one machine although the measured costs jitter: only a cost that moves across
    a step of ~41% changes it. The report lists every knob as run, so `time_limit=0` with
    those values replays a run anywhere."""
    default = work(config).seconds(cost)
    f = 1.0
    if time_limit > 0 and default > time_limit:
        j = 1
        while j < 60 and work(scaled(config, knobs, 2 ** (-j / 2))).seconds(cost) > time_limit:
            j += 1
        f = 2 ** (-j / 2)
    run = scaled(config, knobs, f) if f < 1.0 else config
    changed = {k.field: (getattr(config, k.field), getattr(run, k.field)) for k in knobs
               if getattr(config, k.field) != getattr(run, k.field)}
    return Schedule(config=run, scale=f, default_seconds=default, planned_seconds=work(run).seconds(cost),
                    time_limit=time_limit, cost=cost, chunk=chunk, changed=changed)


# --------------------------------------------------------------------------- the searches' work

SEARCH_KNOBS = [
    Knob("restarts", 2), Knob("warmup_steps", 10), Knob("steps", 2), Knob("max_epochs", 10),
    Knob("probe_steps", 20), Knob("fit_rows", 32), Knob("floor_rows", 200),
]  # fmt: skip
MMAC_KNOBS = [*SEARCH_KNOBS, Knob("unlearn_epochs", 20)]
SETS = {"points": 1, "universal": 1, "masked": 1, "both": 2, "universal+masked": 2}


def with_rows(config, n: int):
    """The config with fit_rows / floor_rows spelled out for a clean set of n (0 means all)."""
    floor = 5 * n if config.augment else n
    return replace(config, fit_rows=min(config.fit_rows or n, n), floor_rows=min(config.floor_rows or floor, floor))


def search_work(c, n: int, k: int, *, fit_n: float | None = None) -> Work:
    """One max-margin search (`fit_bounds`) on n clean rows and k classes."""
    rows = SETS[c.maximisers] * k * c.restarts
    fit = min(c.fit_rows, n) if fit_n is None else fit_n
    logit_rows = 2 * fit if (c.augment and c.method == "mmac") else fit
    argmax_rows = SETS[c.maximisers] * c.restarts if c.reduction == "max" else rows
    epochs, checks = c.max_epochs, c.max_epochs / c.check_every
    return Work(
        passes=rows * c.warmup_steps + epochs * (rows * c.steps + logit_rows + argmax_rows),
        forwards=rows + epochs * (2 * rows + fit) + checks * (c.floor_rows + rows),
    )


def probe_work(c, k: int) -> Work:
    """The report's before/after max-margin estimates."""
    rows = k * c.restarts
    return Work(passes=2 * rows * c.probe_steps, forwards=2 * rows)


def stamp_work(c, n: int, k: int) -> Work:
    """MMAC's stamp search: one masked maximiser per class, then each judged on D."""
    judged = min(n * (k - 1) / k, judge_rows(k))
    return Work(passes=k * c.restarts * (c.warmup_steps + c.steps), forwards=k * c.restarts + k * judged)


def unlearn_work(c, n: int, k: int) -> Work:
    """Unlearning a found stamp: D's logit rows and the stamped rows each epoch, the checks."""
    purge = c.fit_rows * (k - 1) / (2 * k)
    return Work(passes=c.unlearn_epochs * (c.fit_rows + purge),
                forwards=c.unlearn_epochs / c.check_every * (c.floor_rows + n / 2))


def finetune_work(c, n: int, k: int) -> Work:
    """mmac-ft's fine-tune of the weights: every epoch D and its other-class images stamped (a
    second copy, shifted, where the scan's shift joins the stamp: about half again). A pass that
    also takes the weights' gradients is priced at 1.5 row passes (a convolution's weight
    gradient costs about what its input gradient does)."""
    return Work(passes=1.5 * c.ft_epochs * (n + n * (k - 1) / k))


def mmac_work(c, n: int, k: int) -> Work:
    """Before the stamp search: the stamp search, the cheaper of the two stages that may follow
    (unlearning, almost always), the probe. Pricing the dearer one instead over-predicted the
    16x16 samples' runs 2-4x and shrank them on a busy machine; where the dearer stage runs,
    `second_stage` fits it to the time left."""
    search = search_work(c, n, k)
    if c.unlearn == "off":
        return search + probe_work(c, k)
    unlearn = unlearn_work(c, n, k)
    cheaper = unlearn if unlearn.passes <= search.passes else search
    return stamp_work(c, n, k) + cheaper + probe_work(c, k)


def after_stamp(first: Schedule, stage: str, n: int, k: int, time_left: float,
                stamp_seconds: float | None) -> tuple[Schedule, Schedule]:
    """(the schedule as it will run, the second stage's own fit) once the stamp search is done.

    The stamp search's own time says how fast rows run now, which the costs measured before it
    may not (the machine's load moves: a ResNet-18's unlearning ran 1.5x its plan when two jobs
    started), so the costs are scaled by its measured over its predicted seconds (0.5-4x)."""
    factor = 1.0
    if stamp_seconds is not None:
        predicted = max(stamp_work(first.config, n, k).seconds(first.cost), 1e-9)
        factor = min(4.0, max(0.5, stamp_seconds / predicted))
    again = second_stage(first.config, stage, n, k, first.cost.slower(factor), time_left, first.chunk)
    return merge(first, again, stage), again


def second_stage(config, stage: str, n: int, k: int, cost: RowCost, time_left: float, chunk: int | None) -> Schedule:
    """After the stamp search: the stage that runs (`unlearn` or `search`) and the probe, fitted
    to the time left; only that stage's knobs move (the probe's restarts and steps with it)."""
    if stage == "unlearn":
        knobs = [k_ for k_ in MMAC_KNOBS
                 if k_.field in ("unlearn_epochs", "fit_rows", "floor_rows", "probe_steps", "restarts")]
        work = lambda c: unlearn_work(c, n, k) + probe_work(c, k)  # noqa: E731
    else:
        knobs = [k_ for k_ in SEARCH_KNOBS]
        work = lambda c: search_work(c, n, k) + probe_work(c, k)  # noqa: E731
    return fit_schedule(config, knobs, work, cost, time_left if time_left > 0 else 1e-9, chunk)


def mmom_work(c, n: int, k: int, fits: int) -> Work:
    """`fits` cross-validation fits on half of D, the final fit on all of it, the probe."""
    half = replace(c, fit_rows=max(1, c.fit_rows // 2), floor_rows=max(1, c.floor_rows // 2))
    return search_work(half, n // 2, k) * fits + search_work(c, n, k) + probe_work(c, k)
