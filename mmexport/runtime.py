"""Run ONNX models with onnxruntime: sessions, batched inference, metrics, latency.

Works from ONNX files or protos alone (no torch), so a hardened model is judged exactly
as it will be deployed.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .data import Dataset, as_dataset, check_for_model
from .errors import MmexportError
from .model import Model, from_proto, read_onnx

PROVIDERS = ("auto", "cuda", "cpu")
_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"
# onnxruntime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_LOG_SEVERITY = 3

# Why CUDA cannot run in this process ("" = it can, None = not checked yet). Checked
# once: a failed CUDA attempt costs time and prints an error from inside onnxruntime.
_cuda_problem: str | None = None

# The flag output of an MMDF model (mmexport.mmdf.DETECTED; that module needs graphsurgeon).
_MMDF_DETECTED = "mmdf_detected"

_NP_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


def cuda_problem() -> str:
    """Why onnxruntime's CUDA provider cannot run here, or "" when it can (as far as known)."""
    global _cuda_problem
    if _cuda_problem is None:
        _cuda_problem = _check_cuda_libraries()
    return _cuda_problem


def _check_cuda_libraries() -> str:
    if _CUDA_EP not in ort.get_available_providers():
        return "this onnxruntime build has no CUDAExecutionProvider (install onnxruntime-gpu)"
    # onnxruntime-gpu finds CUDA / cuDNN from pip's nvidia-* packages only once preloaded;
    # preload_dlls reports missing libraries with print(), which we keep off the console.
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            with contextlib.suppress(Exception):
                ort.preload_dlls()
    if not sys.platform.startswith("linux"):
        return ""
    # Load the provider library the way onnxruntime would (shared part global, RTLD_NOW):
    # a missing libcublas etc. shows here as one OSError instead of a logged failure.
    capi = Path(ort.__file__).parent / "capi"
    shared = capi / "libonnxruntime_providers_shared.so"
    cuda = capi / "libonnxruntime_providers_cuda.so"
    if not cuda.exists():
        return ""
    try:
        if shared.exists():
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(cuda))
    except OSError as exc:
        return _first_line(exc)
    return ""


def _options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = _LOG_SEVERITY
    return opts


