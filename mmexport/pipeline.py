"""The hardening pipeline: ONNX -> engine -> bound search -> rewritten ONNX with provenance."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import torch

from . import __version__
from .bounds import Bounds
from .data import Dataset, as_dataset, check_every_class, check_for_model
from .engine import Engine
from .errors import MmexportError
from .model import Model, from_proto, set_metadata, sha256_bytes
from .refit import find_classifier, refit, write_classifier
from .rewrite import apply_bounds, count_bounded_sites
from .runtime import as_model
from .search.bounds_search import REDUCTIONS, SearchConfig, fit_bounds
from .search.margins import input_box, max_margins
from .search.mmom import fit_mmom
from .search.unlearn import find_stamp, unlearn_bounds

METHODS = ("mmac", "mmom", "mmom-refit")
# MMOM fits at a fixed, cross-validated lambda: eleven short fits instead of one long one.
MMOM_EPOCHS = 60
# Non-malicious overfitting has no stamped trigger to find: MMOM keeps the universal
# perturbations alone (with the masked ones too, the rarest class of digits-cnn-imbalanced
# fell 7.8 -> 5.9% instead of rising to 13.7%; docs/experiments.md section 9).
MMOM_MAXIMISERS = "universal"


@dataclass
class HardenResult:
    """The bounds found, the rewritten model and a JSON-ready report."""

    bounds: Bounds
    model: onnx.ModelProto
    report: dict = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise MmexportError("--device cuda: no CUDA device is available to torch")
    if device not in ("cpu", "cuda"):
        raise MmexportError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return torch.device(device)


@contextmanager
def reproducible(dev: torch.device):
    """Same seed, same bounds on CUDA too (on the CPU they are already).

    cuDNN picks its fastest kernels, some of which sum in a run-dependent order; measured on
    the sample wide CNN and ResNet, two equal-seeded CUDA runs ended 4-5 apart in some bound.
    """
    if dev.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.deterministic, cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def model_sha256(model: Model) -> str:
    if model.path is not None and Path(model.path).exists():
        from .model import sha256_file

        return sha256_file(model.path)
    return sha256_bytes(model.proto.SerializeToString())


def data_sha256(data: Dataset) -> str:
    h = sha256_bytes(np.ascontiguousarray(data.x).tobytes() + np.ascontiguousarray(data.y).tobytes())
    return h


def prepare(model: Model, clean: Dataset) -> int:
    """Check that model and data fit together; returns the number of classes."""
    if not model.sites:
        where = model.path or "model"
        raise MmexportError(f"{where}: no ReLU sites to bound (no Relu or Clip(min=0) nodes)")
    k = model.num_classes
    if k is None:
        raise MmexportError(f"{model.path or 'model'}: output {model.output_name!r} has no static class dimension")
    check_for_model(clean, model.input_shape, k)
    check_every_class(clean, k)
    return k


def harden(
    model,
    clean_set,
    *,
    method: str = "mmac",
    granularity: str = "channel",
    form: str = "auto",
    input_range: tuple[float, float] | None = None,
    device: str = "auto",
    input_name: str | None = None,
    output_name: str | None = None,
    progress: Callable[[dict], None] | None = None,
    config: SearchConfig | None = None,
    **overrides,
) -> HardenResult:
    """Search bounds on the clean set and return the bounded ONNX model.

    MMAC first looks for a stamped trigger on the original model (`search.unlearn`): where one
    class's stamp stands out, the bounds unlearn it; otherwise the max-margin search runs.
    `unlearn="off"` always runs the latter; the report's `stage` says which ran.

    `form`: how per-channel bounds are written: "auto" folds them into the weights where
    that is exact (a unit clip, clip(x, 0, 1), that onnxruntime fuses) and uses Min
    elsewhere; "min" always uses Min after the site.
    `model`: path, ModelProto or Model. `clean_set`: .npz path, Dataset or (x, y).
    Keyword overrides (restarts, steps, max_epochs, acc_floor, seed, reduction, lambda0, ...)
    replace fields of the default SearchConfig.
    """
    if method not in METHODS:
        raise MmexportError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if granularity not in ("channel", "layer"):
        raise MmexportError(f"unknown granularity {granularity!r}; choose channel or layer")
    cfg = config or SearchConfig()
    unknown = set(overrides) - set(SearchConfig.__dataclass_fields__)
    if unknown:
        raise MmexportError(f"unknown search option(s): {', '.join(sorted(unknown))}")
    mmom = method in ("mmom", "mmom-refit")
    if mmom:
        if overrides.get("unlearn") == "auto":
            raise MmexportError("--unlearn auto applies to --method mmac only (MMOM has no trigger to unlearn)")
        overrides["unlearn"] = "off"  # recorded as it ran
        overrides.setdefault("max_epochs", MMOM_EPOCHS)
        if config is None:
            overrides.setdefault("maximisers", MMOM_MAXIMISERS)
    cfg = replace(cfg, method="mmom" if mmom else method, granularity=granularity, **overrides)
    if cfg.reduction not in REDUCTIONS:
        raise MmexportError(f"unknown reduction {cfg.reduction!r}; choose from {', '.join(REDUCTIONS)}")
    if not 0.0 < cfg.acc_floor <= 1.0:
        raise MmexportError(f"--acc-floor must be in (0, 1], got {cfg.acc_floor}")
    if cfg.unlearn not in ("auto", "off"):
        raise MmexportError(f"unknown unlearn setting {cfg.unlearn!r}; choose auto or off")

    m = as_model(model, input_name=input_name, output_name=output_name)
    if count_bounded_sites(m.proto)["total"]:
        raise MmexportError(
            f"{m.path or 'model'}: already hardened by mmexport (bounded sites found); harden the original"
        )
    clean = as_dataset(clean_set)
    k = prepare(m, clean)
    if method == "mmom-refit":
        find_classifier(m)  # fail before the search if there is no last layer to refit
    dev = resolve_device(device)
    with reproducible(dev):
        engine = Engine(m, device=dev)
        x = torch.from_numpy(clean.x).to(dev)
        y = torch.from_numpy(clean.y).to(dev)
        box = input_box(x, input_range).to(dev)

        cv = stamp = None
        if mmom:
            result, cv = fit_mmom(engine, x, y, box, k, cfg, progress=progress)
        else:
            if cfg.unlearn == "auto":
                stamp = find_stamp(engine, x, y, box, k, cfg)
                if progress is not None:
                    progress({"stamp": stamp.to_json()})
            if stamp is not None and stamp.found:
                result = unlearn_bounds(engine, x, y, stamp, cfg, progress=progress)
            else:
                result = fit_bounds(engine, x, y, box, k, cfg, progress=progress)

        # Fresh, equal-seeded estimates before and after: the search's own maximisers have
        # adapted to the clipped model, a new search is the fair comparison.
        probe = dict(restarts=cfg.restarts, steps=max(cfg.warmup_steps, 100), seed=cfg.seed + 1, clean_x=x)
        zb = {k_: torch.from_numpy(v).to(dev) for k_, v in result.bounds.items()}
        mm_before = max_margins(engine, box, k, **probe)
        source, refit_table = m.proto, None
        if method == "mmom-refit":
            w, b, refit_table = refit(engine, x, y, k, bounds=zb, seed=cfg.seed)
            source = write_classifier(m, w, b)
            engine = Engine(from_proto(source, input_name=m.input_name, output_name=m.output_name), device=dev)
        mm_after = max_margins(engine, box, k, bounds=zb, **probe)

    hardened, forms = apply_bounds(source, result.bounds, sites=m.sites, form=form, report=True)
    settings = cfg.to_json() | {"input_range": list(input_range) if input_range else None}
    report = {
        "mmexport_version": __version__,
        "method": method,
        "settings": settings,
        "seed": cfg.seed,
        "device": str(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model_sha256": model_sha256(m),
        "data_sha256": data_sha256(clean),
        "model": str(m.path) if m.path else None,
        "data": str(clean.path) if clean.path else None,
        "sites": len(result.bounds),
        "stage": "unlearn" if stamp is not None and stamp.found else "max-margin",
        "stamp": stamp.to_json() if stamp is not None else None,
        "lambda": result.lambda_,
        "clean_set_accuracy": result.accuracy,
        "max_margins_before": [float(v) for v in mm_before.cpu()],
        "max_margins_after": [float(v) for v in mm_after.cpu()],
        "epochs": result.epochs,
        "seconds": result.seconds,
        "form": form,
        "site_forms": forms.to_json(),
        "history": result.history,
    }
    if cv is not None:
        report["cross_validation"] = cv
    if refit_table is not None:
        report["refit"] = refit_table
    result.bounds.meta = {k_: report[k_] for k_ in ("method", "seed", "model_sha256", "data_sha256")}
    set_metadata(
        hardened,
        {
            "mmexport.version": __version__,
            "mmexport.method": method,
            "mmexport.stage": report["stage"],
            "mmexport.settings": json.dumps(settings, sort_keys=True),
            "mmexport.seed": str(cfg.seed),
            "mmexport.source_sha256": report["model_sha256"],
            "mmexport.data_sha256": report["data_sha256"],
            "mmexport.lambda": repr(result.lambda_),
            "mmexport.clean_set_accuracy": repr(result.accuracy),
            "mmexport.max_margins_before": json.dumps(report["max_margins_before"]),
            "mmexport.max_margins_after": json.dumps(report["max_margins_after"]),
            "mmexport.granularity": granularity,
        },
    )
    return HardenResult(bounds=result.bounds, model=hardened, report=report)


def default_output(model_path: str | os.PathLike, method: str) -> Path:
    p = Path(model_path)
    return p.with_name(f"{p.stem}.{method}.onnx")
