"""PRE vs POST side by side: same test data, same onnxruntime provider, a verdict per metric.

Everything but the max-margin search runs from the ONNX files under onnxruntime alone; the
search runs both graphs in mmexport's PyTorch engine (a hardened graph carries its bounds as
Min / Clip nodes, so it needs no bounds file) with the same seed, and imports torch lazily.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.conventions import fixed_batch
from ..core.data import Dataset, as_dataset
from ..core.errors import MmexportError
from ..core.model import Model, as_model
from ..core.threads import check_threads, using_threads
from ..graph.rewrite import count_bounded_sites
from ..runtime.latency import latency_pair
from ..runtime.metrics import validate
from ..runtime.sessions import predict, session

# A rate counts as changed when it moves by more than this (fractions): one test image in
# 200 is 0.005, below that the difference is noise of the test set, not of the model.
RATE_TOLERANCE = 0.005
# Max margins are search estimates: within 5% of each other they are the same.
MARGIN_TOLERANCE = 0.05
# Latency medians within 10% are the same: run-to-run drift on a shared machine is that large.
LATENCY_TOLERANCE = 0.10
SIZE_TOLERANCE = 0.01

BATCH_SIZES = (1, 64)


@dataclass
class Side:
    """One model's numbers: onnxruntime metrics, margins, latency, graph facts."""

    path: str | None
    size_bytes: int
    node_types: dict[str, int]
    bounded_sites: int
    validation: dict
    max_margins: list[float] | None = None
    latency: dict[str, dict] = field(default_factory=dict)


@dataclass
class CompareReport:
    """PRE and POST on the same data and provider, their differences and per-metric verdicts.

    Rates are fractions in [0, 1]; latencies in milliseconds; `latency_ratio[b]` is POST's
    median over PRE's at batch b; `node_type_diff` is POST minus PRE per op type (non-zero only).
    """

    pre: Side
    post: Side
    provider: str
    n: int
    agreement: float
    max_abs_logit_diff: float
    node_type_diff: dict[str, int]
    latency_ratio: dict[str, float]
    verdicts: dict[str, str]
    settings: dict
    margins_note: str | None = None
    latency_note: str | None = None  # where a fixed batch set the batch sizes timed

    def to_json(self) -> dict:
        return asdict(self)


def _side(m, types: Counter, rep, max_margins, latency) -> Side:
    return Side(
        path=str(m.path) if m.path else None,
        size_bytes=_size(m),
        node_types=dict(sorted(types.items())),
        bounded_sites=count_bounded_sites(m.proto)["total"],
        validation=rep.to_json(),
        max_margins=max_margins,
        latency=latency,
    )


def _size(m: Model) -> int:
    if m.path is not None and Path(m.path).is_file():
        return os.path.getsize(m.path)
    return m.proto.ByteSize()


def _check_pair(pre: Model, post: Model) -> None:
    where = f"{post.path or 'POST'}"
    if tuple(pre.input_shape[1:]) != tuple(post.input_shape[1:]):
        raise MmexportError(
            f"{where}: input shape {list(post.input_shape)} differs from PRE's "
            f"{list(pre.input_shape)}"
        )
    if pre.num_classes != post.num_classes:
        raise MmexportError(
            f"{where}: {post.num_classes} classes, PRE has {pre.num_classes}; "
            "not the same classifier"
        )


def verdict(
    pre: float | None,
    post: float | None,
    *,
    higher_is_better: bool,
    tolerance: float,
    relative: bool = False,
) -> str:
    """ "better", "same" or "worse" for POST against PRE; "n/a" when either is missing.

    `relative`: the tolerance is a fraction of PRE's value (latency, size, margins).
    """
    if pre is None or post is None or not np.isfinite(pre) or not np.isfinite(post):
        return "n/a"
    diff = post - pre
    tol = tolerance * abs(pre) if relative else tolerance
    if abs(diff) <= tol:
        return "same"
    return "better" if (diff > 0) == higher_is_better else "worse"


