"""ONNX models and datasets built in code for the tests, and their onnxruntime outputs.

Imported as `from builders import ...` (tests/ is on sys.path under pytest). IR is pinned:
onnx writes IR 14 by default, the onnxruntime we test with loads <= 13.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

# --- graphs from node lists --------------------------------------------------------------

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


# --- small classifiers and labelled sets ------------------------------------------------------


def tiny_cnn_nodes(image: str) -> list[onnx.NodeProto]:
    """tiny_cnn's nodes from an NCHW tensor `image`: Conv -> Relu -> GlobalAveragePool -> Flatten
    -> Gemm -> Relu -> Gemm, weights w1, b1, w2, b2, w3, b3, output `logits`."""
    return [
        helper.make_node("Conv", [image, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["p1"], name="gap"),
        helper.make_node("Flatten", ["p1"], ["f1"], name="flat"),
        helper.make_node("Gemm", ["f1", "w2", "b2"], ["g2"], transB=1, name="fc1"),
        helper.make_node("Relu", ["g2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], transB=1, name="fc2"),
    ]


def write_tiny(folder, *, per_class: int = 8, model: str = "tiny.onnx"):
    """tiny_cnn(seed=3) saved as folder/`model` and its labelled set as folder/clean.npz:
    (proto, model path, data path, x, y)."""
    proto = tiny_cnn(seed=3)
    onnx.save(proto, folder / model)
    x, y = labelled_set(proto, per_class, seed=1)
    np.savez(folder / "clean.npz", x=x, y=y)
    return proto, folder / model, folder / "clean.npz", x, y


def tiny_cnn(seed: int = 0, *, opset: int = 13, ir_version: int = 8, classes: int = 3) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Relu -> Gemm, input [N,1,6,6]."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.5, (8, 4)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b2"),
        numpy_helper.from_array(rng.normal(0, 0.5, (classes, 8)).astype(np.float32), "w3"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "b3"),
    ]
    graph = helper.make_graph(
        tiny_cnn_nodes("input"),
        "tiny_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    # Centre the logits on random inputs so that every class is predicted somewhere.
    x = np.random.default_rng(seed).uniform(0, 1, (512, 1, 6, 6)).astype(np.float32)
    logits = _session(model).run(None, {"input": x})[0]
    model.graph.initializer[5].CopyFrom(numpy_helper.from_array(-np.median(logits, 0).astype(np.float32), "b3"))
    onnx.checker.check_model(model)
    return model


def _session(model):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def two_input_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Relu", ["s"], ["out"])]
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3]) for n in ("a", "b")],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def unsupported_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk_node"),
        helper.make_node("Relu", ["v"], ["r"], name="relu"),
        helper.make_node("Hardmax", ["r"], ["out"], name="hardmax_node"),
    ]
    graph = helper.make_graph(
        nodes,
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.array([3], np.int64), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def labelled_set(model: onnx.ModelProto, n_per_class: int, seed: int = 0):
    """Random inputs in [0,1], labelled by the model itself (so it is 100% accurate on them)."""
    sess = _session(model)
    rng = np.random.default_rng(seed)
    classes = sess.get_outputs()[0].shape[-1]
    xs, ys = [], []
    for _ in range(20):
        x = rng.uniform(0, 1, (256, 1, 6, 6)).astype(np.float32)
        y = sess.run(None, {"input": x})[0].argmax(1)
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys)
    pick = np.concatenate([np.flatnonzero(y == c)[:n_per_class] for c in range(classes)])
    return x[pick], y[pick].astype(np.int64)


def run_cli(*args):
    """Invoke the `mmexport` command in-process; arguments may be paths or numbers."""
    from click.testing import CliRunner

    from mmexport.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    """Exit 1, no traceback, exactly one line on the output, starting 'error: ', naming the fragments."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for frag in fragments:
        assert frag in lines[0]


# --- engine-vs-onnxruntime op cases ----------------------------------------------------------


def i64(*values):
    return np.array(values, dtype=np.int64)


def case(
    name,
    nodes,
    shape=(2, 3, 5, 5),
    *,
    opset=13,
    inits=None,
    outputs=("y",),
    atol=1e-5,
    positive=False,
):
    return pytest.param(nodes, shape, opset, inits or {}, outputs, atol, positive, id=name)


def unary(op_type, **attrs):
    return [helper.make_node(op_type, ["x"], ["y"], **attrs)]


def assert_op_matches_onnxruntime(nodes, shape, opset, inits, outputs, atol, positive):
    """The engine's outputs of a one-op graph equal onnxruntime's (shape, kind and values)."""
    import torch

    from mmexport.core.model import from_proto
    from mmexport.engine import Engine

    rng = np.random.default_rng(1)
    x = rng.random(shape) + 0.1 if positive else rng.standard_normal(shape)
    x = x.astype(np.float32)
    proto = make_onnx_model(nodes, shape, outputs=outputs, inits=inits, opset=opset)
    expected = ort_run(proto, x)

    engine = Engine(from_proto(proto, output_name=outputs[0]))
    got, _ = engine.run(torch.from_numpy(x))

    assert list(got) == list(outputs)
    for name in outputs:
        want, have = expected[name], got[name].numpy()
        assert have.shape == want.shape, name
        assert have.dtype.kind == want.dtype.kind, (name, have.dtype, want.dtype)
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=atol, err_msg=name)
