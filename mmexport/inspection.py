"""What a model is (inputs, outputs, sites) and whether our engine runs it as onnxruntime does."""

from __future__ import annotations

import numpy as np

from .core.conventions import fixed_batch, input_layout, logits_of
from .core.errors import MmexportError
from .core.model import Model, dims
from .core.sites import NO_SITES


def _shape(dims) -> list:
    return [d if isinstance(d, int) and d > 0 else (d or None) for d in dims]


def describe(model: Model, *, layout: str | None = None) -> dict:
    """A JSON-ready summary: names, shapes, opset/IR, classes, sites, unsupported ops, the
    input's layout, a fixed batch and the logits behind a probability output."""
    from .engine.executor import unsupported_ops

    g = model.proto.graph
    inits = {i.name for i in g.initializer}
    lay = input_layout(model, layout)
    logits = logits_of(model)
    return {
        "path": str(model.path) if model.path else None,
        "inputs": [{"name": vi.name, "shape": _shape(dims(vi))} for vi in g.input if vi.name not in inits],
        "outputs": [{"name": vi.name, "shape": _shape(dims(vi))} for vi in g.output],
        "input": model.input_name,
        "output": model.output_name,
        "opset": model.opset,
        "ir_version": model.ir_version,
        "producer": model.proto.producer_name or None,
        "num_classes": model.num_classes,
        "nodes": len(g.node),
        "sites": [{"name": s.name, "kind": s.kind, "node": s.node, "op": s.op, "input": s.input,
                   "channels": s.channels, "axis": s.axis} for s in model.sites],
        "unsupported_ops": [{"op": op, "node": node} for op, node in sorted(unsupported_ops(model.proto).items())],
        "fixed_batch": fixed_batch(model),
        "layout": {"name": lay.name, "channel_axis": lay.channel_axis, "reason": lay.reason},
        "logits": {"tensor": logits.name, "via": logits.via},
        **({} if model.sites else {"no_sites": NO_SITES}),
    }


def random_inputs(model: Model, n: int, input_range: tuple[float, float], seed: int) -> np.ndarray:
    dims = list(model.input_shape)
    if not dims:
        raise MmexportError(f"{model.path or 'model'}: input {model.input_name!r} has no known shape")
    free = [i for i, d in enumerate(dims[1:], 1) if not isinstance(d, int) or d <= 0]
    if free:
        raise MmexportError(
            f"{model.path or 'model'}: input {model.input_name!r} has free dimensions "
            f"{free}; only the batch dimension may be free"
        )
    lo, hi = input_range
    rng = np.random.default_rng(seed)
    return rng.uniform(lo, hi, size=(n, *dims[1:])).astype(np.float32)


def verify(
    model: Model,
    *,
    input_range: tuple[float, float] = (0.0, 1.0),
    n: int = 16,
    seed: int = 0,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    provider: str = "auto",
    threads: int | None = None,
) -> dict:
    """Engine vs onnxruntime on the same seeded inputs; per output max abs and rel difference.

    Passes when every element satisfies |a - b| <= atol + rtol * |b| (b = onnxruntime), on
    every graph output and, for a model that outputs probabilities, on the logits behind them
    too (a Softmax hides logits that differ by a constant, or saturates). A model with a fixed
    batch N runs in onnxruntime N at a time; `engine_batching` says how the engine ran the n
    inputs (`Engine.batching`).
    """
    import torch

    from .engine.executor import Engine
    from .engine.threads import use_threads
    from .runtime.sessions import run_batches, session

    if n < 1:
        raise MmexportError(f"verify: {n} samples, need at least 1")
    x = random_inputs(model, n, input_range, seed)
    logits = logits_of(model)
    proto = model.proto
    if logits.via is not None:
        proto = type(proto)()
        proto.CopyFrom(model.proto)
        proto.graph.output.append(type(proto.graph.output[0])(name=logits.name))
    with use_threads(threads):
        sess, used = session(proto, provider=provider)
        names = [o.name for o in sess.get_outputs()]
        ort_out = run_batches(sess, x, names, input_name=model.input_name, batch_size=n)
        engine = Engine(model)
        with torch.no_grad():
            outs, _ = engine.run(torch.from_numpy(x), outputs=names)
    per_output = []
    passed = True
    for name, ref in zip(names, ort_out, strict=True):
        got = outs[name].detach().cpu().numpy()
        ref = np.asarray(ref)
        if got.shape != ref.shape:
            per_output.append({"name": name, "error": f"shape {got.shape} vs {ref.shape}"})
            passed = False
            continue
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        abs_d = float(diff.max()) if diff.size else 0.0
        rel_d = float((diff / np.maximum(np.abs(ref), 1e-12)).max()) if diff.size else 0.0
        ok = bool(np.all(diff <= atol + rtol * np.abs(ref)))
        passed &= ok
        row = {"name": name, "max_abs_diff": abs_d, "max_rel_diff": rel_d, "passed": ok}
        if name == logits.name and logits.via is not None:
            row["logits_of"] = logits.output
        per_output.append(row)
    valid = [o for o in per_output if "error" not in o]
    return {
        "max_abs_diff": max((o["max_abs_diff"] for o in valid), default=float("nan")),
        "max_rel_diff": max((o["max_rel_diff"] for o in valid), default=float("nan")),
        "passed": passed,
        "provider": used,
        "samples": n,
        "input_range": list(input_range),
        "atol": atol,
        "rtol": rtol,
        "fixed_batch": engine.fixed_batch,
        "engine_batching": engine.batching,
        "outputs": per_output,
    }
