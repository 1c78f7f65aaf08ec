"""Clipping sites: the activations a bound can clip, and how to find them in a graph.

The paper bounds ReLUs because they are unbounded above: a trigger can drive a few of them
far past anything clean inputs reach. So is every activation of this list, and each is a
*site*, bounded as min(act(a), z) per channel (axis 1) or per layer:

    kind              written as
    relu              Relu
    relu6             Clip with min 0 (ReLU6 and other capped ReLUs), or the unit clip
                      HardSigmoid(alpha=1, beta=0) = clip(x, 0, 1) that folding writes
    leaky_relu        LeakyRelu
    prelu             PRelu
    elu, celu, selu   Elu, Celu, Selu
    thresholded_relu  ThresholdedRelu
    softplus          Softplus
    hard_swish        HardSwish, or x * HardSigmoid(x) (opset < 14), x * Clip(x + 3, 0, 6) / 6
    silu              x * Sigmoid(x); "swish" is x * Sigmoid(beta x) for another beta > 0
    gelu              Gelu (opset 20), or its Erf and Tanh forms
    mish              Mish (opset 18), or x * Tanh(Softplus(x))

A site is named by its output tensor (for the decomposed forms, the output of their last
node), the same keying Polygraphy's SetUpperBound uses, so bounds files travel between tools.
The decomposed forms are recognised by their algebra (`mmexport.core.patterns`), whatever the
order the exporter wrote them in; their inner nodes (the Softplus inside a Mish, the Clip
inside a HardSwish) are not sites of their own.

Only a positively homogeneous activation, act(a / s) * s == act(a) for s > 0, lets a
per-channel bound fold into the neighbouring weights (`FOLDABLE`); every other kind keeps a
`Min` after it when written into the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .patterns import ROOT_OPS, Expander, match

# The single ops that are sites, by kind (Clip and HardSigmoid are checked on their range).
SINGLE_OP_KINDS = {
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "PRelu": "prelu",
    "Elu": "elu",
    "Celu": "celu",
    "Selu": "selu",
    "ThresholdedRelu": "thresholded_relu",
    "Softplus": "softplus",
    "HardSwish": "hard_swish",
    "Gelu": "gelu",
    "Mish": "mish",
}
KINDS = ("relu", "relu6", "leaky_relu", "prelu", "elu", "celu", "selu", "thresholded_relu",
         "softplus", "hard_swish", "silu", "swish", "gelu", "mish")
# Kinds whose per-channel bounds fold into the weights: ReLU (capped or not) and the
# positively homogeneous LeakyRelu and PRelu.
FOLDABLE = frozenset({"relu", "relu6", "leaky_relu", "prelu"})
# What the user reads when a model has no site.
NO_SITES = ("no clipping sites: no activation unbounded above (Relu, Clip(0, ..), LeakyRelu, "
            "PRelu, Elu, Celu, Selu, ThresholdedRelu, Softplus, HardSwish, SiLU, Gelu, Mish)")
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Site:
    """One bounded activation, named by its output tensor.

    node / op: the node writing that tensor (for a decomposed activation its last node,
    e.g. the Mul of x * Sigmoid(x)); kind: the activation (`KINDS`); input: the tensor the
    activation is applied to; axis: its channel axis (`channel_axis`), 1 or -1 (the last);
    channels / rank: of the output, where shape inference knows them.
    """

    name: str
    node: str
    op: str
    channels: int | None
    rank: int | None = None
    kind: str = "relu"
    input: str = ""
    axis: int = 1

    @property
    def foldable(self) -> bool:
        return self.kind in FOLDABLE


def const_value(graph: onnx.GraphProto, name: str):
    """The value of a tensor that is an initializer or a Constant node's output, else None."""
    if not name:
        return None
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            return constant_node_value(node)
    return None


