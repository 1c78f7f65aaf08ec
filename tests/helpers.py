"""Tiny ONNX models built in code for the runtime and rewrite tests.

IR is pinned (onnx writes IR 14 by default; the onnxruntime we test with loads <= 13).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_MODERN = 8
IR_OLD = 3  # lists initializers among the graph inputs


def make_model(nodes, inputs, outputs, inits, *, opset=13, ir=IR_MODERN, **kw) -> onnx.ModelProto:
    """A checked model; at IR < 4 every initializer is also listed as a graph input."""
    if ir < 4:
        inputs = list(inputs) + [
            helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in inits
        ]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir, **kw
    )
    onnx.checker.check_model(model)
    return model


def _init(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _cap(name: str, caps: dict, shape) -> tuple[list, list, str]:
    """A hand-written `Min(name, cap)` for reference models: (nodes, inits, new name)."""
    if name not in caps:
        return [], [], name
    cap = np.asarray(caps[name], dtype=np.float32)
    if cap.ndim == 1:
        cap = cap.reshape(shape)
    out = f"ref_cap_{name}"
    node = helper.make_node("Min", [name, f"ref_z_{name}"], [out])
    return [node], [_init(f"ref_z_{name}", cap)], out


def conv_net(*, opset=13, ir=IR_MODERN, caps=None, seed=0, **kw) -> onnx.ModelProto:
    """x[N,2,6,6] -> Conv -> Relu r1 -> Conv -> Relu r2 -> GAP -> Flatten -> Gemm -> Relu r3
    -> Gemm -> logits[N,3].

    `caps` (site -> scalar or [C]) adds hand-written Min nodes after those ReLUs: the
    reference a rewrite is compared with.
    """
    caps = caps or {}
    rng = np.random.default_rng(seed)
    inits = [
        _init("W1", rng.normal(size=(4, 2, 3, 3))),
        _init("b1", rng.normal(size=4)),
        _init("W2", rng.normal(size=(3, 4, 3, 3)) / 2),
        _init("b2", rng.normal(size=3)),
        _init("W3", rng.normal(size=(5, 3))),
        _init("b3", rng.normal(size=5)),
        _init("W4", rng.normal(size=(3, 5))),
        _init("b4", rng.normal(size=3)),
    ]
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=pads),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
    ]
    n, i, r1 = _cap("r1", caps, (4, 1, 1))
    nodes += n
    inits += i
    nodes += [
        helper.make_node("Conv", [r1, "W2", "b2"], ["c2"], pads=pads),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
    ]
    n, i, r2 = _cap("r2", caps, (3, 1, 1))
    nodes += n
    inits += i
    nodes += [
        helper.make_node("GlobalAveragePool", [r2], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"]),
        helper.make_node("Gemm", ["flat", "W3", "b3"], ["fc1"], transB=1),
        helper.make_node("Relu", ["fc1"], ["r3"], name="relu3"),
    ]
    n, i, r3 = _cap("r3", caps, (5,))
    nodes += n
    inits += i
    nodes.append(helper.make_node("Gemm", [r3, "W4", "b4"], ["logits"], transB=1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    return make_model(nodes, [x], [y], inits, opset=opset, ir=ir, **kw)


def mlp(*, opset=13, ir=IR_MODERN, seed=1):
    """x[N,4] -> Gemm(W1, b1) -> Relu h -> Gemm(W2, b2) -> y[N,3]; returns (model, weights)."""
    rng = np.random.default_rng(seed)
    w = {
        "W1": rng.normal(size=(4, 6)).astype(np.float32),
        "b1": rng.normal(size=6).astype(np.float32),
        "W2": rng.normal(size=(6, 3)).astype(np.float32),
        "b2": rng.normal(size=3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W1", "b1"], ["a"]),
        helper.make_node("Relu", ["a"], ["h"]),
        helper.make_node("Gemm", ["h", "W2", "b2"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    inits = [_init(k, v) for k, v in w.items()]
    return make_model(nodes, [x], [y], inits, opset=opset, ir=ir), w


def relu6_net(*, opset=13, ir=IR_MODERN) -> onnx.ModelProto:
    """x[N,3] -> Clip(0, 6) r6 -> MatMul(identity) y: the output is the clipped input."""
    inits = [_init("I", np.eye(3))]
    if opset >= 11:
        inits += [_init("lo", 0.0), _init("hi", 6.0)]
        clip = helper.make_node("Clip", ["x", "lo", "hi"], ["r6"], name="relu6")
    else:
        clip = helper.make_node("Clip", ["x"], ["r6"], name="relu6", min=0.0, max=6.0)
    nodes = [clip, helper.make_node("MatMul", ["r6", "I"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    return make_model(nodes, [x], [y], inits, opset=opset, ir=ir)


def identity_classifier(classes=3, *, batch="N") -> onnx.ModelProto:
    """logits = x @ I: the predicted class is argmax(x), so tests choose predictions."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, classes])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])
    node = helper.make_node("Gemm", ["x", "I"], ["logits"])
    return make_model([node], [x], [y], [_init("I", np.eye(classes))])
