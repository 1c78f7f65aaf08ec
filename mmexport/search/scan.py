"""Backdoor detection without a trigger: the MM-BD test on two maximum-margin statistics.

MM-BD (Wang, Miller & Kesidis): a backdoor target is the class whose maximum margin is
abnormally large. Estimate one statistic per class, take the largest as the candidate target,
fit a null law to the other K-1 values and ask how likely a maximum at least this large is
among K draws from it: p = 1 - F(s_max)^K.

One statistic does not see every trigger, so two are tested, each with its own null:

- ``max_margin``: the class's maximum margin over the whole input box (ascent from noise and
  from clean images). Triggers that change a few pixels a lot (patches) show here; but natural
  classes can reach large free margins too (a ResNet's texture-like classes), and a trigger of
  small amplitude spread over the image need not stand out among them.
- ``universal_gain``: one shared perturbation per class, at most `budget` x the input range
  per pixel (L-infinity), added to D's images of every other class; the mean gain in margin
  toward the class, in units of the spread (std) of those images' margins toward it on D.
  A backdoor is a shortcut that moves natural images of all classes to the target with a
  small change; dividing by the clean spread keeps classes whose margins merely run on a
  larger logit scale from standing out. The two statistics cover the two kinds of trigger:
  large and local, small and global.

The null law is a gamma with location 0 (both statistics are magnitudes with a natural zero),
fitted by maximum likelihood on the K-1 non-maximal values. The two p-values are combined by
Bonferroni (twice the smaller, capped at 1): the verdict is `backdoor` when that is below
alpha, and the target is the candidate of the statistic with the smaller p-value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from ..errors import MmexportError


@dataclass(frozen=True)
class ScanConfig:
    """Every knob of the scan; the defaults are the shipped test, the same for every model."""

    alpha: float = 0.05  # significance of the combined test
    restarts: int = 10  # max-margin ascent starts per class (half noise, half clean images)
    steps: int = 200  # max-margin ascent steps
    step_size: float = 0.02  # signed-gradient ascent step, fraction of the input range
    universal_steps: int = 100  # ascent steps on the shared perturbations
    universal_batch: int = 20  # other-class images per class per step
    norm: str = "linf"  # the shared perturbation's norm: "linf" or "l2"
    budget: float = 0.05  # its radius: fraction of the box's range (linf) or of its norm (l2)
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class StatisticTest:
    """One statistic's MM-BD test: per-class values, candidate class, null fit, p-value."""

    values: list[float]
    candidate: int
    p_value: float
    null_shape: float
    null_scale: float


@dataclass
class ScanResult:
    """Verdict of the scan; `target_class` is None when the verdict is `clean`.

    `max_margins` are the per-class maximum margins (logit units); `tests` holds each
    statistic's test; `p_value` is the combined (Bonferroni) p-value.
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

    def to_json(self) -> dict:
        return asdict(self)


# --- the null law and the test (pure functions on plain numbers) ---------------------------


def _digamma(x: float) -> float:
    acc = 0.0
    while x < 6.0:
        acc -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    series = f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f / 132))))
    return acc + math.log(x) - 0.5 / x - series


def _trigamma(x: float) -> float:
    acc = 0.0
    while x < 6.0:
        acc += 1.0 / (x * x)
        x += 1.0
    f = 1.0 / (x * x)
    return acc + 1.0 / x + f / 2 + (f / x) * (1 / 6 - f * (1 / 30 - f * (1 / 42 - f / 30)))


def fit_gamma(values) -> tuple[float, float]:
    """Maximum-likelihood (shape, scale) of a gamma law with location 0.

    Newton's method on log k - digamma(k) = log(mean) - mean(log), started from the
    Minka approximation. Values must be positive; equal values give shape = inf.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or (v <= 0).any():
        raise ValueError("fit_gamma needs at least two positive values")
    mean = float(v.mean())
    s = math.log(mean) - float(np.log(v).mean())
    if s < 1e-12:
        return math.inf, 0.0
    k = (3 - s + math.sqrt((s - 3) ** 2 + 24 * s)) / (12 * s)
    for _ in range(100):
        step = (math.log(k) - _digamma(k) - s) / (1 / k - _trigamma(k))
        k = max(k - step, k / 10)
        if abs(step) < 1e-12 * k:
            break
    return k, mean / k


