"""The classic ImageNet models of onnx's backend test data, as shipped and with random weights.

onnx ships nine "light" graphs (`onnx/backend/test/data/light/light_<name>.onnx`, listed in
`../real/test_<name>/data.json`): AlexNet, DenseNet-121, Inception v1 and v2, ResNet-50,
ShuffleNet, SqueezeNet, VGG-19 and ZFNet-512, opset 9, IR 3, a fixed batch of 1
([1, 3, 224, 224]), Caffe2 exports. To keep them small, every large tensor (every Conv and Gemm
weight, most biases, and in the BatchNorm models most scales, shifts, means and variances) is
not stored: a `ConstantOfShape` node fills it with 0.02 from a stored int64 shape. The stored
float initializers are real values of the trained models (small 1-D tensors). As shipped, all
1000 logits of a model are therefore equal (every Gemm row is the same) and the final Softmax
gives 0.001 everywhere (DenseNet-121 ends in its last conv, [1, 1000, 1, 1], without one).

`with_random_weights` gives the same graphs real-looking numbers: every float parameter (the
filled tensors and the stored ones) gets seeded random values of its shape, scaled by what
reads it so activations stay in range.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
NAMES = ("bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50", "shufflenet",
         "squeezenet", "vgg19", "zfnet512")


def light_model(name: str) -> Path:
    return LIGHT / f"light_{name}.onnx"


def _consumers(graph: onnx.GraphProto) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    out: dict[str, list] = {}
    for node in graph.node:
        for k, name in enumerate(node.input):
            out.setdefault(name, []).append((node, k))
    return out


def _role(name: str, shape: tuple, consumers: dict) -> tuple[str, int]:
    """What a parameter is ("weight", "scale", "shift", "variance") and its fan-in, from its
    readers (through Unsqueeze / Reshape)."""
    for node, k in consumers.get(name, ()):
        if node.op_type in ("Unsqueeze", "Reshape") and k == 0:
            role = _role(node.output[0], shape, consumers)
            if role[0] != "shift":
                return role
        if node.op_type == "Conv" and k == 1:
            return "weight", int(np.prod(shape[1:]))
        if node.op_type == "Gemm" and k == 1:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            return "weight", int(shape[1] if trans_b else shape[0])
        if node.op_type == "BatchNormalization":
            return {1: ("scale", 0), 4: ("variance", 0)}.get(k, ("shift", 0))
        if node.op_type == "Mul":
            return "scale", 0
    if len(shape) >= 2:
        return "weight", int(np.prod(shape[1:]))
    return "shift", 0


def _random(role: str, fan_in: int, shape: tuple, rng: np.random.Generator) -> np.ndarray:
    if role == "weight":
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / max(fan_in, 1)))
    if role in ("scale", "variance"):
        return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return (rng.standard_normal(shape) * 0.1).astype(np.float32)


# Ops through which scaling the classifier's weights scales the logits.
_HOMOGENEOUS = ("Reshape", "Flatten", "Dropout", "Identity", "Squeeze", "Relu", "GlobalAveragePool",
                "AveragePool")


def _classifier(graph: onnx.GraphProto, logits: str) -> onnx.NodeProto | None:
    producer = {o: n for n in graph.node for o in n.output}
    node = producer.get(logits)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        node = producer.get(node.input[0])
    while node is not None and node.op_type in _HOMOGENEOUS:
        node = producer.get(node.input[0])
    return node if node is not None and node.op_type in ("Gemm", "Conv") else None


def with_random_weights(proto: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """The graph with every float parameter seeded-random; ConstantOfShape fills become
    initializers (listed among the graph inputs too, as IR 3 wants)."""
    rng = np.random.default_rng(seed)
    graph = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers = _consumers(graph)
    params: dict[str, np.ndarray] = {}
    nodes = []
    for node in graph.node:
        if node.op_type == "ConstantOfShape" and node.input[0] in inits:
            shape = tuple(int(d) for d in inits[node.input[0]])
            params[node.output[0]] = _random(*_role(node.output[0], shape, consumers), shape, rng)
        else:
            nodes.append(node)
    for name, value in inits.items():
        if value.dtype.kind == "f":
            params[name] = _random(*_role(name, value.shape, consumers), value.shape, rng)
    read = {name for node in nodes for name in node.input}
    kept = {name: value for name, value in inits.items() if name in read and name not in params}
    tensors = {**kept, **params}
    inputs = [vi for vi in graph.input if vi.name not in inits]
    inputs += [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
               for name, v in tensors.items()]
    new_graph = helper.make_graph(nodes, graph.name, inputs, list(graph.output),
                                  [numpy_helper.from_array(v, name) for name, v in tensors.items()])
    out = helper.make_model(new_graph, opset_imports=list(proto.opset_import),
                            ir_version=proto.ir_version, producer_name=proto.producer_name)
    return _tame_logits(out, tensors, seed)


def _tame_logits(proto: onnx.ModelProto, tensors: dict, seed: int, spread: float = 5.0):
    """The model with its classifier scaled so the logits of a random image spread about
    `spread`: He-scaled residual nets otherwise reach logits of 1e4-1e5, where float32
    rounding alone exceeds an absolute tolerance on the logits near 0."""
    import onnxruntime as ort

    graph = proto.graph
    head = _classifier(graph, graph.output[0].name)
    if head is None:
        return proto
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(onnx.ValueInfoProto(name=head.output[0]))
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(seed).uniform(0, 1, (1, 3, 224, 224)).astype(np.float32)
    logits = sess.run([head.output[0]], {sess.get_inputs()[0].name: x})[0]
    factor = np.float32(spread / max(float(logits.std()), 1e-12))
    by_name = {init.name: init for init in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    for name in head.input[1:3]:
        if name in producer and producer[name].op_type == "Reshape":  # a weight stored 4-D
            name = producer[name].input[0]
        if name in by_name:
            by_name[name].CopyFrom(numpy_helper.from_array(tensors[name] * factor, name))
    return proto
