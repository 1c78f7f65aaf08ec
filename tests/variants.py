"""Models as other exporters write them, made from the sample models: a fixed batch, a final
Softmax. Imported as `from variants import ...` (tests/ is on sys.path under pytest)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from builders import tiny_cnn_nodes
from onnx import helper, numpy_helper

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def with_fixed_batch(proto: onnx.ModelProto, n: int, *, bake_reshape: bool = True) -> onnx.ModelProto:
    """A copy of `proto` as an export with a fixed batch of `n` writes it: the batch dimension
    of every graph input and output set to n and, with `bake_reshape`, every Flatten turned
    into a Reshape to the constant [n, -1] (what torch writes for `x.view(x.size(0), -1)`
    when the input shape is static)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    inits = {i.name for i in graph.initializer}
    for vi in [*graph.input, *graph.output]:
        if vi.name in inits:
            continue
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_value = n
    del graph.value_info[:]  # inferred shapes name the old free batch
    if bake_reshape:
        nodes = []
        for node in graph.node:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if node.op_type == "Flatten" and axis == 1:
                shape = f"{node.output[0]}/shape"
                graph.initializer.append(numpy_helper.from_array(np.array([n, -1], np.int64), shape))
                node = helper.make_node("Reshape", [node.input[0], shape], list(node.output), name=node.name)
            nodes.append(node)
        del graph.node[:]
        graph.node.extend(nodes)
    onnx.checker.check_model(out)
    return out


def with_softmax(proto: onnx.ModelProto, *, op: str = "Softmax", name: str = "probabilities") -> onnx.ModelProto:
    """A copy of `proto` whose only output is the Softmax (or LogSoftmax) of its logits."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    (logits,) = graph.output
    graph.node.append(helper.make_node(op, [logits.name], [name], axis=-1, name="final_softmax"))
    prob = onnx.ValueInfoProto()
    prob.CopyFrom(logits)
    prob.name = name
    del graph.output[:]
    graph.output.append(prob)
    onnx.checker.check_model(out)
    return out


def tiny_nhwc_cnn(seed: int = 0, classes: int = 3) -> onnx.ModelProto:
    """An NHWC classifier as tf2onnx writes one: input [N, 6, 6, 3], a Transpose to NCHW, then
    Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> Relu -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = {
        "w1": rng.normal(0, 0.5, (4, 3, 3, 3)), "b1": rng.normal(0, 0.1, (4,)),
        "w2": rng.normal(0, 0.5, (8, 4)), "b2": rng.normal(0, 0.1, (8,)),
        "w3": rng.normal(0, 0.5, (classes, 8)), "b3": np.zeros(classes),
    }
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2], name="to_nchw"),
        *tiny_cnn_nodes("nchw"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_nhwc",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", 6, 6, 3])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    x, _ = nhwc_inputs(512, seed)
    logits = _run(model, x)
    model.graph.initializer[-1].CopyFrom(
        numpy_helper.from_array(-np.median(logits, 0).astype(np.float32), "b3"))
    onnx.checker.check_model(model)
    return model


def nhwc_inputs(n: int, seed: int = 0):
    """n images [n, 6, 6, 3] whose channel c lies in [0, c + 1]: each channel its own range."""
    rng = np.random.default_rng(seed)
    scale = np.arange(1, 4, dtype=np.float32)
    return (rng.uniform(0, 1, (n, 6, 6, 3)) * scale).astype(np.float32), scale


def labelled_by(model: onnx.ModelProto, x: np.ndarray, n_per_class: int):
    """n_per_class of x per class, labelled by the model itself."""
    y = _run(model, x).argmax(1)
    pick = np.concatenate([np.flatnonzero(y == c)[:n_per_class] for c in range(int(y.max()) + 1)])
    return x[pick], y[pick].astype(np.int64)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]
