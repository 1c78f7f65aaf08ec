"""The role each node plays for a per-channel scale: carries it, mixes it, or blocks it.

A positive per-channel scale commutes with ReLU, pooling, reshapes, concatenation and sums of
equally scaled inputs; a weight layer absorbs it on its input side and can apply one on its
output side. Any other op is *opaque*: the channels it reads or writes keep scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...core.sites import is_unit_clip
from ..edit import CLIP_INPUTS_OPSET

_UNARY = {
    "Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool",
    "GlobalMaxPool", "LpPool", "GlobalLpPool", "Identity", "Dropout", "Pad", "Resize",
    "Upsample", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL1", "ReduceL2",
}  # fmt: skip
_RESHAPES = {"Flatten", "Reshape", "Squeeze", "Unsqueeze"}
# f(x1/s, x2/s, c/s) = f(x1, x2, c)/s: every variable input shares the output's scale and a
# constant operand is divided by it.
_ELEMENTWISE = {"Add", "Sub", "Sum", "Max", "Min", "Mean"}
_LINEAR = {"Conv", "Gemm", "MatMul", "BatchNormalization"}
# Read only a tensor's shape, never its values.
_SHAPE_ONLY = {"Shape", "Size"}


@dataclass
class Role:
    """What a node does to per-channel scales.

    kind: "shape" (reads shapes only), "unary" (channel c in, channel c out), "reshape"
    (per-sample data kept in order; `p_in` / `p_out` elements per channel), "concat" /
    "split" (along `axis`), "elementwise" (variable inputs share the output's scale,
    constant operands `consts` are divided by it), "mulconst" (times a constant: scale passes),
    "linear" (Conv / Gemm / MatMul / BatchNormalization: absorbs its input's scale into its
    weights and produces its output's scale), "opaque" (neither: its tensors keep scale 1).
    """

    kind: str
    data: int = 0
    axis: int = 1
    p_in: int = 1
    p_out: int = 1
    consts: tuple = ()
    why: str = ""


class RoleAnalysis:
    """The node-role half of `Plan`: needs `shapes`, `cls`, `opset` and `graph_outputs`."""

    def _var(self, t) -> bool:
        return isinstance(t, gs.Variable) and bool(t.name) and const(t) is None

    def dims(self, t) -> tuple | None:
        dims = self.shapes.get(t.name) if t is not None else None
        return dims if dims else None

    def _role(self, node: gs.Node) -> Role:
        op = node.op
        opaque = Role("opaque")
        if op in _SHAPE_ONLY:
            return Role("shape")
        ins = list(node.inputs)
        used_outs = [t for t in node.outputs if t.outputs or t.name in self.graph_outputs]
        if not node.outputs or any(t is not node.outputs[0] for t in used_outs):
            return Role("opaque", why="uses a second output")
        if op in _ELEMENTWISE:
            return self._elementwise_role(node)
        if op in ("Mul", "Div"):
            return self._mulconst_role(node)
        if not ins or not self._var(ins[0]):
            return opaque
        x, y = ins[0], node.outputs[0]
        if self.cls.channels.get(x.name) is None or self.cls.channels.get(y.name) is None:
            return Role("opaque", why="channel count unknown")
        if op in ("Relu", "Clip") or is_unit_clip(node):
            if op == "Clip" and not is_relu_clip(node, self.opset):
                return Role("opaque", why="not a Clip(0, constant)")
            return Role("unary")
        if op in _UNARY:
            return self._unary_role(node)
        if op in _RESHAPES:
            return self._reshape_role(node)
        if op == "Concat":
            return self._concat_role(node)
        if op == "Split":
            return self._split_role(node)
        if op in _LINEAR:
            return self._linear_role(node)
        return opaque

    def _mulconst_role(self, node: gs.Node) -> Role:
        """x * c, c * x or x / c with c a finite constant: x's scale passes through."""
        ins, y = node.inputs, node.outputs[0]
        var = [i for i, t in enumerate(ins) if self._var(t)]
        if len(ins) != 2 or len(var) != 1 or (node.op == "Div" and var != [0]):
            return Role("opaque", why="not a product with a constant")
        c = const(ins[1 - var[0]])
        x = ins[var[0]]
        if c is None or not np.all(np.isfinite(c)):
            return Role("opaque", why="not a product with a constant")
        if self.cls.channels.get(x.name) is None or self.cls.channels.get(y.name) is None:
            return Role("opaque", why="channel count unknown")
        if self.cls.channels[x.name] != self.cls.channels[y.name]:
            return Role("opaque", why="broadcasts over the channel axis")
        return Role("mulconst", data=var[0])

    def _unary_role(self, node: gs.Node) -> Role:
        op, x, y = node.op, node.inputs[0], node.outputs[0]
        if self.cls.channels[x.name] != self.cls.channels[y.name]:
            return Role("opaque", why="changes the channel count")
        if op == "PRelu" and (len(node.inputs) < 2 or const(node.inputs[1]) is None):
            return Role("opaque", why="slope is not a constant")
        if op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
            mode = const(node.inputs[2])
            if mode is None or bool(mode):
                return Role("opaque", why="training mode")
        if op == "Pad":
            mode = node.attrs.get("mode", "constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            value, pads = node.attrs.get("value", 0.0), node.attrs.get("pads")
            if self.opset >= 11:
                value = 0.0
                if len(node.inputs) > 2 and node.inputs[2].name:
                    v = const(node.inputs[2])
                    value = None if v is None else float(np.asarray(v).reshape(-1)[0])
                if len(node.inputs) > 3 and node.inputs[3].name:
                    return Role("opaque", why="pads given per axis")
                pads = const(node.inputs[1]) if len(node.inputs) > 1 else None
            if mode == "constant" and value != 0.0:
                return Role("opaque", why="pads with a non-zero constant")
            pads = None if pads is None else [int(p) for p in np.asarray(pads).reshape(-1)]
            if not pads or len(pads) % 2 or any(pads[i] for i in (0, 1, len(pads) // 2,
                                                                 len(pads) // 2 + 1)):
                return Role("opaque", why="pads the batch or channel axis")
        if op in ("Resize", "Upsample"):
            if not same_leading(self.dims(node.inputs[0]), self.dims(node.outputs[0])):
                return Role("opaque", why="resizes the batch or channel axis")
        if op.startswith("Reduce"):
            axes = node.attrs.get("axes")
            if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
                a = const(node.inputs[1])
                axes = None if a is None else [int(v) for v in np.asarray(a).reshape(-1)]
            rank = len(self.dims(node.inputs[0]) or ())
            if not axes or not rank or any((a % rank) < 2 for a in axes):
                return Role("opaque", why="reduces the batch or channel axis")
        return Role("unary")

    def _reshape_role(self, node: gs.Node) -> Role:
        if node.op == "Flatten" and node.attrs.get("axis", 1) != 1:
            return Role("opaque", why="axis is not 1")
        d_in, d_out = self.dims(node.inputs[0]), self.dims(node.outputs[0])
        if not d_in or not d_out or len(d_in) < 2 or len(d_out) < 2:
            return Role("opaque", why="shape unknown")
        rest_in, rest_out = d_in[1:], d_out[1:]
        if not all(isinstance(d, int) for d in rest_in + rest_out):
            return Role("opaque", why="shape unknown")
        if int(np.prod(rest_in)) != int(np.prod(rest_out)):
            return Role("opaque", why="mixes samples")
        return Role("reshape", p_in=int(np.prod(rest_in[1:])), p_out=int(np.prod(rest_out[1:])))

    def _concat_role(self, node: gs.Node) -> Role:
        rank = len(self.dims(node.outputs[0]) or ())
        if not rank:
            return Role("opaque", why="shape unknown")
        axis = node.attrs.get("axis", 1) % rank
        for t in node.inputs:
            if not self._var(t) or self.cls.channels.get(t.name) is None:
                return Role("opaque", why="concatenates a constant or an unknown shape")
        return Role("concat", axis=axis)

    def _split_role(self, node: gs.Node) -> Role:
        rank = len(self.dims(node.inputs[0]) or ())
        if not rank or any(self.cls.channels.get(t.name) is None for t in node.outputs):
            return Role("opaque", why="shape unknown")
        return Role("split", axis=node.attrs.get("axis", 0) % rank)

    def _elementwise_role(self, node: gs.Node) -> Role:
        y = node.outputs[0]
        c_out = self.cls.channels.get(y.name)
        rank = len(self.dims(y) or ())
        if c_out is None or rank < 2:
            return Role("opaque", why="shape unknown")
        consts, n_var = [], 0
        for i, t in enumerate(node.inputs):
            if self._var(t):
                n_var += 1
                d = self.dims(t)
                if not d or len(d) != rank or self.cls.channels.get(t.name) != c_out:
                    return Role("opaque", why="broadcasts over the channel axis")
            else:
                c = const(t)
                if c is None or c.ndim > rank or not np.all(np.isfinite(c)):
                    return Role("opaque", why="operand is neither a tensor nor a constant")
                aligned = (1,) * (rank - c.ndim) + c.shape
                if aligned[1] not in (1, c_out):
                    return Role("opaque", why="constant does not broadcast per channel")
                consts.append(i)
        if n_var == 0:
            return Role("opaque", why="no variable input")
        return Role("elementwise", consts=tuple(consts))

    def _linear_role(self, node: gs.Node) -> Role:
        op, ins = node.op, node.inputs
        x, y = ins[0], node.outputs[0]
        cin, cout = self.cls.channels[x.name], self.cls.channels[y.name]
        w = const(ins[1]) if len(ins) > 1 else None
        if w is None:
            return Role("opaque", why="weights are not constant")
        if op == "Conv":
            g = int(node.attrs.get("group", 1))
            if w.ndim < 3 or w.shape[0] != cout or w.shape[1] * g != cin or cout % g:
                return Role("opaque", why="weight shape")
            if len(ins) > 2 and ins[2].name and const(ins[2]) is None:
                return Role("opaque", why="bias is not constant")
        elif op in ("Gemm", "MatMul"):
            if len(self.dims(x) or ()) != 2 or w.ndim != 2:
                return Role("opaque", why="not a 2-D product")
            if op == "Gemm" and node.attrs.get("transA", 0):
                return Role("opaque", why="transA")
            k_axis = 1 if op == "Gemm" and node.attrs.get("transB", 0) else 0
            if w.shape[k_axis] != cin or w.shape[1 - k_axis] != cout:
                return Role("opaque", why="weight shape")
            if op == "Gemm" and len(ins) > 2 and ins[2].name:
                c = const(ins[2])
                if c is None or c.ndim > 2 or (c.ndim and c.shape[-1] not in (1, cout)):
                    return Role("opaque", why="bias is not a per-output constant")
        else:  # BatchNormalization
            params = [const(t) for t in ins[1:5]]
            if len(ins) < 5 or any(p is None or p.shape != (cin,) for p in params):
                return Role("opaque", why="parameters are not constant")
            if node.attrs.get("training_mode", 0) or cin != cout:
                return Role("opaque", why="training mode")
        return Role("linear")


def same_leading(d_in, d_out) -> bool:
    return bool(d_in) and bool(d_out) and len(d_in) == len(d_out) and d_in[:2] == d_out[:2]


def const(t) -> np.ndarray | None:
    """The value of an initializer or a Constant node's output, through Identity nodes
    (the TorchScript exporter without constant folding passes weights through them)."""
    for _ in range(8):
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        if not isinstance(t, gs.Variable) or len(t.inputs) != 1:
            return None
        producer = t.inputs[0]
        if producer.op == "Constant":
            value = producer.attrs.get("value")
            return np.asarray(value.values) if isinstance(value, gs.Constant) else None
        if producer.op != "Identity" or not producer.inputs:
            return None
        t = producer.inputs[0]
    return None


def clip_max(node: gs.Node, opset: int) -> float:
    if node.op == "HardSigmoid":  # a unit clip
        return 1.0
    if opset < CLIP_INPUTS_OPSET:
        return float(node.attrs.get("max", np.inf))
    if len(node.inputs) > 2 and node.inputs[2].name:
        v = const(node.inputs[2])
        return float(v) if v is not None else np.nan
    return np.inf


def is_relu_clip(node: gs.Node, opset: int) -> bool:
    """A Clip with min exactly 0 and a constant (or no) max, or a unit clip."""
    if is_unit_clip(node):
        return True
    if opset < CLIP_INPUTS_OPSET:
        lo = node.attrs.get("min", -np.inf)
    else:
        lo = -np.inf
        if len(node.inputs) > 1 and node.inputs[1].name:
            v = const(node.inputs[1])
            lo = float(v) if v is not None else np.nan
    return lo == 0.0 and not np.isnan(clip_max(node, opset))


def outer_scope_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors that nodes inside subgraphs (If, Loop, Scan) read from the outer graph."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                for n in sub.node:
                    names.update(i for i in n.input if i)
                names |= outer_scope_names(sub)
    return names


# --------------------------------------------------------------------------- writing