def constant_node_value(node: onnx.NodeProto):
    """The tensor a Constant node holds (as `value` or `value_float`), else None."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
    return None


def clip_range(graph: onnx.GraphProto, node: onnx.NodeProto, opset: int) -> tuple[float, float]:
    """(min, max) of a Clip node: attributes below opset 11, optional inputs from 11."""
    lo, hi = -np.inf, np.inf
    if opset < 11:
        for attr in node.attribute:
            if attr.name == "min":
                lo = float(attr.f)
            elif attr.name == "max":
                hi = float(attr.f)
    else:
        if len(node.input) > 1 and node.input[1]:
            v = const_value(graph, node.input[1])
            lo = float(v) if v is not None else np.nan
        if len(node.input) > 2 and node.input[2]:
            v = const_value(graph, node.input[2])
            hi = float(v) if v is not None else np.nan
    return lo, hi


def is_unit_clip(node) -> bool:
    """A HardSigmoid with alpha 1 and beta 0: max(0, min(1, x)), a ReLU bounded at 1.

    Takes an onnx NodeProto or a graphsurgeon Node."""
    if isinstance(node, onnx.NodeProto):
        op, attrs = node.op_type, {a.name: a.f for a in node.attribute}
    else:
        op, attrs = node.op, node.attrs
    if op != "HardSigmoid":
        return False
    return float(attrs.get("alpha", 0.2)) == 1.0 and float(attrs.get("beta", 0.5)) == 0.0


def site_max(graph: onnx.GraphProto, node: onnx.NodeProto, opset: int) -> float:
    """The upper end a site already has: the max of a Clip (NaN when computed at run time),
    1 for a unit clip, inf for every other kind."""
    if node.op_type == "Clip":
        return clip_range(graph, node, opset)[1]
    return 1.0 if is_unit_clip(node) else np.inf


def single_op_kind(graph: onnx.GraphProto, node: onnx.NodeProto, opset: int) -> str | None:
    """The kind of a one-node site, else None."""
    if node.domain not in _DEFAULT_DOMAINS or not node.output:
        return None
    if node.op_type == "Clip":
        return "relu6" if clip_range(graph, node, opset)[0] == 0.0 else None
    if is_unit_clip(node):
        return "relu6"
    if node.op_type == "Selu":  # gamma <= 0 would bound it above
        gamma = next((a.f for a in node.attribute if a.name == "gamma"), 1.0507)
        return "selu" if gamma > 0 else None
    return SINGLE_OP_KINDS.get(node.op_type)


def _values(graph: onnx.GraphProto):
    """name -> value for initializers, Constant outputs and Identity of those."""
    inits = {i.name: i for i in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and n.output}
    identity = {n.output[0]: n.input[0] for n in graph.node
                if n.op_type == "Identity" and n.output and n.input}
    cache: dict[str, np.ndarray | None] = {}

    def value(name: str):
        if name in cache:
            return cache[name]
        out = None
        if name in inits:
            out = numpy_helper.to_array(inits[name])
        elif name in constants:
            out = constant_node_value(constants[name])
        elif name in identity and identity[name] != name:
            out = value(identity[name])
        cache[name] = out
        return out

    return value


def find_sites(proto: onnx.ModelProto, shapes: dict[str, tuple] | None = None) -> list[Site]:
    """Every activation unbounded above (and every capped ReLU), in graph order, named by
    output tensor; a decomposed activation counts once, at its last node."""
    shapes = shapes or {}
    graph = proto.graph
    opset = _opset(proto)
    producers = {t: n for n in graph.node for t in n.output if t}
    expander = Expander(producers, _values(graph), opset)
    found: dict[int, tuple[str, str]] = {}  # id(node) -> (kind, input)
    inner: set[int] = set()
    for node in graph.node:
        if node.op_type in ROOT_OPS:
            hit = match(expander, node)
            if hit is not None:
                kind, x, nodes = hit
                found[id(node)] = (kind, x)
                inner.update(id(n) for n in nodes)
    sites = []
    for node in graph.node:
        if id(node) in inner:
            continue  # inside a decomposed activation (the Softplus of a Mish)
        if id(node) in found:
            kind, x = found[id(node)]
        else:
            kind = single_op_kind(graph, node, opset)
            if kind is None:
                continue
            x = node.input[0]
        shape = shapes.get(node.output[0])
        rank = len(shape) if shape else None
        axis = channel_axis(producers, x, rank)
        channels = shape[axis] if shape and len(shape) > 1 and isinstance(shape[axis], int) else None
        sites.append(Site(name=node.output[0], node=node.name, op=node.op_type,
                          channels=channels, rank=rank, kind=kind, input=x, axis=axis))
    return sites


def channel_axis(producers: dict, x: str, rank: int | None) -> int:
    """The axis of an activation's channels: 1 (NCHW, and any [N, C]), or -1 where the
    activation reads a MatMul (through its bias Add) on more than two axes.

    A transformer's MLP works on tokens [N, T, C]: its features, like a conv's channels, are
    the last axis, shared by every token, and they are what a bound per channel should bound
    (axis 1 would bound each token position instead).
    """
    if rank == 2:
        return 1
    node = producers.get(x)
    for _ in range(4):  # through a bias Add or an Identity
        if node is None:
            return 1
        if node.op_type == "MatMul":
            return -1
        if node.op_type not in ("Add", "Identity"):
            return 1
        ins = [producers.get(i) for i in node.input if i]
        if any(n is not None and n.op_type == "MatMul" for n in ins):
            return -1
        node = ins[0] if node.op_type == "Identity" and ins else None
    return 1


def _opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in _DEFAULT_DOMAINS:
            return int(imp.version)
    return 1