def _source(model) -> tuple[bytes | str, str]:
    """What onnxruntime loads, and the name to put in error messages."""
    if isinstance(model, Model):
        model = model.path if model.path is not None else model.proto
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString(), "model"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise MmexportError(f"{path}: no such file")
        return str(path), str(path)
    raise TypeError(f"expected an onnx.ModelProto or a path, got {type(model).__name__}")


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def session(
    model: onnx.ModelProto | str | os.PathLike, *, provider: str = "auto"
) -> tuple[ort.InferenceSession, str]:
    """An onnxruntime session and the provider it really uses, "cuda" or "cpu".

    "auto" takes CUDA when it works and CPU otherwise; "cuda" fails with MmexportError
    rather than silently running on the CPU.
    """
    global _cuda_problem
    if provider not in PROVIDERS:
        raise MmexportError(f"provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    ort.set_default_logger_severity(_LOG_SEVERITY)
    src, where = _source(model)

    if provider != "cpu":
        problem = cuda_problem()
        if not problem:
            sess, problem = _try_cuda(src)
            if not problem:
                return sess, "cuda"
            cpu = sess or _cpu_session(src, where)  # raises if the model itself is at fault
            _cuda_problem = problem
            if provider == "auto":
                return cpu, "cpu"
        if provider == "cuda":
            raise MmexportError(f"CUDA provider requested but unavailable: {problem}")
    return _cpu_session(src, where), "cpu"


def _try_cuda(src) -> tuple[ort.InferenceSession | None, str]:
    """A session on CUDA and "", else whatever session there is and why CUDA is not in it."""
    try:
        sess = ort.InferenceSession(src, _options(), providers=[_CUDA_EP, _CPU_EP])
    except Exception as exc:
        return None, f"session creation on CUDA failed ({_first_line(exc)})"
    if sess.get_providers()[0] != _CUDA_EP:
        return sess, "onnxruntime fell back to the CPU (no usable GPU?)"
    return sess, ""


def _cpu_session(src, where: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(src, _options(), providers=[_CPU_EP])
    except Exception as exc:
        raise MmexportError(
            f"{where}: onnxruntime cannot load the model ({_first_line(exc)})"
        ) from None


def _pick(kind: str, metas, wanted: str | None):
    names = [m.name for m in metas]
    if wanted is None:
        return metas[0]
    if wanted not in names:
        raise MmexportError(f"no model {kind} named {wanted!r} (has: {', '.join(names)})")
    return metas[names.index(wanted)]


def predict(
    sess: ort.InferenceSession,
    x: np.ndarray,
    *,
    input_name: str | None = None,
    output_name: str | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """Run `x` (N, ...) through the model in batches; the chosen output as float32 (N, ...).

    A model exported with a fixed batch size runs at that size, the last batch padded.
    """
    out = _pick("output", sess.get_outputs(), output_name)
    (y,) = run_batches(sess, x, [out.name], input_name=input_name, batch_size=batch_size)
    return y.astype(np.float32, copy=False)


def tensor_summaries(
    proto: onnx.ModelProto,
    names: list[str],
    x: np.ndarray,
    summarise: Callable[[str, np.ndarray], np.ndarray],
    *,
    input_name: str | None = None,
    provider: str = "cpu",
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """{name: summarise(name, tensor) over x}, any tensors of the graph (made outputs for the
    run), in chunks of `batch_size` so only summaries of the whole of x are kept."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    listed = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in listed)
    sess, _ = session(probe, provider=provider)
    parts: dict[str, list] = {n: [] for n in names}
    for start in range(0, len(x), batch_size):
        outs = run_batches(sess, x[start : start + batch_size], names, input_name=input_name,
                           batch_size=batch_size)
        for n, a in zip(names, outs, strict=True):
            parts[n].append(summarise(n, a))
    return {n: np.concatenate(v).astype(np.float64) for n, v in parts.items()}


def run_batches(
    sess: ort.InferenceSession,
    x: np.ndarray,
    output_names: list[str],
    *,
    input_name: str | None = None,
    batch_size: int = 256,
) -> list[np.ndarray]:
    """Several outputs of one batched pass over `x`, each (N, ...) in its own dtype."""
    if batch_size < 1:
        raise MmexportError(f"batch size {batch_size}: must be >= 1")
    inp = _pick("input", sess.get_inputs(), input_name)
    x = np.ascontiguousarray(x, dtype=_NP_TYPES.get(inp.type, np.float32))
    n = len(x)
    if n == 0:
        raise MmexportError("no samples to run")
    fixed = (
        inp.shape[0] if inp.shape and isinstance(inp.shape[0], int) and inp.shape[0] > 0 else None
    )
    step = fixed or batch_size
    chunks = [[] for _ in output_names]
    for start in range(0, n, step):
        batch = x[start : start + step]
        real = len(batch)
        if fixed and real < fixed:
            batch = np.concatenate([batch, np.repeat(batch[-1:], fixed - real, axis=0)])
        try:
            ys = sess.run(list(output_names), {inp.name: batch})
        except Exception as exc:
            raise MmexportError(
                f"inference failed on samples {start}..{start + real - 1} ({_first_line(exc)})"
            ) from None
        for chunk, y in zip(chunks, ys, strict=True):
            chunk.append(np.asarray(y[:real]))
    return [np.concatenate(c) for c in chunks]


@dataclass
class ValidationReport:
    """Clean accuracy and, with an attack set, attack success rate and robust accuracy.

    Rates are fractions in [0, 1]; `images_per_s` counts every image run (clean + attack)
    over the wall time of inference, batching included.
    """

    n: int
    accuracy: float
    balanced_accuracy: float
    per_class_accuracy: list[float | None]
    num_classes: int
    asr: float | None = None
    ra: float | None = None
    n_attack: int | None = None
    images_per_s: float = 0.0
    provider: str = "cpu"
    detection_rate: float | None = None
    false_positive_rate: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> ValidationReport:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})


def classification_metrics(pred: np.ndarray, y: np.ndarray, num_classes: int):
    """(accuracy, balanced accuracy, per-class recall with None for absent classes)."""
    pred, y = np.asarray(pred), np.asarray(y)
    per_class: list[float | None] = []
    for c in range(num_classes):
        mask = y == c
        per_class.append(float((pred[mask] == c).mean()) if mask.any() else None)
    present = [a for a in per_class if a is not None]
    balanced = float(np.mean(present)) if present else float("nan")
    return float((pred == y).mean()), balanced, per_class


def attack_metrics(pred: np.ndarray, target: np.ndarray, y_true: np.ndarray):
    """(ASR, RA, n) over the attack samples whose true class is not the target.

    ASR: fraction sent to the target; RA: fraction still given their true class.
    """
    pred, target, y_true = np.asarray(pred), np.asarray(target), np.asarray(y_true)
    mask = y_true != target
    n = int(mask.sum())
    if n == 0:
        return None, None, 0
    return float((pred[mask] == target[mask]).mean()), float((pred[mask] == y_true[mask]).mean()), n


def detection_metric(flagged: np.ndarray, target: np.ndarray, y_true: np.ndarray) -> float | None:
    """Fraction of the attack samples whose true class is not the target that were flagged."""
    mask = np.asarray(y_true) != np.asarray(target)
    return float(np.asarray(flagged, bool)[mask].mean()) if mask.any() else None


def as_model(model, *, input_name: str | None = None, output_name: str | None = None) -> Model:
    """A Model from a path, a ModelProto or a Model; an MMDF model's logits output is found
    without being named."""
    if isinstance(model, Model):
        if input_name is None and output_name is None:
            return model
        return from_proto(
            model.proto, input_name=input_name, output_name=output_name, path=model.path
        )
    path = None
    if not isinstance(model, onnx.ModelProto):
        path, model = model, read_onnx(model)
    if output_name is None:
        output_name = _mmdf_logits(model)
    return from_proto(model, input_name=input_name, output_name=output_name, path=path)


def _mmdf_logits(proto: onnx.ModelProto) -> str | None:
    """The logits output of an MMDF model (beside its flag and score outputs), else None."""
    names = [o.name for o in proto.graph.output]
    if _MMDF_DETECTED not in names:
        return None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("mmexport.mmdf.output") in names:
        return meta["mmexport.mmdf.output"]
    rest = [n for n in names if n not in (_MMDF_DETECTED, "mmdf_score", "mmdf_feature_score")]
    return rest[0] if len(rest) == 1 else None


def _check_data(data: Dataset, m: Model, num_classes: int | None, name: str) -> None:
    try:
        check_for_model(data, m.input_shape, num_classes, name=name)
    except MmexportError as exc:
        if m.path is None:
            raise
        raise MmexportError(f"{exc} (model {m.path})") from None


def validate(
    model,
    data: Dataset,
    *,
    attack: Dataset | None = None,
    provider: str = "auto",
    batch_size: int = 256,
    input_name: str | None = None,
    output_name: str | None = None,
) -> ValidationReport:
    """Accuracy on `data` and, given an attack set (with `y_true`), ASR and RA.

    `model` is an ONNX path, an onnx.ModelProto or a mmexport Model; `data` and `attack` are
    Datasets, .npz paths or (x, y) pairs. For an MMDF model (an
    `mmdf_detected` output) also the false-positive rate (flagged samples of `data`) and the
    detection rate (flagged attack samples whose true class is not the target).
    """
    m = as_model(model, input_name=input_name, output_name=output_name)
    where = str(m.path) if m.path is not None else "model"
    data = as_dataset(data)
    attack = None if attack is None else as_dataset(attack, attack=True)
    _check_data(data, m, m.num_classes, "clean set")
    if attack is not None:
        if attack.y_true is None:
            name = attack.path or "attack set"
            raise MmexportError(f"{name}: an attack set needs key 'y_true' (the true labels)")
        _check_data(attack, m, m.num_classes, "attack set")

    sess, used = session(m.path if m.path is not None else m.proto, provider=provider)
    # An MMDF model (mmexport detect) also says which inputs it flagged.
    names = [m.output_name] + [o.name for o in sess.get_outputs() if o.name == _MMDF_DETECTED]
    kw = dict(input_name=m.input_name, batch_size=batch_size)
    start = time.perf_counter()
    logits, *flags = run_batches(sess, data.x, names, **kw)
    attack_logits, *attack_flags = (
        run_batches(sess, attack.x, names, **kw) if attack is not None else (None,)
    )
    elapsed = time.perf_counter() - start
    logits = logits.astype(np.float32, copy=False)
    n_run = len(data) + (len(attack) if attack is not None else 0)

    if logits.ndim != 2:
        raise MmexportError(
            f"{where}: output {m.output_name!r} has shape {logits.shape}, "
            "expected (N, classes) logits"
        )
    num_classes = m.num_classes or logits.shape[1]
    if m.num_classes is None:  # a free class dim: labels can only be checked now
        _check_data(data, m, num_classes, "clean set")
        if attack is not None:
            _check_data(attack, m, num_classes, "attack set")

    acc, balanced, per_class = classification_metrics(logits.argmax(1), data.y, num_classes)
    asr = ra = n_attack = None
    if attack is not None:
        asr, ra, n_attack = attack_metrics(attack_logits.argmax(1), attack.y, attack.y_true)
        if n_attack == 0:
            name = attack.path or "attack set"
            raise MmexportError(
                f"{name}: every sample's true label equals its target; no ASR to measure"
            )
    detection_rate = false_positive_rate = None
    if flags:
        false_positive_rate = float(np.asarray(flags[0], bool).mean())
        if attack is not None:
            detection_rate = detection_metric(attack_flags[0], attack.y, attack.y_true)
    return ValidationReport(
        n=len(data),
        accuracy=acc,
        balanced_accuracy=balanced,
        per_class_accuracy=per_class,
        num_classes=int(num_classes),
        asr=asr,
        ra=ra,
        n_attack=n_attack,
        images_per_s=n_run / elapsed if elapsed > 0 else float("inf"),
        provider=used,
        detection_rate=detection_rate,
        false_positive_rate=false_positive_rate,
    )


def _feed(sess: ort.InferenceSession, x: np.ndarray, input_name: str | None) -> dict:
    inp = _pick("input", sess.get_inputs(), input_name)
    return {inp.name: np.ascontiguousarray(x, dtype=_NP_TYPES.get(inp.type, np.float32))}


def _run_once(sess: ort.InferenceSession, feed: dict) -> float:
    """Milliseconds for one run (host to host: copies to and from a GPU included)."""
    start = time.perf_counter_ns()
    try:
        sess.run(None, feed)
    except Exception as exc:
        raise MmexportError(f"inference failed ({_first_line(exc)})") from None
    return (time.perf_counter_ns() - start) / 1e6


def _stats(times_ms: list[float], batch: int, provider: str) -> dict:
    t = np.asarray(times_ms)
    return {
        "median_ms": float(np.median(t)),
        "p95_ms": float(np.percentile(t, 95)),
        "mean_ms": float(t.mean()),
        "min_ms": float(t.min()),
        "runs": len(t),
        "batch": batch,
        "provider": provider,
    }


def _check_runs(runs: int, warmup: int) -> None:
    if runs < 1 or warmup < 0:
        raise MmexportError(f"runs {runs} / warmup {warmup}: need runs >= 1 and warmup >= 0")


def latency(
    model,
    x: np.ndarray,
    *,
    runs: int = 100,
    warmup: int = 10,
    provider: str = "auto",
    input_name: str | None = None,
) -> dict:
    """Time `runs` inferences of the batch `x` after `warmup` untimed ones."""
    _check_runs(runs, warmup)
    sess, used = session(model, provider=provider)
    feed = _feed(sess, x, input_name)
    for _ in range(warmup):
        _run_once(sess, feed)
    return _stats([_run_once(sess, feed) for _ in range(runs)], len(x), used)


def latency_pair(
    model_a,
    model_b,
    x: np.ndarray,
    *,
    runs: int = 100,
    warmup: int = 10,
    provider: str = "auto",
    input_name: str | None = None,
) -> tuple[dict, dict]:
    """Latency of two models measured interleaved, for a fair ratio.

    Runs alternate a, b / b, a so clock boosts, thermal drift and cache effects fall on
    both; both run on the provider the first one got.
    """
    _check_runs(runs, warmup)
    sess_a, used = session(model_a, provider=provider)
    sess_b, _ = session(model_b, provider=used)
    feed_a, feed_b = _feed(sess_a, x, input_name), _feed(sess_b, x, input_name)
    for _ in range(warmup):
        _run_once(sess_a, feed_a)
        _run_once(sess_b, feed_b)
    times_a, times_b = [], []
    for i in range(runs):
        if i % 2 == 0:
            times_a.append(_run_once(sess_a, feed_a))
            times_b.append(_run_once(sess_b, feed_b))
        else:
            times_b.append(_run_once(sess_b, feed_b))
            times_a.append(_run_once(sess_a, feed_a))
    return _stats(times_a, len(x), used), _stats(times_b, len(x), used)