def _verdicts(pre: Side, post: Side, tol_rate: float) -> dict[str, str]:
    vp, vq = pre.validation, post.validation
    out = {
        "accuracy": verdict(
            vp["accuracy"], vq["accuracy"], higher_is_better=True, tolerance=tol_rate
        ),
        "balanced_accuracy": verdict(
            vp["balanced_accuracy"],
            vq["balanced_accuracy"],
            higher_is_better=True,
            tolerance=tol_rate,
        ),
        # The weakest class: a hardening that trades one class away shows here.
        "worst_class_accuracy": verdict(
            smallest(vp["per_class_accuracy"]),
            smallest(vq["per_class_accuracy"]),
            higher_is_better=True,
            tolerance=tol_rate,
        ),
    }
    if vp.get("asr") is not None:
        out["asr"] = verdict(vp["asr"], vq["asr"], higher_is_better=False, tolerance=tol_rate)
        out["ra"] = verdict(vp["ra"], vq["ra"], higher_is_better=True, tolerance=tol_rate)
    if pre.max_margins is not None and post.max_margins is not None:
        # The largest class max margin is the backdoor / overfitting statistic.
        out["max_margin"] = verdict(
            max(pre.max_margins),
            max(post.max_margins),
            higher_is_better=False,
            tolerance=MARGIN_TOLERANCE,
            relative=True,
        )
    for b in pre.latency:
        if b in post.latency:
            out[f"latency_b{b}"] = verdict(
                pre.latency[b]["median_ms"],
                post.latency[b]["median_ms"],
                higher_is_better=False,
                tolerance=LATENCY_TOLERANCE,
                relative=True,
            )
    out["size"] = verdict(
        pre.size_bytes,
        post.size_bytes,
        higher_is_better=False,
        tolerance=SIZE_TOLERANCE,
        relative=True,
    )
    return out


