"""The graph edits every writer shares: fresh names, tensor types, and the edit of one site.

Torch-free (onnx and onnx-graphsurgeon only). Used by the bound rewrite (`rewrite`), the
folding writer (`fold`) and the MMDF graph (`mmexport.defences.mmdf.graph`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, shape_inference

from ..core.errors import MmexportError
from ..core.model import dims
from ..core.sites import is_unit_clip

# Everything mmexport adds to a graph is named under this prefix (nodes and initializers).
BOUND_PREFIX = "mmexport/bound/"
# Min broadcasts (multidirectionally) from opset 8; earlier Min needs equal shapes.
MIN_BROADCAST_OPSET = 8
# Clip takes min/max as inputs from opset 11, as attributes before.
CLIP_INPUTS_OPSET = 11


def site_node(producers: dict, name: str) -> gs.Node:
    """The node writing site tensor `name` (for a decomposed activation, its last node)."""
    node = producers.get(name)
    if node is None:
        raise MmexportError(f"site {name!r}: no node produces it")
    return node


def is_relu_node(node: gs.Node) -> bool:
    """A Relu, a Clip or a unit clip: the sites whose scalar bound is a Clip of their own."""
    return node.op in ("Relu", "Clip") or is_unit_clip(node)


def write_site(graph, node, value, *, rank, dtype, clip_hi, fresh, opset, axis=1) -> str:
    """The unfolded edit of one site; returns its form, "min" or "clip".

    Per-channel: `Min` after the site, the bounds on the site's channel `axis` (1 or -1).
    Scalar: a Relu becomes `Clip(0, z)`, a ReLU6 gets a lower max (or a scalar `Min` when its
    max is computed at run time); every other activation (LeakyRelu, GELU, ...) keeps its node
    and gets a scalar `Min` after it.
    """
    if value.ndim == 0 and not is_relu_node(node):
        insert_min(graph, node, value.astype(dtype), fresh, opset)
        return "min"
    if value.ndim == 1:
        z = channel_bound(value, rank, axis, node.outputs[0].name).astype(dtype)
        insert_min(graph, node, z, fresh, opset)
        return "min"
    if node.op == "Relu":
        relu_to_clip(node, float(value), dtype, fresh, opset)
        return "clip"
    if np.isnan(clip_hi):  # max computed at run time: bound after it instead
        insert_min(graph, node, value.astype(dtype), fresh, opset)
        return "min"
    lower_clip_max(node, min(clip_hi, float(value)), dtype, fresh, opset)
    return "clip"


def channel_bound(value: np.ndarray, rank: int | None, axis: int, site: str) -> np.ndarray:
    """Per-channel bounds [C] shaped to broadcast over a site's channel axis: [C, 1, ..., 1]
    on axis 1, [C] as they are on the last axis (whatever the rank)."""
    if axis == -1:
        return value
    if not rank or rank < 2:
        raise MmexportError(
            f"site {site!r}: activation rank unknown or < 2, cannot place {value.shape[0]} "
            "per-channel bounds on axis 1"
        )
    return value.reshape((value.shape[0],) + (1,) * (rank - 2))


class Namer:
    """Unused names, tensors and nodes each in their own namespace (as in ONNX)."""

    def __init__(self, tensors: set[str], nodes: set[str]):
        self.taken = {"tensor": tensors, "node": nodes}

    def __call__(self, name: str, kind: str = "tensor") -> str:
        taken = self.taken[kind]
        out, i = name, 1
        while out in taken:
            out, i = f"{name}_{i}", i + 1
        taken.add(out)
        return out


def value_types(proto: onnx.ModelProto) -> tuple[dict[str, tuple], dict[str, int]]:
    """Shapes and element types of every tensor shape inference can tell."""
    try:
        inferred = shape_inference.infer_shapes(proto)
    except Exception:
        inferred = proto
    g = inferred.graph
    shapes, types = {}, {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        shapes[vi.name] = dims(vi)
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return shapes, types


def insert_min(graph: gs.Graph, node: gs.Node, z: np.ndarray, fresh, opset: int) -> None:
    """`node -> t` becomes `node -> t/unbounded -> Min(., z) -> t`."""
    if opset < MIN_BROADCAST_OPSET:
        raise MmexportError(
            f"site {node.outputs[0].name!r}: a bound written as Min needs opset >= "
            f"{MIN_BROADCAST_OPSET} (broadcasting Min); the model has opset {opset}"
        )
    t = node.outputs[0]
    raw = gs.Variable(fresh(t.name + "/unbounded"), dtype=t.dtype, shape=t.shape)
    node.outputs[0] = raw
    bound = gs.Constant(fresh(BOUND_PREFIX + t.name), values=z)
    name = fresh(BOUND_PREFIX + t.name, "node")
    graph.nodes.append(gs.Node("Min", name=name, inputs=[raw, bound], outputs=[t]))


def relu_to_clip(node: gs.Node, z: float, dtype, fresh, opset: int) -> None:
    t = node.outputs[0].name
    node.op = "Clip"
    node.name = fresh(BOUND_PREFIX + t, "node")
    node.attrs.clear()  # Relu < 6 had consumed_inputs
    if opset < CLIP_INPUTS_OPSET:
        node.attrs["min"] = 0.0
        node.attrs["max"] = z
    else:
        node.inputs.append(gs.Constant(fresh(BOUND_PREFIX + t + "/min"), np.array(0, dtype)))
        node.inputs.append(gs.Constant(fresh(BOUND_PREFIX + t + "/max"), np.array(z, dtype)))


def relu_to_unit_clip(node: gs.Node, fresh) -> None:
    """Relu or Clip -> HardSigmoid(alpha=1, beta=0) = clip(x, 0, 1), exactly: onnxruntime
    fuses it into a Conv (also after a residual Add) and a Gemm, where it fuses no Clip."""
    t = node.outputs[0].name
    node.op = "HardSigmoid"
    node.name = fresh(BOUND_PREFIX + t, "node")
    keep_first_input(node)
    node.attrs.clear()
    node.attrs["alpha"] = 1.0
    node.attrs["beta"] = 0.0


def keep_first_input(node: gs.Node) -> None:
    # graphsurgeon's input list keeps tensors' consumer lists in step; it has no slice delete.
    while len(node.inputs) > 1:
        node.inputs.pop()


def lower_clip_max(node: gs.Node, hi: float, dtype, fresh, opset: int) -> None:
    t = node.outputs[0].name
    if node.op == "HardSigmoid":  # a unit clip: becomes Clip(0, hi)
        relu_to_clip(node, hi, dtype, fresh, opset)
        return
    node.name = fresh(BOUND_PREFIX + t, "node")
    if opset < CLIP_INPUTS_OPSET:
        node.attrs["max"] = hi
        return
    # A new initializer, never an edit of the old one: other Clips may share it.
    new_max = gs.Constant(fresh(BOUND_PREFIX + t + "/max"), np.array(hi, dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = new_max
    else:
        node.inputs.append(new_max)


def restore_model_fields(out: onnx.ModelProto, src: onnx.ModelProto) -> None:
    """Put back what graphsurgeon's export does not keep exactly as the input had it."""
    out.ir_version = src.ir_version
    del out.opset_import[:]
    out.opset_import.extend(src.opset_import)
    out.producer_name = src.producer_name
    out.producer_version = src.producer_version
    out.domain = src.domain
    out.model_version = src.model_version
    out.doc_string = src.doc_string
    del out.metadata_props[:]
    out.metadata_props.extend(src.metadata_props)
    out.graph.name = src.graph.name
    out.graph.doc_string = src.graph.doc_string

    del out.graph.output[:]
    out.graph.output.extend(src.graph.output)
    # Graph inputs as the source listed them, minus initializers the edit dropped (a
    # replaced Clip max). IR < 4 lists every initializer as an input: add the new ones.
    src_inits = {i.name for i in src.graph.initializer}
    new_inits = {i.name for i in out.graph.initializer}
    inputs = [vi for vi in src.graph.input if vi.name not in src_inits or vi.name in new_inits]
    if src.ir_version < 4:
        listed = {vi.name for vi in inputs}
        inputs += [
            helper.make_tensor_value_info(i.name, i.data_type, list(i.dims))
            for i in out.graph.initializer
            if i.name not in listed
        ]
    del out.graph.input[:]
    out.graph.input.extend(inputs)
