"""Small ONNX models and datasets built in code for the CLI and pipeline tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


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
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("GlobalAveragePool", ["r1"], ["p1"], name="gap"),
        helper.make_node("Flatten", ["p1"], ["f1"], name="flat"),
        helper.make_node("Gemm", ["f1", "w2", "b2"], ["g2"], transB=1, name="fc1"),
        helper.make_node("Relu", ["g2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"], transB=1, name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
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
    import onnxruntime as ort

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

    from mmexport.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    """Exit 1, no traceback, exactly one line on the output, starting 'error: ', naming the fragments."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for frag in fragments:
        assert frag in lines[0]