def smallest(values) -> float | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _batch(x: np.ndarray, b: int) -> np.ndarray:
    """b samples of x, repeated when x holds fewer."""
    reps = -(-b // len(x))
    return np.concatenate([x] * reps)[:b] if reps > 1 else x[:b]


def engine_max_margins(
    model: Model,
    box_x: np.ndarray,
    *,
    input_range=None,
    layout: str | None = None,
    restarts: int = 10,
    ascent_steps: int = 200,
    seed: int = 0,
    device: str = "cpu",
) -> list[float]:
    """Per-class max margins of a graph as it stands (bounds inside it), by the engine's search
    (on the logits behind a final Softmax)."""
    import torch

    from ..core.conventions import input_layout
    from ..defences.common.device import resolve_device
    from ..defences.common.margins import input_box, max_margins
    from ..engine.executor import Engine
    from ..engine.threads import use_threads

    dev = resolve_device(device)
    with use_threads(None):  # the count compare() holds
        engine = Engine(model, device=dev, memory_format="auto")
        x = torch.from_numpy(box_x).to(dev)
        box = input_box(x, input_range, channel_axis=input_layout(model, layout).channel_axis).to(dev)
        mm = max_margins(
            engine, box, model.num_classes, restarts=restarts, steps=ascent_steps, seed=seed, clean_x=x
        )
    return [float(v) for v in mm.cpu()]


def _latency_sizes(a: Model, b: Model, batch_sizes) -> tuple[tuple, str | None]:
    """The batch sizes to time, and a note where a fixed batch decided them."""
    fa, fb = fixed_batch(a), fixed_batch(b)
    if fa and fb and fa != fb:
        return (), (f"latency not timed: PRE's batch is fixed at {fa} and POST's at {fb}, so no "
                    "batch runs on both")
    fixed = fa or fb
    if fixed:
        return (fixed,), (f"the batch is fixed at {fixed} in the model: latency timed on batches of "
                          f"{fixed}, not at {' and '.join(map(str, batch_sizes))}")
    return tuple(batch_sizes), None


def compare(
    pre,
    post,
    data: Dataset,
    *,
    attack: Dataset | None = None,
    provider: str = "auto",
    seed: int = 0,
    restarts: int = 10,
    ascent_steps: int = 200,
    runs: int = 100,
    warmup: int = 10,
    batch_sizes=BATCH_SIZES,
    margins: bool = True,
    input_range: tuple[float, float] | None = None,
    layout: str | None = None,
    device: str = "auto",
    threads: int | None = None,
    input_name: str | None = None,
    output_name: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> CompareReport:
    """Compare an original model (PRE) with its hardened version (POST) on the same data.

    `pre`, `post`: ONNX paths, ModelProtos or Models with the same input and classes.
    `data`: the clean test set; `attack`: a triggered set with `y_true` (adds ASR and RA); each a
    Dataset or a path (.npz or image folder, see `load_data`).
    The max-margin search (`restarts` x `ascent_steps` per class, same `seed` for both; the box is
    `input_range` or the per-channel range of `data`) runs in the engine on `device`;
    `margins=False` skips it. Latency: `runs` timed inferences per model and batch size,
    interleaved PRE / POST; where a model's batch is fixed at N, on batches of N
    (`latency_note` says so). `layout`: the input's channel axis for the box ("nchw",
    "nhwc", None: recognised); `threads`: torch's and onnxruntime's thread count (default: the
    cores this process may use). `progress(stage, done, total)` is called as each stage starts.
    """
    check_threads(threads)
    with using_threads(threads):
        return _compare(pre, post, data, attack=attack, provider=provider, seed=seed, restarts=restarts,
                        ascent_steps=ascent_steps, runs=runs, warmup=warmup, batch_sizes=batch_sizes,
                        margins=margins, input_range=input_range, layout=layout, device=device,
                        input_name=input_name, output_name=output_name, progress=progress)


def _compare(pre, post, data, *, attack, provider, seed, restarts, ascent_steps, runs, warmup, batch_sizes,
             margins, input_range, layout, device, input_name, output_name, progress) -> CompareReport:
    a = as_model(pre, input_name=input_name, output_name=output_name)
    b = as_model(post, input_name=input_name, output_name=output_name)
    _check_pair(a, b)
    data = as_dataset(data, model=a)
    attack = None if attack is None else as_dataset(attack, attack=True, model=a)
    sizes, latency_note = _latency_sizes(a, b, batch_sizes)
    total = 2 + (2 if margins else 0) + len(sizes)
    done = 0

    def say(stage: str) -> None:
        nonlocal done
        if progress is not None:
            progress(stage, done, total)
        done += 1

    if attack is not None and attack.y_true is None:
        raise MmexportError(
            f"{attack.path or 'attack set'}: an attack set needs key 'y_true' (the true labels)"
        )

    say("accuracy")
    rep_a = validate(a, data, attack=attack, provider=provider)
    used = rep_a.provider
    rep_b = validate(b, data, attack=attack, provider=used)

    say("agreement")
    sess_a, _ = session(a, provider=used)
    sess_b, _ = session(b, provider=used)
    la = predict(sess_a, data.x, input_name=a.input_name, output_name=a.output_name)
    lb = predict(sess_b, data.x, input_name=b.input_name, output_name=b.output_name)
    agreement = float((la.argmax(1) == lb.argmax(1)).mean())
    max_abs = float(np.abs(la.astype(np.float64) - lb).max())

    mm_a = mm_b = None
    note = None
    if margins:
        say("max margins (PRE)")
        kw = dict(input_range=input_range, layout=layout, restarts=restarts, ascent_steps=ascent_steps,
                  seed=seed, device=device)
        try:
            mm_a = engine_max_margins(a, data.x, **kw)
            say("max margins (POST)")
            mm_b = engine_max_margins(b, data.x, **kw)
        except MmexportError as exc:  # an op the engine lacks: the onnxruntime numbers still stand
            mm_a = mm_b = None
            note = f"max margins skipped: {exc}"

    lat_a: dict[str, dict] = {}
    lat_b: dict[str, dict] = {}
    for bs in sizes:
        say(f"latency (batch {bs})")
        xb = _batch(data.x, bs)
        lat_a[str(bs)], lat_b[str(bs)] = latency_pair(
            a,
            b,
            xb,
            runs=runs,
            warmup=warmup,
            provider=used,
            input_name=a.input_name if a.input_name == b.input_name else None,
        )
    if progress is not None:
        progress("done", total, total)
    ratio = {
        k: lat_b[k]["median_ms"] / lat_a[k]["median_ms"] for k in lat_a if lat_a[k]["median_ms"] > 0
    }

    types_a = Counter(n.op_type for n in a.proto.graph.node)
    types_b = Counter(n.op_type for n in b.proto.graph.node)
    diff = {
        t: types_b[t] - types_a[t]
        for t in sorted(set(types_a) | set(types_b))
        if types_b[t] != types_a[t]
    }

    side_a = _side(a, types_a, rep_a, mm_a, lat_a)
    side_b = _side(b, types_b, rep_b, mm_b, lat_b)
    tol_rate = max(RATE_TOLERANCE, 1.0 / len(data))
    return CompareReport(
        pre=side_a,
        post=side_b,
        provider=used,
        n=len(data),
        agreement=agreement,
        max_abs_logit_diff=max_abs,
        node_type_diff=diff,
        latency_ratio=ratio,
        verdicts=_verdicts(side_a, side_b, tol_rate),
        settings={
            "seed": seed,
            "restarts": restarts,
            "ascent_steps": ascent_steps,
            "runs": runs,
            "warmup": warmup,
            "input_range": list(input_range) if input_range else None,
            "layout": layout,
            "margins": margins,
            "rate_tolerance": tol_rate,
        },
        margins_note=note,
        latency_note=latency_note,
    )


