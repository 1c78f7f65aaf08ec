"""Shared helpers for the engine tests: tiny ONNX models and their onnxruntime outputs.

Imported as `from conftest import ...` (tests/ is on sys.path under pytest).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# onnxruntime 1.31 loads IR <= 13 while onnx 1.23 writes IR 14: pin it.
IR_VERSION = 8


def make_onnx_model(
    nodes,
    x_shape,
    *,
    outputs=("y",),
    inits: dict[str, np.ndarray] | None = None,
    opset: int = 13,
    ir_version: int = IR_VERSION,
) -> onnx.ModelProto:
    """A graph with one float input `x` and untyped outputs (onnxruntime infers them)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
        [onnx.ValueInfoProto(name=name) for name in outputs],
        [numpy_helper.from_array(np.asarray(v), name) for name, v in (inits or {}).items()],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


def ort_run(proto: onnx.ModelProto, x: np.ndarray, extra: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Every graph output (and the `extra` intermediate tensors) under onnxruntime CPU, by name."""
    if extra:
        tapped = onnx.ModelProto()
        tapped.CopyFrom(proto)
        tapped.graph.output.extend(onnx.ValueInfoProto(name=name) for name in extra)
        proto = tapped
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds = {session.get_inputs()[0].name: x.astype(np.float32)}
    return dict(zip(names, session.run(names, feeds), strict=True))