def gamma_sf(x: float, shape: float, scale: float) -> float:
    """P(X > x) for a gamma law: the regularised upper incomplete gamma Q(shape, x / scale).

    Series below the mode, continued fraction (modified Lentz) above it, where the tail is
    computed directly so that tiny tail probabilities keep their digits.
    """
    if x <= 0:
        return 1.0
    a, z = shape, x / scale
    log_front = -z + a * math.log(z) - math.lgamma(a)
    if z < a + 1:
        term = total = 1.0 / a
        n = a
        for _ in range(10_000):
            n += 1
            term *= z / n
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_front))
    tiny = 1e-300
    b = z + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    return min(1.0, math.exp(log_front) * h)


def mmbd_test(values) -> StatisticTest:
    """MM-BD's test of the largest value against a gamma null fitted on the others.

    p = 1 - F(s_max)^K: the chance that the largest of K draws from the null is at least
    s_max. Values <= 0 (a class the search never made win) enter the null as a tiny
    positive number, which widens the null: the test stays conservative.
    """
    s = np.asarray(values, dtype=np.float64)
    if s.size < 3:
        raise MmexportError(f"scan needs at least 3 classes to fit a null, got {s.size}")
    if not np.isfinite(s).all():
        raise MmexportError("scan statistic is not finite (NaN or Inf logits?)")
    top = int(np.argmax(s))
    floor = max(1e-6 * float(np.abs(s).max()), 1e-12)
    pos = np.maximum(s, floor)
    null = np.delete(pos, top)
    shape, scale = fit_gamma(null)
    if math.isinf(shape):  # every other class equal: any larger value is off the null
        p = 0.0 if pos[top] > null[0] else 1.0
        return StatisticTest(s.tolist(), top, p, shape, scale)
    tail = gamma_sf(float(pos[top]), shape, scale)
    p = -math.expm1(s.size * math.log1p(-tail)) if tail < 1 else 1.0  # 1 - (1 - tail)^K
    return StatisticTest(s.tolist(), top, float(min(max(p, 0.0), 1.0)), shape, scale)


def decide(tests: dict[str, StatisticTest], alpha: float) -> tuple[str, int | None, float, str]:
    """(verdict, target or None, combined p-value, deciding statistic): Bonferroni over tests."""
    name = min(tests, key=lambda k: tests[k].p_value)
    p = min(1.0, len(tests) * tests[name].p_value)
    if p < alpha:
        return "backdoor", tests[name].candidate, p, name
    return "clean", None, p, name


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
) -> list[float]:
    """Per class c: the mean margin gain toward c of D's other-class images under one shared
    perturbation, over its std on D (how many clean spreads a small shared change buys).

    The perturbation is bounded in `norm`: "l2" (radius `budget` x the norm of the box) or
    "linf" (`budget` x the box's range, per element); it is found by normalised (l2) or
    signed (linf) gradient ascent on the mean margin of a fresh batch of `batch` images
    per class each step.
    """
    import torch

    from .margins import margins

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
        m = margins(engine(box.clamp(x[pick] + delta.repeat_interleave(batch, dim=0))), classes)
        (grad,) = torch.autograd.grad(m.sum(), delta)
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
    out = []
    with torch.no_grad():
        for c in range(num_classes):
            xs = x[pools[c]]
            cls = torch.full((len(xs),), c, device=x.device)
            before = margins(engine(xs), cls)
            after = margins(engine(box.clamp(xs + delta[c])), cls)
            spread = float(before.std()) if len(xs) > 1 else 0.0
            out.append(float((after - before).mean()) / max(spread, 1e-6))
    return out


