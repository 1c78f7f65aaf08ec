"""`harden`: bounds searched on the clean set, written into the model with provenance.

ONNX -> engine -> MMAC or MMOM (the config's type picks which) -> rewritten ONNX. A
transformer in ART's terms: it returns a new, repaired classifier.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import onnx
import torch

from .. import __version__
from ..core.bounds import Bounds
from ..core.config import with_overrides
from ..core.conventions import input_layout
from ..core.data import as_dataset
from ..core.errors import ParameterError
from ..core.model import as_model, from_proto
from ..core.provenance import data_sha256, model_sha256, set_metadata
from ..core.threads import check_threads
from ..engine.executor import Engine
from ..engine.threads import use_threads
from ..graph.rewrite import FORMS, apply_bounds, bound_tensors
from .common import ranks
from .common.checks import check_clean_set, check_original, with_site_shapes
from .common.config import auto_time_limit
from .common.cost import chunk_rows, measure, memory_budget, reference_cost
from .common.device import reproducible, resolve_device
from .common.margins import input_box, max_margins
from .common.schedule import (
    MMAC_KNOBS,
    SEARCH_KNOBS,
    Schedule,
    after_stamp,
    finetune_work,
    fit_schedule,
    mmac_work,
    mmom_work,
    stamp_work,
    with_rows,
)
from .common.search import fit_bounds, initial_bounds
from .mmac.config import MmacConfig
from .mmac.finetune import unlearn_weights
from .mmac.unlearn import find_stamp, scan_stamp, shift_stamp, unlearn_bounds
from .mmom.config import MmomConfig
from .mmom.refit import find_classifier, refit, write_classifier
from .mmom.search import LAMBDA_GRID, fit_mmom

METHODS = ("mmac", "mmac-ft", "mmom", "mmom-refit")


@dataclass
class HardenReport:
    """What `harden` did, with the settings and hashes that reproduce it (JSON via `to_json`)."""

    method: str
    settings: dict
    seed: int
    device: str
    model_sha256: str
    data_sha256: str
    model: str | None
    data: str | None
    sites: int
    stage: str  # "max-margin", "unlearn" (a stamp was found) or "mmom"
    stamp: dict | None
    lambda_: float
    clean_set_accuracy: float
    max_margins_before: list[float]
    max_margins_after: list[float]
    epochs: int
    seconds: float
    form: str
    site_forms: dict
    history: list[dict] = field(default_factory=list)
    cross_validation: list[dict] | None = None
    refit: dict | None = None
    finetune: dict | None = None  # mmac-ft: the weights' fine-tune (None: not run)
    schedule: dict | None = None  # the time limit, measured costs, and what shrank to fit it
    distributed: dict | None = None  # under torchrun: world size and the rows each rank ran
    mmexport_version: str = __version__
    torch: str = torch.__version__
    python: str = field(default_factory=platform.python_version)

    def to_json(self, *, history: bool = True) -> dict:
        out = asdict(self)
        out["lambda"] = out.pop("lambda_")
        if not history:
            out.pop("history")
        return out


@dataclass
class HardenResult:
    """The bounds found, the rewritten model and what was done."""

    bounds: Bounds
    model: onnx.ModelProto
    report: HardenReport


def method_config(method: str) -> MmacConfig | MmomConfig:
    """The default config of a method name (`mmom-refit` is MMOM with `refit=True`, `mmac-ft`
    MMAC with `finetune=True`)."""
    if method not in METHODS:
        raise ParameterError("method", f"{method!r}: expected one of {', '.join(METHODS)}")
    if method.startswith("mmac"):
        return MmacConfig(finetune=method == "mmac-ft")
    return MmomConfig(refit=method == "mmom-refit")


def resolve_config(config, method: str | None, overrides: dict) -> MmacConfig | MmomConfig:
    """The config a call asks for: its type picks the method, overrides replace fields."""
    if config is None:
        config = method_config(method or "mmac")
    elif not isinstance(config, (MmacConfig, MmomConfig)):
        raise ParameterError("config", f"expected an MmacConfig or MmomConfig, got {type(config).__name__}")
    elif method is not None and method_name(config) != method:
        raise ParameterError("method", f"{method!r} contradicts the config given ({type(config).__name__})")
    what = "MMAC" if isinstance(config, MmacConfig) else "MMOM"
    return with_overrides(config, overrides, what=what)


def method_name(config: MmacConfig | MmomConfig) -> str:
    if isinstance(config, MmacConfig):
        return "mmac-ft" if config.finetune else "mmac"
    return "mmom-refit" if config.refit else "mmom"


def harden(
    model,
    clean_set,
    config: MmacConfig | MmomConfig | None = None,
    *,
    method: str | None = None,
    form: str = "auto",
    input_range: tuple[float, float] | None = None,
    layout: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    input_name: str | None = None,
    output_name: str | None = None,
    progress: Callable[[dict], None] | None = None,
    **overrides,
) -> HardenResult:
    """Search bounds on the clean set and return the bounded ONNX model.

    `config`: `MmacConfig` (default; backdoors) or `MmomConfig` (imbalance, over-training);
    or name the method (`"mmac"`, `"mmac-ft"`, `"mmom"`, `"mmom-refit"`). Keyword `overrides` replace the
    config's fields (`seed=1, max_epochs=40`). MMAC first looks for a stamped trigger on the
    original model: where one class's stamp stands out, the bounds unlearn it, otherwise the
    max-margin search runs; `report.stage` says which ran. `mmac-ft` then fine-tunes the
    weights to unlearn a found stamp (`report.finetune`; no stamp, no fine-tune).

    `form`: how per-channel bounds are written: "auto" folds them into the weights where
    that is exact (a unit clip, clip(x, 0, 1), that onnxruntime fuses) and uses Min
    elsewhere; "min" always uses Min after the site.
    `model`: path, ModelProto or Model. `clean_set`: Dataset, (x, y), or a path (.npz or image folder).
    `input_range`: the input box (default: the per-channel range of the clean set, channels
    on the axis `layout` names: "nchw", "nhwc", or None to recognise it,
    `mmexport.core.conventions.input_layout`). `threads`: torch's and onnxruntime's thread
    count (default: the cores this process may use). `progress(row)` receives
    {"stage": name} as each stage starts, then that stage's rows. Where torch.distributed's
    default group is initialised (torchrun), every rank calls this alike and the ranks share
    the per-class searches (`common.ranks`); each gets the same result.
    """
    cfg = resolve_config(config, method, overrides)
    if form not in FORMS:
        raise ParameterError("form", f"{form!r}: expected one of {', '.join(FORMS)}")
    check_threads(threads)
    name = method_name(cfg)
    m = as_model(model, input_name=input_name, output_name=output_name)
    k = check_original(m)
    clean = as_dataset(clean_set, model=m)
    check_clean_set(clean, m, k)
    m = with_site_shapes(m, clean.x)
    lay = input_layout(m, layout)
    if name == "mmom-refit":
        find_classifier(m)  # fail before the search if there is no last layer to refit
    dev = resolve_device(device)

    timings: dict[str, float] = {}  # seconds per stage, for the report: where a run's time went
    clock = [time.perf_counter(), None, time.perf_counter()]  # stage start, stage, search start

    def stage(what: str | None) -> None:
        now = time.perf_counter()
        if clock[1] is not None:
            timings[clock[1]] = round(timings.get(clock[1], 0.0) + now - clock[0], 2)
        clock[:2] = [now, what]
        if progress is not None and what is not None:
            progress({"stage": what})

    with use_threads(threads), reproducible(dev):
        ranks.rows_run.clear()
        engine = Engine(m, device=dev, memory_format="auto")
        x = torch.from_numpy(clean.x).to(dev)
        y = torch.from_numpy(clean.y).to(dev)
        box = input_box(x, input_range, channel_axis=lay.channel_axis).to(dev)
        stage("planning")
        plan = schedule_search(engine, x, k, cfg, dev)
        cfg, chunk = plan.config, plan.chunk
        if progress is not None:
            progress({"schedule": plan.to_json()})

        cv = stamp = None
        stamp_took = scan_took = 0.0
        if isinstance(cfg, MmomConfig):
            stage("cross-validation")
            result, cv = fit_mmom(engine, x, y, box, k, cfg, progress=progress, chunk=chunk)
        else:
            if cfg.unlearn != "off":
                stage("stamp search")
                stamp = find_stamp(engine, x, y, box, k, cfg, chunk=chunk)
                stamp_took = time.perf_counter() - clock[0]  # how fast rows run now (the scan is apart)
                if progress is not None:
                    progress({"stamp": stamp.to_json()})
                asked = (not stamp.found and cfg.unlearn == "auto") or (stamp.found and cfg.shift == "always")
                if asked:
                    stage("scan")  # on its own limit, harden's where given: not taken from the stages' time
                    ask = shift_stamp if stamp.found else scan_stamp
                    stamp = ask(stamp, engine, x, y, box, k, cfg, chunk=chunk)
                    scan_took = time.perf_counter() - clock[0]
                    if progress is not None:
                        progress({"stamp": stamp.to_json()})
            found = stamp is not None and stamp.found
            if plan.time_limit > 0:  # the stage that runs, fitted to the time left
                now = time.perf_counter()
                left, took = plan.time_limit - (now - clock[2] - scan_took), stamp_took if stamp is not None else None
                if plan.cost.kind == "reference":  # the time left as counted, not as the clock says
                    left, took = plan.time_limit - stamp_work(plan.config, x.shape[0], k).seconds(plan.cost), None
                plan, again = ranks.broadcast(after_stamp(plan, "unlearn" if found else "search", x.shape[0], k,
                                                          left, took))
                cfg = plan.config
                if progress is not None and again.changed:
                    progress({"schedule": plan.to_json()})
            if found:
                stage("unlearning")
                result = unlearn_bounds(engine, x, y, stamp, cfg, progress=progress,
                                        channel_axis=box.channel_axis, chunk=chunk)
            else:
                stage("max-margin search")
                result = fit_bounds(engine, x, y, box, k, cfg, progress=progress, chunk=chunk)

        zb = {k_: torch.from_numpy(v).to(dev) for k_, v in result.bounds.items()}
        source, refit_table, finetune, tuned = m.proto, None, None, None
        if getattr(cfg, "finetune", False) and stamp is not None and stamp.found:
            stage("fine-tune")  # the hardened graph as written (bounds folded), its bounds kept
            written, forms = apply_bounds(m.proto, result.bounds, sites=m.sites, form=form, report=True)
            tuned = Engine(from_proto(written, input_name=m.input_name, output_name=m.output_name), device=dev)
            tuned_proto, finetune = unlearn_weights(tuned, written, x, y, stamp, None, cfg,
                                                    frozen=bound_tensors(written), progress=progress)

        # Fresh, equal-seeded estimates before and after: the search's own maximisers have
        # adapted to the clipped model, a new search is the fair comparison.
        stage("margin check")
        probe = dict(restarts=cfg.restarts, steps=cfg.probe_steps, seed=cfg.seed + 1,
                     clean_x=x, chunk=chunk)
        mm_before = max_margins(engine, box, k, **probe)
        if tuned is not None:
            engine, zb = tuned, None
        if name == "mmom-refit":
            w, b, refit_table = refit(engine, x, y, k, bounds=zb, seed=cfg.seed)
            source = write_classifier(m, w, b)
            engine = Engine(from_proto(source, input_name=m.input_name, output_name=m.output_name), device=dev,
                            memory_format="auto")
        mm_after = max_margins(engine, box, k, bounds=zb, **probe)
        stage(None)
        share = ranks.share()

    if tuned is None:
        hardened, forms = apply_bounds(source, result.bounds, sites=m.sites, form=form, report=True)
    else:
        hardened = tuned_proto
    settings = cfg.to_json() | {"input_range": list(input_range) if input_range else None,
                                "layout": lay.name}
    stage = "unlearn" if stamp is not None and stamp.found else "max-margin"
    report = HardenReport(
        method=name, settings=settings, seed=cfg.seed, device=str(dev),
        model_sha256=model_sha256(m), data_sha256=data_sha256(clean),
        model=str(m.path) if m.path else None, data=str(clean.path) if clean.path else None,
        sites=len(result.bounds), stage=stage, stamp=stamp.to_json() if stamp is not None else None,
        lambda_=result.lambda_, clean_set_accuracy=result.accuracy,
        max_margins_before=[float(v) for v in mm_before.cpu()],
        max_margins_after=[float(v) for v in mm_after.cpu()],
        epochs=result.epochs, seconds=result.seconds, form=form, site_forms=forms.to_json(),
        history=result.history, cross_validation=cv, refit=refit_table, finetune=finetune,
        schedule=plan.to_json() | {"stage_seconds": timings}, distributed=share,
    )
    result.bounds.meta = {"method": name, "seed": cfg.seed, "model_sha256": report.model_sha256,
                          "data_sha256": report.data_sha256}
    set_metadata(hardened, provenance(report, cfg))
    return HardenResult(bounds=result.bounds, model=hardened, report=report)


def plan(
    model,
    clean_set,
    config: MmacConfig | MmomConfig | None = None,
    *,
    method: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    input_name: str | None = None,
    output_name: str | None = None,
    **overrides,
) -> Schedule:
    """The schedule `harden` would run with these settings, and its predicted time, from a
    few measured passes (seconds, not minutes): what a user checks before a long run."""
    cfg = resolve_config(config, method, overrides)
    check_threads(threads)
    m = as_model(model, input_name=input_name, output_name=output_name)
    k = check_original(m)
    clean = as_dataset(clean_set, model=m)
    check_clean_set(clean, m, k)
    m = with_site_shapes(m, clean.x)
    dev = resolve_device(device)
    with use_threads(threads), reproducible(dev):
        engine = Engine(m, device=dev, memory_format="auto")
        return schedule_search(engine, torch.from_numpy(clean.x).to(dev), k, cfg, dev, timed_too=True)


def schedule_search(engine, x: torch.Tensor, k: int, cfg, dev: torch.device, *, timed_too: bool = False) -> Schedule:
    """The config as it will run: its work priced on this model (`common.schedule`), shrunk
    to `time_limit` where needed, and the rows per chunk that `max_memory` allows.
    `timed_too`: where the work was counted at reference rates, also price the schedule at
    costs timed here (`Schedule.measured_seconds`: what this machine, at its present load,
    will take; the schedule itself does not depend on it)."""
    z = initial_bounds(engine, x[: min(8, x.shape[0])], cfg.granularity)
    z = {name: v.requires_grad_(True) for name, v in z.items()}
    limit = cfg.time_limit
    if limit is None:  # auto: counted work at reference rates, the same schedule on any machine
        limit = auto_time_limit(sum(v.numel() for v in engine.constants().values()))
        cost = reference_cost(engine, x[: min(128, x.shape[0])], z)
    else:
        cost = measure(engine, x[: min(128, x.shape[0])], z)
    cost = cost.slower(1 / ranks.size())  # each rank runs its share of the rows
    chunk = chunk_rows(cost, memory_budget(cfg.max_memory, dev))
    n = x.shape[0]
    cfg = with_rows(cfg, n)
    if isinstance(cfg, MmomConfig):
        work = partial(mmom_work, n=n, k=k, fits=len(LAMBDA_GRID) * 2)
        plan_ = fit_schedule(cfg, SEARCH_KNOBS, work, cost, limit, chunk)
    else:
        work = partial(mmac_work, n=n, k=k)
        plan_ = fit_schedule(cfg, MMAC_KNOBS, work, cost, limit, chunk)
        if cfg.finetune:
            plan_ = replace(plan_, finetune_seconds=finetune_work(cfg, n, k).seconds(cost))
    if timed_too and cost.kind == "reference":
        here = measure(engine, x[: min(128, x.shape[0])], z).slower(1 / ranks.size())
        plan_ = replace(plan_, measured_seconds=work(plan_.config).seconds(here))
    return ranks.broadcast(plan_)  # rank 0's measurement decides: every rank runs the same schedule


def provenance(report: HardenReport, cfg) -> dict[str, str]:
    """The metadata_props a hardened model carries: how it was made, and from what."""
    return {
        "mmexport.version": __version__,
        "mmexport.method": report.method,
        "mmexport.stage": report.stage,
        "mmexport.settings": json.dumps(report.settings, sort_keys=True),
        "mmexport.seed": str(cfg.seed),
        "mmexport.source_sha256": report.model_sha256,
        "mmexport.data_sha256": report.data_sha256,
        "mmexport.lambda": repr(report.lambda_),
        "mmexport.clean_set_accuracy": repr(report.clean_set_accuracy),
        "mmexport.max_margins_before": json.dumps(report.max_margins_before),
        "mmexport.max_margins_after": json.dumps(report.max_margins_after),
        "mmexport.granularity": cfg.granularity,
    } | ({"mmexport.weights": "fine-tuned: " + json.dumps(report.finetune, sort_keys=True)}
         if report.finetune is not None else {})
