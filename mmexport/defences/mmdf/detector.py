"""`detect`: calibrate MMDF on the clean set and build its detect-and-fix model."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from ... import __version__
from ...core.bounds import Bounds, check_bounds_for_sites, load_bounds
from ...core.config import with_overrides
from ...core.conventions import input_layout, logits_of
from ...core.data import Dataset, as_dataset, check_for_model
from ...core.errors import MmexportError, ParameterError
from ...core.model import Model
from ...core.provenance import data_sha256, model_sha256, set_metadata
from ...core.threads import check_threads, using_threads
from ...graph.rewrite import count_bounded_sites
from ..common.checks import check_made_from, check_original, with_site_shapes
from ..common.stats import fold_ids
from ..mmac.config import MmacConfig
from .bounds import clean_max_bounds, fit_screen, shifted, site_maxima
from .config import MmdfConfig
from .features import fit_features, site_feature_arrays
from .graph import METHOD, SCORE, build_mmdf_graph, is_gated
from .null import ROUNDING, NullFit, fit_image_null, fit_null
from .serve import read_served, serve_unflagged


@dataclass
class DetectReport:
    """How the MMDF model was calibrated, and what it flags on D (JSON via `to_json`)."""

    model: str | None
    data: str | None
    model_sha256: str
    data_sha256: str
    bounds_source: str  # "clean-max", "mmac", "bounds", "bounds:<file>" or "hardened:<file>"
    sites: int
    seed: int
    alpha: float
    statistic: str
    threshold: float
    null: dict
    features: dict | None
    calibration: dict
    false_positive_rate_clean_set: float
    margin_gap_clean_set: dict
    harden: dict | None
    avoid: dict
    focus: dict
    # Where no focus class is set: the exceedance past which the margin test runs, and what it
    # leaves on D ({"threshold", "share", "margin_flags_kept"}), or why there is none.
    screen: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    gated: bool = False  # the tests run inside the gate (mmdf.gate)
    # The hardened model whose logits the unflagged inputs get ({"file", "method", "sha256"}),
    # or None: the original's (mmdf.serve).
    served: dict | None = None
    # The false-positive rate on new clean images the conformal thresholds hold (both tests
    # together): alpha, or more where D has too few images for it; None for other laws.
    false_positive_guarantee: float | None = None
    method: str = METHOD
    mmexport_version: str = __version__

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class DetectResult:
    """The MMDF model, its threshold on d, the bounds it holds and what was done."""

    model: onnx.ModelProto
    threshold: float
    report: DetectReport
    bounds: Bounds | None = None
    null: NullFit | None = None


def _bounds_from_hardened(hardened, m: Model, source_sha: str) -> tuple[Bounds, str]:
    """The bounds a hardened model holds (Min / Clip nodes, or fold metadata)."""
    from ...core.model import read_onnx
    from ...graph.rewrite import extract_bounds

    if isinstance(hardened, onnx.ModelProto):
        proto, where = hardened, "hardened model"
    else:
        proto, where = read_onnx(hardened), str(hardened)
    if not count_bounded_sites(proto)["total"]:
        raise MmexportError(f"{where}: holds no mmexport bounds (not a hardened model)")
    check_made_from(proto, source_sha, where)
    try:
        bounds = extract_bounds(proto)
    except MmexportError as exc:
        raise MmexportError(f"{where}: {exc}") from None
    return bounds, f"hardened:{where}"


def _scores(proto: onnx.ModelProto, x: np.ndarray, m: Model, provider: str,
            output: str = SCORE) -> np.ndarray:
    """One output of `proto` (default: the MMDF score) on x, run by onnxruntime, as float64."""
    from ...runtime.sessions import predict, session

    sess, _ = session(proto, provider=provider)
    return predict(sess, x, input_name=m.input_name, output_name=output).astype(np.float64)


def _probe(m: Model, bounds: Bounds) -> onnx.ModelProto:
    """The MMDF graph at threshold 0: its score output is d itself."""
    return build_mmdf_graph(m.proto, bounds, 0.0, output_name=m.output_name, sites=m.sites,
                            logits_name=logits_of(m).name)


def _cross_fitted_scores(m: Model, maxima: dict, x: np.ndarray, y: np.ndarray, copies: int,
                         folds: int, seed: int, provider: str) -> np.ndarray:
    """d of every calibration input under clean-max bounds fitted without its source image.

    Bounds fitted on D itself hold every D activation, so d on D would be 0 and say nothing
    about a new input; K-fold cross-fitting scores each image (and its shifts) with the
    bounds of the other folds, as a new clean input meets the bounds of all of D.
    """
    fold = np.tile(fold_ids(y, folds, seed), copies)
    d = np.empty(len(x), dtype=np.float64)
    shared = _ranks()  # under torchrun each rank scores its share of the folds
    scored = []
    for k in (shared.owned(folds, 1) if shared else range(folds)):
        rows = np.flatnonzero(fold == k)
        if len(rows) == 0:
            continue
        bounds = clean_max_bounds(maxima, np.flatnonzero(fold != k))
        scored.append((rows, _scores(_probe(m, bounds), x[rows], m, provider)))
    for rows, v in shared.gather_objects(scored) if shared else scored:
        d[rows] = v
    return d


def _ranks():
    """`common.ranks` where this process is one rank of a torch.distributed group, else None
    (without importing torch: a group needs torch imported already)."""
    import sys

    if "torch" not in sys.modules:
        return None
    from ..common import ranks

    return ranks if ranks.active() else None


def _class_to_avoid(avoid, m: Model, clean: Dataset, seed: int, device: str, progress,
                    layout: str | None = None) -> dict:
    """{"class": the class flagged inputs must not go to or None, "source", "scan": its report}.

    Where the scan cannot run (fewer than 3 classes, a class missing from D) no class is
    avoided and the report says why: the rule is an addition to MMDF, not a precondition.
    """
    if avoid != "scan":
        return {"class": avoid, "source": None if avoid is None else "given", "scan": None}
    from ..mmbd.scan import scan

    steps = None
    if progress is not None:
        progress({"stage": "scan (MM-BD: which class would a backdoor target?)", "n": len(clean)})

        def steps(step: str, done: int, total: int) -> None:
            progress({"step": step, "done": done, "total": total})
    try:
        res = scan(m, clean, seed=seed, layout=layout, device=device, progress=steps)
    except MmexportError as exc:
        return {"class": None, "source": "scan", "scan": {"skipped": str(exc)}}
    report = {"verdict": res.verdict, "target_class": res.target_class, "p_value": res.p_value,
              "statistic": res.statistic, "alpha": res.alpha}
    target = res.target_class if res.verdict == "backdoor" else None
    return {"class": target, "source": "scan", "scan": report}


def focus_plan(target: int | None, predicted: np.ndarray | None, alpha: float) -> dict:
    """Which inputs can be flagged and at what level: {"class", "n", "share", "alpha", "reason"}.

    A trigger that works makes the model predict its target, so when the target is known
    only inputs sent to it need testing: the calibration keeps D's inputs predicted as the
    target (share p of D), tested at alpha / p, so that P(flagged) = p * alpha / p = alpha
    over all clean inputs (for the "exponential-tail" and "gaussian" laws; the conformal one
    ranks all of D's images, `fit_image_null`). Too few such inputs (< 10) and every input is
    tested.
    """
    if target is None:
        return {"class": None, "reason": "no suspected target"}
    on = predicted == target
    n = int(on.sum())
    if n < 10:
        return {"class": None, "reason": f"{n} calibration inputs predicted as class {target}, "
                                         "need at least 10"}
    share = n / len(predicted)
    return {"class": int(target), "n": n, "share": share, "alpha": min(alpha / share, 0.25)}


def detect(
    model,
    clean_set,
    config: MmdfConfig | None = None,
    *,
    bounds=None,
    hardened=None,
    serve=None,
    input_name: str | None = None,
    output_name: str | None = None,
    layout: str | None = None,
    device: str = "auto",
    provider: str = "auto",
    threads: int | None = None,
    progress: Callable[[dict], None] | None = None,
    **overrides,
) -> DetectResult:
    """Build the MMDF model of `model`, its threshold calibrated on `clean_set`.

    `model`: path, ModelProto or Model. `clean_set`: Dataset, (x, y), or a path (.npz or image folder).
    `config` (`MmdfConfig`) holds the method's settings; keyword `overrides` replace its
    fields, and where the bounds method is "mmac" also MMAC's (`max_epochs=40`).
    Bounds come from `bounds` (Bounds or a .bounds.json path), from `hardened` (a model
    mmexport hardened from this one), or are computed on the clean set by `method`:
    "clean-max" (default: each channel's clean range endpoint, `clean_max_bounds`, with the
    null cross-fitted over `folds` folds) or "mmac" (`mmexport.harden(..., seed=seed)`
    with `search`). `augment` adds the 1-pixel shifts of image inputs to D. The threshold is
    the 1 - `alpha` quantile of `law` (`fit_null`) over d on D; d is computed by onnxruntime
    (`provider`) on the built graph itself, so the model reproduces the calibrated scores.
    `statistic` "margin+features" (default) adds the feature test (`mmexport.features`,
    fitted and cross-fitted on the same inputs and folds) and splits alpha between the two
    tests; "margin" is the paper's test alone.
    `avoid`: a class that a flagged input is never sent to. "scan" (default): the target of
    the MM-BD scan on the clean set (`mmexport.scan`, same seed and device) when its verdict
    is backdoor, else none; an int: that class; None: none. Without it, a triggered input
    that the backdoor did not win over is flagged, its (true) class suppressed, and the
    bounded model's best other class is often the target.
    `focus` (default): where a class is avoided, only inputs the original model assigns to
    it can be flagged, and the thresholds are set on D's inputs assigned to it at the level
    that keeps the false-positive rate over all clean inputs at `alpha` (`focus_plan`).
    `layout`: the input's channel axis for the shifts and the scan's box ("nchw", "nhwc",
    None: recognised, `mmexport.core.conventions.input_layout`); `threads`: torch's and
    onnxruntime's thread count (default: the cores this process may use). For a model that
    outputs probabilities (a final Softmax), d is taken on the logits behind them and the
    graph switches the logits, before the Softmax.
    `serve`: a model mmexport hardened from this one (path or ModelProto, e.g. `harden`'s
    mmac-ft output): the inputs MMDF does not flag get its output instead of the original's
    (`mmdf.serve`); the tests and their calibration are the same.
    """
    check_threads(threads)
    with using_threads(threads):
        return _detect(model, clean_set, config, bounds=bounds, hardened=hardened, serve=serve, input_name=input_name,
                       output_name=output_name, layout=layout, device=device, provider=provider,
                       progress=progress, overrides=overrides)


def _detect(model, clean_set, config, *, bounds, hardened, serve, input_name, output_name, layout, device,
            provider, progress, overrides) -> DetectResult:
    from ...core.model import as_model

    cfg = resolve_config(config, overrides)
    if bounds is not None and hardened is not None:
        raise ParameterError("bounds", "give bounds or a hardened model, not both")
    given = bounds is not None or hardened is not None
    if cfg.search is not None and given:
        raise ParameterError("search", "MMAC settings apply where MMDF searches the bounds, not to bounds given")
    statistic, alpha, folds, seed, avoid = cfg.statistic, cfg.alpha, cfg.folds, cfg.seed, cfg.avoid
    m = as_model(model, input_name=input_name, output_name=output_name)
    k = check_original(m, hardened_hint=" and pass the hardened one as `hardened` (its bounds) or `serve` (its output "
                                         "for the inputs MMDF does not flag)")
    if isinstance(avoid, int) and not 0 <= avoid < k:
        raise ParameterError("avoid", f"{avoid}: not one of the model's {k} classes (0..{k - 1})")
    clean = as_dataset(clean_set, model=m)
    check_for_model(clean, m.input_shape, k)
    m = with_site_shapes(m, clean.x)
    if len(clean) < max(folds, 10):
        raise MmexportError(
            f"{clean.path or 'clean set'}: {len(clean)} samples; MMDF needs at least "
            f"{max(folds, 10)} to calibrate its threshold"
        )
    source_sha = model_sha256(m)
    served, served_info = read_served(serve, m.proto, output_name=m.output_name, source_sha=source_sha)
    axis = input_layout(m, layout).channel_axis
    x = shifted(clean.x, axis) if cfg.augment else clean.x
    bounds, source, harden_report, maxima = _resolve_bounds(
        m, clean, x, cfg, bounds, hardened, source_sha, layout=layout, device=device, provider=provider,
        progress=progress)
    avoid_report = _class_to_avoid(avoid, m, clean, seed, device, progress, layout)
    avoided = avoid_report["class"]
    cal = _calibrate(m, clean, x, k, cfg, bounds, maxima, avoided, provider=provider, progress=progress)
    logits_name = logits_of(m).name
    out = build_mmdf_graph(m.proto, bounds, cal.null.threshold, output_name=m.output_name,
                           sites=m.sites, features=cal.features,
                           feature_threshold=cal.feature_null.threshold if cal.feature_null else None,
                           avoid=avoided, focus=cal.plan["class"], logits_name=logits_name,
                           gate=cfg.gate, screen=cal.screen.get("threshold"), own_weights=cfg.own_weights)
    if served is not None:
        out = serve_unflagged(out, served, m.output_name, logits=logits_name == m.output_name)
    d = cal.d
    report = DetectReport(
        model=str(m.path) if m.path else None, data=str(clean.path) if clean.path else None,
        model_sha256=source_sha, data_sha256=data_sha256(clean), bounds_source=source,
        sites=len(bounds), seed=seed, alpha=alpha, statistic=statistic, threshold=cal.null.threshold,
        null=cal.null.to_json(),
        features=None if cal.features is None else {
            "threshold": cal.feature_null.threshold,
            "null": cal.feature_null.to_json(),
            "sites": [g.to_json() for g in cal.features.sites],
        },
        calibration=cal.summary,
        false_positive_rate_clean_set=float(np.mean(cal.flagged)),
        margin_gap_clean_set={
            "mean": float(d.mean()), "std": float(d.std()), "max": float(d.max()),
            "zero_fraction": float(np.mean(np.abs(d) <= 1e-6)),
            "quantiles": {str(q): float(np.quantile(d, q)) for q in (0.5, 0.9, 0.99)},
        },
        harden=harden_report, avoid=avoid_report, focus=cal.plan, screen=cal.screen,
        settings={k_: v for k_, v in cfg.to_json().items() if k_ != "search"}, gated=is_gated(out),
        false_positive_guarantee=_guarantee(cal), served=served_info,
    )
    set_metadata(out, _provenance(report, cal, m.output_name, report.gated))
    return DetectResult(model=out, threshold=cal.null.threshold, report=report, bounds=bounds,
                        null=cal.null)


def _resolve_bounds(m: Model, clean: Dataset, x: np.ndarray, cfg: MmdfConfig, bounds, hardened,
                    source_sha: str, *, layout: str | None, device: str, provider: str, progress):
    """(bounds, their source, MMAC's report or None, clean maxima when cross-fitting else None)."""
    harden_report = maxima = None
    if isinstance(bounds, Bounds):
        source = "bounds"
    elif bounds is not None:
        source, bounds = f"bounds:{bounds}", load_bounds(bounds)
    elif hardened is not None:
        bounds, source = _bounds_from_hardened(hardened, m, source_sha)
    elif cfg.method == "mmac":
        from ..harden import harden

        res = harden(m, clean, cfg.search or MmacConfig(), seed=cfg.seed, layout=layout, device=device,
                     progress=progress)
        bounds, source = res.bounds, "mmac"
        harden_report = res.report.to_json(history=False)
    else:
        if progress is not None:
            progress({"stage": "clean range", "n": len(x)})
        maxima = site_maxima(m.proto, m.sites, x, input_name=m.input_name, provider=provider)
        bounds, source = clean_max_bounds(maxima), "clean-max"
    where = source.split(":", 1)[1] if ":" in source else "bounds"
    try:
        check_bounds_for_sites(bounds, m.sites, where=where)
    except MmexportError as exc:
        raise MmexportError(f"{exc} ({m.path or 'model'})") from None
    return bounds, source, harden_report, maxima


@dataclass
class Calibration:
    """The clean scores and the null laws fitted to them; `flagged`: D's inputs the model flags."""

    d: np.ndarray
    null: NullFit
    features: object | None
    feature_null: NullFit | None
    plan: dict
    flagged: np.ndarray
    summary: dict
    screen: dict


def _calibrate(m: Model, clean: Dataset, x: np.ndarray, k: int, cfg: MmdfConfig, bounds: Bounds, maxima,
               avoided, *, provider: str, progress) -> Calibration:
    """Score D (and its shifts) under the bounds, fit the feature test, set both thresholds."""
    copies = len(x) // len(clean)
    cross_fit = maxima is not None
    if progress is not None:
        progress({"stage": "calibration", "n": len(x)})
    if cross_fit:
        d = _cross_fitted_scores(m, maxima, x, clean.y, copies, cfg.folds, cfg.seed, provider)
    else:
        d = _scores(_probe(m, bounds), x, m, provider)
    use_features = cfg.statistic == "margin+features"
    features = predicted = None
    target = avoided if cfg.focus else None
    if use_features:
        if progress is not None:
            progress({"stage": "features", "n": len(x)})
        # The same inputs as the margin test (D and, with `augment`, its shifts): fitted
        # without them, the Gaussians flag up to 28% of shifted clean test images.
        feats, logits = site_feature_arrays(m.proto, m.sites, x, input_name=m.input_name,
                                            output_name=m.output_name, provider=provider)
        predicted = logits.argmax(axis=1)
        features = fit_features(feats, np.tile(clean.y, copies), predicted, k,
                                np.tile(fold_ids(clean.y, cfg.folds, cfg.seed), copies))
    elif target is not None:
        predicted = _scores(m.proto, x, m, provider, m.output_name).argmax(axis=1)
    alpha_each = cfg.alpha / 2 if use_features else cfg.alpha
    plan = focus_plan(target, predicted, alpha_each)
    tested = predicted == plan["class"] if plan["class"] is not None else np.ones(len(d), bool)
    floor = ROUNDING * max(1.0, float(np.abs(d).max()))
    if cfg.law == "conformal":
        # Ranked over D's images at alpha / 2 each: the focus needs no level of its own, an
        # image never sent to the focus class scores -inf (`fit_image_null`).
        null = fit_image_null(d, len(clean), tested, alpha_each, floor=floor)
        feature_null = (None if features is None else
                        fit_image_null(features.null, len(clean), tested, alpha_each))
        if plan["class"] is not None:
            plan = {**plan, "alpha": alpha_each}
    else:
        level = plan.get("alpha", alpha_each)
        null = fit_null(d[tested], level, law=cfg.law, floor=floor)
        feature_null = None if features is None else fit_null(features.null[tested], level, law=cfg.law)
    fold = np.tile(fold_ids(clean.y, cfg.folds, cfg.seed), copies)
    screen, passed = fit_screen(cfg.screen, fold, plan, maxima, d, null.threshold)
    flagged = d > null.threshold
    if passed is not None:
        flagged &= passed
    if feature_null is not None:
        flagged = flagged | (features.null > feature_null.threshold)
    flagged &= tested
    summary = {"n": len(d), "images": len(clean), "augment": copies > 1,
               "cross_fit_folds": cfg.folds if cross_fit else None,
               "feature_folds": cfg.folds if use_features else None}
    return Calibration(d, null, features, feature_null, plan, flagged, summary, screen)


def _guarantee(cal: Calibration) -> float | None:
    """What the image-ranked thresholds hold together (a union bound over the tests)."""
    fits = [f for f in (cal.null, cal.feature_null) if f is not None]
    if any(f.params.get("unit") != "image" for f in fits):
        return None
    return min(1.0, sum(f.params["guarantee"] for f in fits))


def _provenance(report: DetectReport, cal: Calibration, output_name: str, gated: bool) -> dict[str, str]:
    """The metadata_props an MMDF model carries: its thresholds, null and where its bounds came from."""
    avoided, guarantee = report.avoid["class"], report.false_positive_guarantee
    return {
        "mmexport.version": __version__,
        "mmexport.method": METHOD,
        "mmexport.mmdf.threshold": repr(cal.null.threshold),
        "mmexport.mmdf.statistic": report.statistic,
        "mmexport.mmdf.feature_threshold": repr(cal.feature_null.threshold) if cal.feature_null else "",
        "mmexport.mmdf.alpha": repr(report.alpha),
        "mmexport.mmdf.guarantee": "" if guarantee is None else repr(guarantee),
        "mmexport.mmdf.null": json.dumps(cal.null.to_json(), sort_keys=True),
        "mmexport.mmdf.calibration": json.dumps(cal.summary, sort_keys=True),
        "mmexport.mmdf.bounds_source": report.bounds_source,
        "mmexport.mmdf.avoid": "" if avoided is None else str(avoided),
        "mmexport.mmdf.focus": "" if cal.plan["class"] is None else str(cal.plan["class"]),
        "mmexport.mmdf.gated": str(gated).lower(),
        "mmexport.mmdf.screen": "" if "threshold" not in cal.screen else repr(cal.screen["threshold"]),
        "mmexport.mmdf.output": output_name,
        "mmexport.mmdf.served": "" if report.served is None else json.dumps(report.served, sort_keys=True),
        "mmexport.seed": str(report.seed),
        "mmexport.source_sha256": report.model_sha256,
        "mmexport.data_sha256": report.data_sha256,
    }


def resolve_config(config: MmdfConfig | None, overrides: dict) -> MmdfConfig:
    """The config a call asks for; overrides that are not MMDF's go to its MMAC search."""
    cfg = config or MmdfConfig()
    if not isinstance(cfg, MmdfConfig):
        raise ParameterError("config", f"expected an MmdfConfig, got {type(cfg).__name__}")
    own = {k: v for k, v in overrides.items() if k in MmdfConfig.__dataclass_fields__}
    rest = {k: v for k, v in overrides.items() if k not in own}
    cfg = with_overrides(cfg, own, what="MMDF")
    if rest:
        if cfg.method != "mmac":
            raise ParameterError(sorted(rest)[0], f"not a parameter of MMDF; MMAC's settings apply to method "
                                                  f"'mmac' only, not {cfg.method!r}")
        cfg = replace(cfg, search=with_overrides(cfg.search or MmacConfig(), rest, what="MMAC"))
    return cfg