def scan_engine(
    engine,
    x,
    y,
    num_classes: int,
    box,
    config: ScanConfig = ScanConfig(),
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, StatisticTest]:
    """Both statistics and their MM-BD tests for an engine, a clean set (x, y) and a box."""
    import torch

    from .margins import Maximisers

    total = config.steps + config.universal_steps
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
    chunk = 20
    m = None
    for start in range(0, config.steps, chunk):
        n = min(chunk, config.steps - start)
        m = maxi.ascend(engine, None, n)
        tick("max margins", n)
    if m is None:  # steps == 0: the starts themselves
        m = maxi.ascend(engine, None, 0)
    mm = [float(v) for v in maxi.per_class(m, "max").cpu()]

    gen_u = torch.Generator().manual_seed(config.seed + 1)
    ug = universal_gain(
        engine,
        box,
        x,
        y,
        num_classes,
        norm=config.norm,
        budget=config.budget,
        steps=config.universal_steps,
        batch=config.universal_batch,
        generator=gen_u,
        progress=lambda n: tick("universal perturbations", n),
    )
    return {"max_margin": mmbd_test(mm), "universal_gain": mmbd_test(ug)}


def scan(
    model,
    clean_set,
    *,
    input_range: tuple[float, float] | None = None,
    device: str = "auto",
    input_name: str | None = None,
    output_name: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    config: ScanConfig | None = None,
    **overrides,
) -> ScanResult:
    """Is `model` backdoored? MM-BD's test, no trigger needed, on a small clean set.

    `model`: ONNX path, ModelProto or Model. `clean_set`: .npz path, Dataset or (x, y), every
    class present. Keyword overrides (alpha, restarts, steps, universal_steps, budget, seed,
    ...) replace fields of the default ScanConfig. `progress(stage, done, total)` follows the
    searches.
    """
    import torch

    from ..data import as_dataset, check_every_class, check_for_model
    from ..engine import Engine
    from ..pipeline import reproducible, resolve_device
    from ..runtime import as_model
    from .margins import input_box

    cfg = config or ScanConfig()
    unknown = set(overrides) - set(ScanConfig.__dataclass_fields__)
    if unknown:
        raise MmexportError(f"unknown scan option(s): {', '.join(sorted(unknown))}")
    cfg = replace(cfg, **overrides)
    if not 0.0 < cfg.alpha < 1.0:
        raise MmexportError(f"alpha must be in (0, 1), got {cfg.alpha}")
    if cfg.restarts < 1 or cfg.steps < 0 or cfg.universal_steps < 0 or cfg.universal_batch < 1:
        raise MmexportError("restarts and universal_batch must be >= 1, steps >= 0")
    if cfg.norm not in ("linf", "l2"):
        raise MmexportError(f"unknown norm {cfg.norm!r}; choose linf or l2")
    if not cfg.budget > 0:
        raise MmexportError(f"budget must be > 0, got {cfg.budget}")

    start = time.perf_counter()
    m = as_model(model, input_name=input_name, output_name=output_name)
    clean = as_dataset(clean_set)
    k = m.num_classes
    where = m.path or "model"
    if k is None:
        raise MmexportError(f"{where}: output {m.output_name!r} has no static class dimension")
    if k < 3:
        raise MmexportError(f"{where}: {k} classes; the scan's null needs at least 3")
    check_for_model(clean, m.input_shape, k)
    check_every_class(clean, k)
    dev = resolve_device(device)
    engine = Engine(m, device=dev)
    x = torch.from_numpy(clean.x).to(dev)
    y = torch.from_numpy(clean.y).to(dev)
    box = input_box(x, input_range).to(dev)

    with reproducible(dev):
        tests = scan_engine(engine, x, y, k, box, cfg, progress=progress)
    verdict, target, p, name = decide(tests, cfg.alpha)
    return ScanResult(
        verdict=verdict,
        target_class=target,
        p_value=p,
        max_margins=tests["max_margin"].values,
        candidate_class=tests[name].candidate,
        statistic=name,
        tests=tests,
        alpha=cfg.alpha,
        settings=cfg.to_json() | {"input_range": list(input_range) if input_range else None},
        seconds=time.perf_counter() - start,
        device=str(dev),
        model=str(m.path) if m.path else None,
        data=str(clean.path) if clean.path else None,
    )
