"""Latency under onnxruntime: one model, or two side by side in interleaved runs."""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from ..core.errors import MmexportError, first_line
from .sessions import NP_TYPES, pick_io, session


def _feed(sess: ort.InferenceSession, x: np.ndarray, input_name: str | None) -> dict:
    inp = pick_io("input", sess.get_inputs(), input_name)
    return {inp.name: np.ascontiguousarray(x, dtype=NP_TYPES.get(inp.type, np.float32))}


def _run_once(sess: ort.InferenceSession, feed: dict) -> float:
    """Milliseconds for one run (host to host: copies to and from a GPU included)."""
    start = time.perf_counter_ns()
    try:
        sess.run(None, feed)
    except Exception as exc:
        raise MmexportError(f"inference failed ({first_line(exc)})") from None
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
