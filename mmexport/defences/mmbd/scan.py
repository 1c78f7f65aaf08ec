"""Backdoor detection without a trigger: the MM-BD test on two maximum-margin statistics.

MM-BD (Wang, Miller & Kesidis): a backdoor target is the class whose maximum margin is
abnormally large. Estimate one statistic per class, take the largest as the candidate target,
fit a null law to the other K-1 values and ask how likely a maximum at least this large is
among K draws from it: p = 1 - F(s_max)^K.

One statistic does not see every trigger, so three are tested, each with its own null:

- ``max_margin``: the class's maximum margin over the whole input box (ascent from noise and
  from clean images). Triggers that change a few pixels a lot (patches) show here; but natural
  classes can reach large free margins too (a ResNet's texture-like classes), and a trigger of
  small amplitude spread over the image need not stand out among them.
- ``universal_gain``: one shared perturbation per class, at most `budget` x the input range
  per pixel (L-infinity), added to D's images of every other class; the mean gain in margin
  toward the class, in units of the spread (std) of those images' margins toward it on D.
  A backdoor is a shortcut that moves natural images of all classes to the target with a
  small change; dividing by the clean spread keeps classes whose margins merely run on a
  larger logit scale from standing out. Small global patterns show here.
- ``universal_gain_l2``: the same with the perturbation bounded in L2 (`l2_budget` x the
  box's norm), which lets it concentrate where a patch would be: optimised and ordinary
  patches stand out here by orders of magnitude more than under L-infinity, small global
  patterns less (docs/experiments.md#scan-harmonic).

The null law is a gamma with location 0 (the statistics are magnitudes with a natural zero),
fitted by maximum likelihood on the K-1 non-maximal values. The p-values are combined by
their harmonic mean (`combine`; Bonferroni on request): the verdict is `backdoor` when that
is below alpha, and the target is the candidate of the statistic with the smallest p-value.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ...core.config import check_choices, param, with_overrides
from ...core.errors import MmexportError, ParameterError
from .stats import CALIBRATION_DRAWS, COMBINE, MIN_CLASSES, StatisticTest, decide, mmbd_test


@dataclass(frozen=True)
class ScanConfig:
    """Every knob of the scan; the defaults are the shipped test, the same for every model."""

    alpha: float = param(0.05, "Significance level of the combined test.")
    restarts: int = param(10, "Max-margin ascent starts per class (half noise, half clean images).")
    ascent_steps: int = param(200, "Max-margin ascent steps per start.")
    step_size: float = param(0.02, "Signed-gradient ascent step, as a fraction of the input range.", cli=False)
    universal_steps: int = param(100, "Ascent steps on the shared perturbations.", cli=False)
    universal_batch: int = param(20, "Other-class images per class per step.", cli=False)
    judge_rows: int = param(0, "Other-class images of D each class's perturbation is judged on, at most (a "
                               "seeded draw where D has more); 0: 400, fewer where the classes are many "
                               "(20,000 in all, at least 50 a class).", cli=False)
    budget: float = param(0.05, "universal_gain's L-infinity radius: a fraction of the box's range per element.",
                          cli=False)
    l2_budget: float = param(0.05, "universal_gain_l2's L2 radius: a fraction of the box's norm (0: no such "
                                   "search, the two-statistic scan).", cli=False)
    combine: str = param("harmonic", "How the statistics' p-values make one: their harmonic mean, or Bonferroni "
                                     "(the number of statistics x the smallest).", choices=COMBINE, cli=False)
    calibration_draws: int = param(
        CALIBRATION_DRAWS, "Parametric-bootstrap draws that calibrate each statistic's p-value under its fitted null "
                           "(0: MM-BD's plug-in p-value, whose level is far above alpha: 25% at 0.05 with 10 classes "
                           "drawn from one gamma law, docs/experiments.md#scan-calibrated).")
    seed: int = param(0, "Seed of the searches: same seed, same result (on CPU).")
    time_limit: float | None = param(None, "Seconds the scan may take, predicted from the model's measured cost "
                                           "per row: where the steps above would take longer, restarts and steps "
                                           "shrink together until it fits (the report says how). auto: 225 s at "
                                           "reference costs (counted work at fixed rates: the same scan on any "
                                           "machine); 0: no limit.")
    max_memory: float = param(0.0, "GiB of activations held at once (0: a quarter of the available memory, at "
                                   "most 2 GiB).", cli=False)

    def __post_init__(self):
        check_choices(self)
        if self.time_limit is not None and not self.time_limit >= 0:
            raise ParameterError("time_limit", f"must be >= 0 or auto, got {self.time_limit}")
        for name in ("max_memory",):
            if getattr(self, name) < 0:
                raise ParameterError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.alpha < 1.0:
            raise ParameterError("alpha", f"must be in (0, 1), got {self.alpha}")
        for name in ("restarts", "universal_batch"):
            if getattr(self, name) < 1:
                raise ParameterError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("ascent_steps", "universal_steps", "judge_rows", "calibration_draws"):
            if getattr(self, name) < 0:
                raise ParameterError(name, f"must be >= 0, got {getattr(self, name)}")
        if not self.budget > 0:
            raise ParameterError("budget", f"must be > 0, got {self.budget}")
        if not self.l2_budget >= 0:
            raise ParameterError("l2_budget", f"must be >= 0, got {self.l2_budget}")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class ScanResult:
    """Verdict of the scan; `target_class` is None when the verdict is `clean`.

    `max_margins` are the per-class maximum margins (logit units); `tests` holds each
    statistic's test; `p_value` is the combined p-value (`ScanConfig.combine`).
    """

    verdict: str
    target_class: int | None
    p_value: float
    max_margins: list[float]
    candidate_class: int
    statistic: str  # the statistic whose test decided (smaller p-value)
    tests: dict[str, StatisticTest] = field(default_factory=dict)
    alpha: float = 0.05
    settings: dict = field(default_factory=dict)
    seconds: float = 0.0
    device: str = "cpu"
    model: str | None = None
    data: str | None = None
    schedule: dict | None = None  # the time limit, measured costs, and what shrank to fit it
    distributed: dict | None = None  # under torchrun: world size and the rows each rank ran

    def to_json(self) -> dict:
        return asdict(self)


# --- the searches (torch) ------------------------------------------------------------------


def universal_gain(
    engine,
    box,
    x,
    y,
    num_classes: int,
    *,
    norm: str,
    budget: float,
    steps: int,
    batch: int,
    generator,
    progress: Callable[[int], None] | None = None,
    chunk: int | None = None,
    judge_rows: int | None = None,
    keep: dict | None = None,
) -> list[float]:
    """Per class c: the mean margin gain toward c of D's other-class images (at most
    `judge_rows` of them; None or 0: `common.config.judge_rows(num_classes)`) under one shared
    perturbation, over its std on D (how many clean spreads a small shared change buys).
    `keep`, where given, receives the perturbations ("delta", [K, *sample]; this rank's classes
    under torchrun) and the share of the judged images each sends to its class ("fooled").

    The perturbation is bounded in `norm`: "l2" (radius `budget` x the norm of the box) or
    "linf" (`budget` x the box's range, per element); it is found by normalised (l2) or
    signed (linf) gradient ascent on the mean margin of a fresh batch of `batch` images
    per class each step.
    """
    import torch

    from ..common import ranks
    from ..common.config import judge_rows as default_judge_rows
    from ..common.margins import margins, row_slices

    span = box.hi - box.lo
    shape = (num_classes, *box.lo.shape)
    if norm == "l2":
        radius = budget * float(span.norm())
        step = 0.1 * radius
    elif norm == "linf":
        radius = budget * span
        step = 0.1 * radius
    else:
        raise MmexportError(f"unknown norm {norm!r}; choose l2 or linf")
    pools = [torch.nonzero(y != c).flatten() for c in range(num_classes)]
    classes = torch.arange(num_classes, device=x.device).repeat_interleave(batch)
    delta = torch.zeros(shape, device=x.device)
    for i in range(steps):
        pick = torch.cat(
            [p[torch.randint(0, len(p), (batch,), generator=generator).to(p.device)] for p in pools]
        )
        delta = delta.detach().requires_grad_(True)
        slices = [sl for _, sl in ranks.runs(len(classes), chunk, batch, "ascent")]  # this rank's classes
        if len(slices) == 1 and not ranks.active():
            m = margins(engine(box.clamp(x[pick] + delta.repeat_interleave(batch, dim=0))), classes)
            (grad,) = torch.autograd.grad(m.sum(), delta)
        else:
            grad = torch.zeros_like(delta)
            for sl in slices:
                m = margins(engine(box.clamp(x[pick[sl]] + delta[classes[sl]])), classes[sl])
                grad += torch.autograd.grad(m.sum(), delta)[0]
        with torch.no_grad():
            if norm == "l2":
                g = grad.flatten(1)
                g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
                d = delta.flatten(1) + step * g
                d = d * (radius / d.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
                delta = d.view(shape)
            else:
                delta = torch.maximum(torch.minimum(delta + step * grad.sign(), radius), -radius)
        if progress is not None and (i + 1) % 10 == 0:
            progress(10)
    if progress is not None and steps % 10:
        progress(steps % 10)
    out, mine = [], set(ranks.owned(num_classes, 1))
    cap = judge_rows or default_judge_rows(num_classes)
    with torch.no_grad():
        for c in range(num_classes):
            pool = pools[c]
            if len(pool) > cap:  # every rank draws for every class: the generator stays in step
                pool = pool[torch.randperm(len(pool), generator=generator)[:cap].to(pool.device)]
            if c not in mine:
                continue
            xs = x[pool]
            cls = torch.full((len(xs),), c, device=x.device)
            slices = row_slices(len(xs), chunk)
            before = torch.cat([margins(engine(xs[sl]), cls[sl]) for sl in slices])
            after = torch.cat([margins(engine(box.clamp(xs[sl] + delta[c])), cls[sl]) for sl in slices])
            ranks.rows_run["forward"] += 2 * len(xs)
            spread = float(before.std()) if len(xs) > 1 else 0.0
            out.append((float((after - before).mean()) / max(spread, 1e-6), float((after > 0).float().mean())))
    out = ranks.gather_objects(out)
    if keep is not None:
        keep.update(delta=delta.detach(), fooled=[f for _, f in out])
    return [g for g, _ in out]


def scan_engine(
    engine,
    x,
    y,
    num_classes: int,
    box,
    config: ScanConfig = ScanConfig(),
    *,
    progress: Callable[[str, int, int], None] | None = None,
    chunk: int | None = None,
    perturbations: dict | None = None,
) -> dict[str, StatisticTest]:
    """Every statistic and its MM-BD test for an engine, a clean set (x, y) and a box.
    `perturbations`, where given, receives each universal search's perturbations by statistic
    (`universal_gain`'s `keep`): the stand-ins of a global trigger that harden unlearns."""
    import torch

    from ..common.margins import Maximisers

    searches = [("universal_gain", "linf", config.budget, "universal perturbations (L-infinity)")]
    if config.l2_budget > 0:
        searches.append(("universal_gain_l2", "l2", config.l2_budget, "universal perturbations (L2)"))
    total = config.ascent_steps + len(searches) * config.universal_steps
    done = 0

    def tick(stage: str, n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(stage, done, total)

    gen = torch.Generator().manual_seed(config.seed)
    maxi = Maximisers(
        box, num_classes, config.restarts, generator=gen, clean_x=x, step_size=config.step_size
    )
    maxi.chunk = chunk
    every = 20
    m = None
    for start in range(0, config.ascent_steps, every):
        n = min(every, config.ascent_steps - start)
        m = maxi.ascend(engine, None, n)
        tick("max margins", n)
    if m is None:  # steps == 0: the starts themselves
        m = maxi.ascend(engine, None, 0)
    mm = [float(v) for v in maxi.per_class(m, "max").cpu()]

    draws, seed = config.calibration_draws, config.seed
    tests = {"max_margin": mmbd_test(mm, draws=draws, seed=seed)}
    for name, norm, budget, what in searches:
        # each search draws the same batches (its own generator, one seed): the statistics
        # differ by the norm alone
        ug = universal_gain(
            engine,
            box,
            x,
            y,
            num_classes,
            norm=norm,
            budget=budget,
            steps=config.universal_steps,
            batch=config.universal_batch,
            generator=torch.Generator().manual_seed(config.seed + 1),
            progress=lambda n, what=what: tick(what, n),
            chunk=chunk,
            judge_rows=config.judge_rows,
            keep=perturbations.setdefault(name, {}) if perturbations is not None else None,
        )
        tests[name] = mmbd_test(ug, draws=draws, seed=seed)
    return tests


# time_limit auto, at reference costs: 150 s for the two-statistic scan, half again for the
# L2 search, so that the real-size VGG, MobileNetV2 and EfficientNet keep their schedules
AUTO_SCAN_SECONDS = 225.0
SCAN_KNOBS = (("restarts", 2), ("ascent_steps", 20), ("universal_steps", 10), ("universal_batch", 5))


def scan_work(c: ScanConfig, n: int, k: int):
    """Row passes and forwards of `scan_engine` on n clean rows and k classes."""
    from ..common.config import judge_rows
    from ..common.schedule import Work

    judged = min(n * (k - 1) / k, c.judge_rows or judge_rows(k))  # other-class images per class, before and after
    searches = 2 if c.l2_budget > 0 else 1  # shared perturbations per class
    return Work(passes=k * c.restarts * c.ascent_steps + searches * c.universal_steps * k * c.universal_batch,
                forwards=k * c.restarts * (1 + -(-c.ascent_steps // 20)) + searches * 2 * k * judged)


def schedule_scan(engine, x, k: int, cfg: ScanConfig, dev):
    """The scan's config as it will run: priced on this model, shrunk to its time limit."""
    from ..common import ranks
    from ..common.cost import chunk_rows, measure, memory_budget, reference_cost
    from ..common.schedule import Knob, fit_schedule

    limit = AUTO_SCAN_SECONDS if cfg.time_limit is None else cfg.time_limit
    price = reference_cost if cfg.time_limit is None else measure
    cost = price(engine, x[: min(128, x.shape[0])], None)
    chunk = chunk_rows(cost, memory_budget(cfg.max_memory, dev))
    knobs = [Knob(name, floor) for name, floor in SCAN_KNOBS]
    # rank 0's measurement decides for every rank, which each run a share of the work
    return ranks.broadcast(fit_schedule(cfg, knobs, lambda c: scan_work(c, x.shape[0], k),
                                        cost.slower(1 / ranks.size()), limit, chunk))


def scan(
    model,
    clean_set,
    config: ScanConfig | None = None,
    *,
    input_range: tuple[float, float] | None = None,
    layout: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    input_name: str | None = None,
    output_name: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    **overrides,
) -> ScanResult:
    """Is `model` backdoored? MM-BD's test, no trigger needed, on a small clean set.

    `model`: ONNX path, ModelProto or Model. `clean_set`: Dataset, (x, y), or a path (.npz or image folder), every
    class present. Keyword overrides (alpha, restarts, ascent_steps, universal_steps, budget, seed,
    ...) replace fields of the default ScanConfig. `progress(stage, done, total)` follows the
    searches. The box is `input_range`, else the per-channel range of the clean set with the
    channels on the axis `layout` names ("nchw", "nhwc", None: recognised); `threads`:
    torch's thread count (default: the cores this process may use).
    """
    import torch

    from ...core.conventions import input_layout
    from ...core.data import as_dataset, check_every_class, check_for_model
    from ...core.model import as_model
    from ...core.threads import check_threads
    from ...engine.executor import Engine
    from ...engine.threads import use_threads
    from ..common import ranks
    from ..common.device import reproducible, resolve_device
    from ..common.margins import input_box

    cfg = with_overrides(config or ScanConfig(), overrides, what="the scan")
    check_threads(threads)

    start = time.perf_counter()
    m = as_model(model, input_name=input_name, output_name=output_name)
    clean = as_dataset(clean_set, model=m)
    k = m.num_classes
    where = m.path or "model"
    if k is None:
        raise MmexportError(f"{where}: output {m.output_name!r} has no static class dimension")
    if k < MIN_CLASSES:
        raise MmexportError(f"{where}: {k} classes; the scan's null needs at least {MIN_CLASSES}")
    check_for_model(clean, m.input_shape, k)
    check_every_class(clean, k)
    axis = input_layout(m, layout).channel_axis
    dev = resolve_device(device)
    with use_threads(threads), reproducible(dev):
        ranks.rows_run.clear()
        engine = Engine(m, device=dev, memory_format="auto")
        x = torch.from_numpy(clean.x).to(dev)
        y = torch.from_numpy(clean.y).to(dev)
        box = input_box(x, input_range, channel_axis=axis).to(dev)
        plan = schedule_scan(engine, x, k, cfg, dev)
        cfg = plan.config
        tests = scan_engine(engine, x, y, k, box, cfg, progress=progress, chunk=plan.chunk)
        share = ranks.share()
    verdict, target, p, name = decide(tests, cfg.alpha, cfg.combine)
    return ScanResult(
        verdict=verdict,
        target_class=target,
        p_value=p,
        max_margins=tests["max_margin"].values,
        candidate_class=tests[name].candidate,
        statistic=name,
        tests=tests,
        alpha=cfg.alpha,
        settings=cfg.to_json() | {"input_range": list(input_range) if input_range else None,
                                  "layout": input_layout(m, layout).name},
        schedule=plan.to_json(),
        distributed=share,
        seconds=time.perf_counter() - start,
        device=str(dev),
        model=str(m.path) if m.path else None,
        data=str(clean.path) if clean.path else None,
    )
