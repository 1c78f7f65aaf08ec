"""onnxruntime sessions: providers (CUDA with a CPU fallback), batched inference, tensor taps.

Works from ONNX files or protos alone (no torch), so a hardened model is judged exactly
as it will be deployed.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ..core.errors import MmexportError, first_line
from ..core.model import Model
from ..core.threads import threads_in_use

PROVIDERS = ("auto", "cuda", "cpu")
_CUDA_EP = "CUDAExecutionProvider"
_CPU_EP = "CPUExecutionProvider"
# onnxruntime severities: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
_LOG_SEVERITY = 3

# Why CUDA cannot run in this process ("" = it can, None = not checked yet). Checked
# once: a failed CUDA attempt costs time and prints an error from inside onnxruntime.
_cuda_problem: str | None = None


NP_TYPES = {
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
        return first_line(exc)
    return ""


def _options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = _LOG_SEVERITY
    opts.intra_op_num_threads = threads_in_use()  # see mmexport.core.threads
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


def session(
    model: Model | onnx.ModelProto | str | os.PathLike, *, provider: str = "auto"
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
        return None, f"session creation on CUDA failed ({first_line(exc)})"
    if sess.get_providers()[0] != _CUDA_EP:
        return sess, "onnxruntime fell back to the CPU (no usable GPU?)"
    return sess, ""


def _cpu_session(src, where: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(src, _options(), providers=[_CPU_EP])
    except Exception as exc:
        raise MmexportError(
            f"{where}: onnxruntime cannot load the model ({first_line(exc)})"
        ) from None


def pick_io(kind: str, metas, wanted: str | None):
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
    out = pick_io("output", sess.get_outputs(), output_name)
    (y,) = run_batches(sess, x, [out.name], input_name=input_name, batch_size=batch_size)
    return y.astype(np.float32, copy=False)


SUMMARY_BYTES = 256 * 2**20  # of requested tensors per chunk in `tensor_summaries`


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
    run), in chunks of `batch_size` so only summaries of the whole of x are kept; smaller chunks
    where a chunk's tensors would pass SUMMARY_BYTES (a MobileNetV2's expanded channels at 32x32
    are ~4 MB a row: 256 rows took detect to 5 GB)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    listed = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in listed)
    sess, _ = session(probe, provider=provider)
    parts: dict[str, list] = {n: [] for n in names}
    if len(x) > 1:
        first = run_batches(sess, x[:1], names, input_name=input_name, batch_size=1)
        per_row = max(1, sum(a.nbytes for a in first))
        batch_size = max(1, min(batch_size, SUMMARY_BYTES // per_row))
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
    inp = pick_io("input", sess.get_inputs(), input_name)
    x = np.ascontiguousarray(x, dtype=NP_TYPES.get(inp.type, np.float32))
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
                f"inference failed on samples {start}..{start + real - 1} ({first_line(exc)})"
            ) from None
        for chunk, y in zip(chunks, ys, strict=True):
            chunk.append(np.asarray(y[:real]))
    return [np.concatenate(c) for c in chunks]


