"""Fold per-channel bounds into the weights, so they cost what one scalar bound per site costs.

A per-channel bound written as `Min(relu(a), Z[C,1,1])` breaks onnxruntime's Conv+Relu
fusion and its NCHWc layout (+30-75% CPU latency on the sample CNNs), while a scalar bound
fuses into the Conv. For z > 0,

    min(relu(a), z) = z * min(relu(a / z), 1),

because a positive per-channel scale commutes with ReLU and with the clip. So the producer of
`a` divides its output channel c by z_c (Conv / Gemm / MatMul weights and bias, or a
BatchNormalization's scale and bias), the site becomes a *unit clip* and every consumer
multiplies the matching input channel by z_c (Conv weights on the input-channel axis, Gemm /
MatMul rows). Between producer and consumer the scale rides through ops that commute with a
positive per-channel scale: pooling, Flatten / Reshape, Concat / Split, Pad with zeros, Add
(both inputs must carry the same scale), ...

The unit clip is `HardSigmoid(alpha=1, beta=0)` = max(0, min(1, x)), exactly clip(x, 0, 1):
onnxruntime fuses it into a Conv (also after a residual Add) and into a Gemm, where it
leaves a `Clip` as a node of its own. Where the site's only reader is a MaxPool the site
stays a Relu and the unit clip goes after the pool (the clip is monotone, so it commutes
with max): onnxruntime's NCHWc conv applies a fused Relu inside its kernel but any other
activation as a pass over the output, and the pooled tensor is smaller.

Scales are solved as one problem over (tensor, channel) pairs: ops that pass a channel
through unite its pairs into one class, and each class gets one scale. A class touching a
graph input or output, or an op that cannot carry a scale, keeps scale 1. Sites are folded
greedily: first those whose producer is a weight layer, then the largest activations; a
site whose class already has a scale that its bounds do not fit (two sites on one residual
stream with non-proportional bounds, a channel that an opaque op reads) falls back to `Min`,
with the reason reported. This is the positive-scaling equivariance that cross-layer
equalization uses (Nagel et al., 2019).

A channel with bound 0 is dead: its producer row is zeroed (when the site alone reads the
producer's output) or the consumers' matching columns are (when the site's output reaches
only weight layers through zero-preserving ops); otherwise the site keeps `Min`.

In a folded model, the tensors of a scaled class hold their original values divided by the
class scale (the graph's inputs and outputs never do). The original bounds, the form used per
site and the scale of every scaled site tensor are stored as JSON in the model's
metadata_props under `mmexport.bounds` (`read_fold_metadata`), which is what
`mmexport.rewrite.extract_bounds` reads back for folded sites.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from .bounds import FORMAT, Bounds, check_bounds_for_sites
from .errors import MmexportError
from .model import find_sites, is_unit_clip, onnx_opset
from .rewrite import (
    _CLIP_INPUTS_OPSET,
    BOUND_PREFIX,
    _insert_min,
    _keep_first_input,
    _lower_clip_max,
    _Namer,
    _relu_to_clip,
    _relu_to_unit_clip,
    _restore_model_fields,
    _site_node,
    _value_types,
    _write_site,
)

METADATA_KEY = "mmexport.bounds"
# Scales within this many ulps-ish of each other count as equal: bounds are float32.
_RTOL = 1e-6
# Folded weights are w / s * s': keep s far from float32 under/overflow.
_SCALE_RANGE = (1e-30, 1e30)

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


@dataclass(frozen=True)
class SiteForm:
    """How one bounded site was written.

    form: "fold" (a unit clip, the bound folded into neighbouring weights), "clip" (scalar
    Clip, nothing to fold: a scalar bound or an unscaled channel group) or "min" (a Min node
    with the per-channel bound). reason: why a site is "min"; dead: channels with bound 0;
    at: the tensor the clip writes when it moved past a MaxPool (the site stays a Relu).
    """

    site: str
    form: str
    reason: str = ""
    dead: int = 0
    at: str = ""


@dataclass
class FoldReport:
    """The form of every bounded site, in graph order."""

    sites: list[SiteForm] = field(default_factory=list)

    def __getitem__(self, site: str) -> SiteForm:
        for s in self.sites:
            if s.site == site:
                return s
        raise KeyError(site)

    def count(self, form: str) -> int:
        return sum(s.form == form for s in self.sites)

    @property
    def counts(self) -> dict[str, int]:
        return {f: self.count(f) for f in ("fold", "clip", "min")}

    @property
    def fallbacks(self) -> list[SiteForm]:
        """Sites left as Min: the ones that still cost latency."""
        return [s for s in self.sites if s.form == "min"]

    def to_json(self) -> dict:
        return {"counts": self.counts, "sites": [asdict(s) for s in self.sites]}

    def lines(self) -> list[str]:
        """One line per site: `<form>  <site>  (<reason>)`, for the CLI to print."""
        out = []
        for s in self.sites:
            extra = [s.reason] if s.reason else []
            if s.at:
                extra.append(f"clipped after max-pooling, at {s.at!r}")
            if s.dead:
                extra.append(f"{s.dead} dead channel(s)")
            out.append(f"{s.form:<4}  {s.site}" + (f"  ({'; '.join(extra)})" if extra else ""))
        return out


def fold_bounds(
    proto: onnx.ModelProto, bounds: Bounds, *, sites=None
) -> tuple[onnx.ModelProto, FoldReport]:
    """A new model with `bounds` folded into the weights where that is exact, Min elsewhere.

    Outputs equal those of `apply_bounds(..., form="min")` up to float rounding; `proto`
    is left untouched. Returns the model and the form used per bounded site.
    """
    shapes, elem_types = _value_types(proto)
    if sites is None:
        sites = find_sites(proto, shapes)
    check_bounds_for_sites(bounds, sites)
    graph = gs.import_onnx(proto)
    plan = _Plan(graph, shapes, proto)
    decisions = plan.solve(bounds)
    fresh = _Namer(set(graph.tensors()), {n.name for n in graph.nodes if n.name})
    report = _Writer(plan, fresh, elem_types, onnx_opset(proto)).write(decisions)

    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(out, proto)
    if report.count("fold"):
        _write_metadata(out, bounds, report, plan)
    return out, report


def read_fold_metadata(proto: onnx.ModelProto) -> dict | None:
    """The `mmexport.bounds` entry of a folded model: bounds, forms, scales; else None."""
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            try:
                obj = json.loads(p.value)
            except json.JSONDecodeError:
                raise MmexportError(f"metadata {METADATA_KEY!r}: not valid JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("bounds"), dict):
                raise MmexportError(f"metadata {METADATA_KEY!r}: no 'bounds' object")
            return obj
    return None


# --------------------------------------------------------------------------- analysis


class _Classes:
    """Union-find over (tensor, channel) pairs; the members of a class share one scale."""

    def __init__(self, channels: dict[str, int]):
        self.channels = channels
        self.first: dict[str, int] = {}
        self.parent: list[int] = []

    def elems(self, name: str) -> np.ndarray | None:
        c = self.channels.get(name)
        if c is None:
            return None
        if name not in self.first:
            self.first[name] = len(self.parent)
            self.parent.extend(range(len(self.parent), len(self.parent) + c))
        return np.arange(self.first[name], self.first[name] + c)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a, b) -> None:
        for x, y in zip(np.atleast_1d(a), np.atleast_1d(b), strict=True):
            rx, ry = self.find(int(x)), self.find(int(y))
            if rx != ry:
                self.parent[ry] = rx


@dataclass
class _Role:
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


@dataclass
class _Site:
    name: str
    node: gs.Node
    value: np.ndarray | None  # the bound as given ([C] or []), None for an unbounded ReLU6
    z: np.ndarray | None  # effective bound per channel, min(bound, Clip max); None: opaque
    order: int
    numel: int = 0
    fusable: bool = False  # its producer is a weight layer read only by the site

    @property
    def bounded(self) -> bool:
        return self.value is not None


@dataclass
class _Decision:
    """"fold": a scalar Clip(0, k) in scaled units; "min": a Min node; "as_before": the
    site cannot carry a scale (unknown shape, Clip max computed at run time)."""

    site: _Site
    form: str
    k: float = 1.0
    reason: str = ""
    dead: np.ndarray | None = None
    zero_rows: tuple | None = None  # (linear node, channels) whose output rows are zeroed
    zeroed: bool = False  # dead channels kept at 0 by zeroed weights (rows or columns)


class _Plan:
    """Channel classes of a graph, which of them must keep scale 1, and the chosen scales."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple], proto: onnx.ModelProto):
        self.graph = graph
        self.shapes = shapes
        self.opset = onnx_opset(proto)
        channels = {}
        for name, dims in shapes.items():
            if len(dims) >= 2 and isinstance(dims[1], int) and dims[1] > 0:
                channels[name] = dims[1]
        self.cls = _Classes(channels)
        self.roles: dict[int, _Role] = {}
        self.fixed: dict[int, str] = {}  # class root -> why it keeps scale 1
        self.assigned: dict[int, tuple[float, str]] = {}  # root -> (scale, who set it)
        self.sink_zero: dict[int, set] = {}  # id(linear node) -> input channels to zero
        self.graph_outputs = {t.name for t in graph.outputs}
        self._build(proto)

    # ---- building the classes

    def _build(self, proto: onnx.ModelProto) -> None:
        fix_requests: list[tuple[str, str]] = []
        inits = {i.name for i in proto.graph.initializer}
        for vi in proto.graph.input:
            if vi.name not in inits:
                fix_requests.append((vi.name, f"graph input {vi.name!r}"))
        for vi in proto.graph.output:
            fix_requests.append((vi.name, f"graph output {vi.name!r}"))
        for name in _outer_scope_names(proto.graph):
            fix_requests.append((name, f"a subgraph reading {name!r}"))
        for node in self.graph.nodes:
            role = self._role(node)
            self.roles[id(node)] = role
            if role.kind == "opaque":
                why = f"{node.op} node {node.name!r}" + (f" ({role.why})" if role.why else "")
                for t in list(node.inputs) + list(node.outputs):
                    if isinstance(t, gs.Variable) and t.name:
                        fix_requests.append((t.name, why))
            else:
                self._unite(node, role)
        for name, why in fix_requests:
            e = self.cls.elems(name)
            if e is not None:
                for i in e:
                    self.fixed.setdefault(self.cls.find(int(i)), why)
        for root, why in self.fixed.items():
            self.assigned[root] = (1.0, why)

    def _var(self, t) -> bool:
        return isinstance(t, gs.Variable) and bool(t.name) and _const(t) is None

    def _dims(self, t) -> tuple | None:
        dims = self.shapes.get(t.name) if t is not None else None
        return dims if dims else None

    def _role(self, node: gs.Node) -> _Role:
        op = node.op
        opaque = _Role("opaque")
        if op in _SHAPE_ONLY:
            return _Role("shape")
        ins = list(node.inputs)
        used_outs = [t for t in node.outputs if t.outputs or t.name in self.graph_outputs]
        if not node.outputs or any(t is not node.outputs[0] for t in used_outs):
            return _Role("opaque", why="uses a second output")
        if op in _ELEMENTWISE:
            return self._elementwise_role(node)
        if op in ("Mul", "Div"):
            return self._mulconst_role(node)
        if not ins or not self._var(ins[0]):
            return opaque
        x, y = ins[0], node.outputs[0]
        if self.cls.channels.get(x.name) is None or self.cls.channels.get(y.name) is None:
            return _Role("opaque", why="channel count unknown")
        if op in ("Relu", "Clip") or is_unit_clip(node):
            if op == "Clip" and not _is_relu_clip(node, self.opset):
                return _Role("opaque", why="not a Clip(0, constant)")
            return _Role("unary")
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

    def _mulconst_role(self, node: gs.Node) -> _Role:
        """x * c, c * x or x / c with c a finite constant: x's scale passes through."""
        ins, y = node.inputs, node.outputs[0]
        var = [i for i, t in enumerate(ins) if self._var(t)]
        if len(ins) != 2 or len(var) != 1 or (node.op == "Div" and var != [0]):
            return _Role("opaque", why="not a product with a constant")
        c = _const(ins[1 - var[0]])
        x = ins[var[0]]
        if c is None or not np.all(np.isfinite(c)):
            return _Role("opaque", why="not a product with a constant")
        if self.cls.channels.get(x.name) is None or self.cls.channels.get(y.name) is None:
            return _Role("opaque", why="channel count unknown")
        if self.cls.channels[x.name] != self.cls.channels[y.name]:
            return _Role("opaque", why="broadcasts over the channel axis")
        return _Role("mulconst", data=var[0])

    def _unary_role(self, node: gs.Node) -> _Role:
        op, x, y = node.op, node.inputs[0], node.outputs[0]
        if self.cls.channels[x.name] != self.cls.channels[y.name]:
            return _Role("opaque", why="changes the channel count")
        if op == "PRelu" and (len(node.inputs) < 2 or _const(node.inputs[1]) is None):
            return _Role("opaque", why="slope is not a constant")
        if op == "Dropout" and len(node.inputs) > 2 and node.inputs[2].name:
            mode = _const(node.inputs[2])
            if mode is None or bool(mode):
                return _Role("opaque", why="training mode")
        if op == "Pad":
            mode = node.attrs.get("mode", "constant")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            value, pads = node.attrs.get("value", 0.0), node.attrs.get("pads")
            if self.opset >= 11:
                value = 0.0
                if len(node.inputs) > 2 and node.inputs[2].name:
                    v = _const(node.inputs[2])
                    value = None if v is None else float(np.asarray(v).reshape(-1)[0])
                if len(node.inputs) > 3 and node.inputs[3].name:
                    return _Role("opaque", why="pads given per axis")
                pads = _const(node.inputs[1]) if len(node.inputs) > 1 else None
            if mode == "constant" and value != 0.0:
                return _Role("opaque", why="pads with a non-zero constant")
            pads = None if pads is None else [int(p) for p in np.asarray(pads).reshape(-1)]
            if not pads or len(pads) % 2 or any(pads[i] for i in (0, 1, len(pads) // 2,
                                                                 len(pads) // 2 + 1)):
                return _Role("opaque", why="pads the batch or channel axis")
        if op in ("Resize", "Upsample"):
            if not _same_leading(self._dims(node.inputs[0]), self._dims(node.outputs[0])):
                return _Role("opaque", why="resizes the batch or channel axis")
        if op.startswith("Reduce"):
            axes = node.attrs.get("axes")
            if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
                a = _const(node.inputs[1])
                axes = None if a is None else [int(v) for v in np.asarray(a).reshape(-1)]
            rank = len(self._dims(node.inputs[0]) or ())
            if not axes or not rank or any((a % rank) < 2 for a in axes):
                return _Role("opaque", why="reduces the batch or channel axis")
        return _Role("unary")

    def _reshape_role(self, node: gs.Node) -> _Role:
        if node.op == "Flatten" and node.attrs.get("axis", 1) != 1:
            return _Role("opaque", why="axis is not 1")
        d_in, d_out = self._dims(node.inputs[0]), self._dims(node.outputs[0])
        if not d_in or not d_out or len(d_in) < 2 or len(d_out) < 2:
            return _Role("opaque", why="shape unknown")
        rest_in, rest_out = d_in[1:], d_out[1:]
        if not all(isinstance(d, int) for d in rest_in + rest_out):
            return _Role("opaque", why="shape unknown")
        if int(np.prod(rest_in)) != int(np.prod(rest_out)):
            return _Role("opaque", why="mixes samples")
        return _Role("reshape", p_in=int(np.prod(rest_in[1:])), p_out=int(np.prod(rest_out[1:])))

    def _concat_role(self, node: gs.Node) -> _Role:
        rank = len(self._dims(node.outputs[0]) or ())
        if not rank:
            return _Role("opaque", why="shape unknown")
        axis = node.attrs.get("axis", 1) % rank
        for t in node.inputs:
            if not self._var(t) or self.cls.channels.get(t.name) is None:
                return _Role("opaque", why="concatenates a constant or an unknown shape")
        return _Role("concat", axis=axis)

    def _split_role(self, node: gs.Node) -> _Role:
        rank = len(self._dims(node.inputs[0]) or ())
        if not rank or any(self.cls.channels.get(t.name) is None for t in node.outputs):
            return _Role("opaque", why="shape unknown")
        return _Role("split", axis=node.attrs.get("axis", 0) % rank)

    def _elementwise_role(self, node: gs.Node) -> _Role:
        y = node.outputs[0]
        c_out = self.cls.channels.get(y.name)
        rank = len(self._dims(y) or ())
        if c_out is None or rank < 2:
            return _Role("opaque", why="shape unknown")
        consts, n_var = [], 0
        for i, t in enumerate(node.inputs):
            if self._var(t):
                n_var += 1
                d = self._dims(t)
                if not d or len(d) != rank or self.cls.channels.get(t.name) != c_out:
                    return _Role("opaque", why="broadcasts over the channel axis")
            else:
                c = _const(t)
                if c is None or c.ndim > rank or not np.all(np.isfinite(c)):
                    return _Role("opaque", why="operand is neither a tensor nor a constant")
                aligned = (1,) * (rank - c.ndim) + c.shape
                if aligned[1] not in (1, c_out):
                    return _Role("opaque", why="constant does not broadcast per channel")
                consts.append(i)
        if n_var == 0:
            return _Role("opaque", why="no variable input")
        return _Role("elementwise", consts=tuple(consts))

    def _linear_role(self, node: gs.Node) -> _Role:
        op, ins = node.op, node.inputs
        x, y = ins[0], node.outputs[0]
        cin, cout = self.cls.channels[x.name], self.cls.channels[y.name]
        w = _const(ins[1]) if len(ins) > 1 else None
        if w is None:
            return _Role("opaque", why="weights are not constant")
        if op == "Conv":
            g = int(node.attrs.get("group", 1))
            if w.ndim < 3 or w.shape[0] != cout or w.shape[1] * g != cin or cout % g:
                return _Role("opaque", why="weight shape")
            if len(ins) > 2 and ins[2].name and _const(ins[2]) is None:
                return _Role("opaque", why="bias is not constant")
        elif op in ("Gemm", "MatMul"):
            if len(self._dims(x) or ()) != 2 or w.ndim != 2:
                return _Role("opaque", why="not a 2-D product")
            if op == "Gemm" and node.attrs.get("transA", 0):
                return _Role("opaque", why="transA")
            k_axis = 1 if op == "Gemm" and node.attrs.get("transB", 0) else 0
            if w.shape[k_axis] != cin or w.shape[1 - k_axis] != cout:
                return _Role("opaque", why="weight shape")
            if op == "Gemm" and len(ins) > 2 and ins[2].name:
                c = _const(ins[2])
                if c is None or c.ndim > 2 or (c.ndim and c.shape[-1] not in (1, cout)):
                    return _Role("opaque", why="bias is not a per-output constant")
        else:  # BatchNormalization
            params = [_const(t) for t in ins[1:5]]
            if len(ins) < 5 or any(p is None or p.shape != (cin,) for p in params):
                return _Role("opaque", why="parameters are not constant")
            if node.attrs.get("training_mode", 0) or cin != cout:
                return _Role("opaque", why="training mode")
        return _Role("linear")

    def _unite(self, node: gs.Node, role: _Role) -> None:
        cls = self.cls
        if role.kind in ("unary", "mulconst"):
            cls.union(cls.elems(node.inputs[role.data].name), cls.elems(node.outputs[0].name))
        elif role.kind == "elementwise":
            out = cls.elems(node.outputs[0].name)
            for i, t in enumerate(node.inputs):
                if i not in role.consts:
                    cls.union(out, cls.elems(t.name))
        elif role.kind == "reshape":
            e_in, e_out = cls.elems(node.inputs[0].name), cls.elems(node.outputs[0].name)
            flat = np.arange(len(e_in) * role.p_in)
            pairs = np.unique(np.stack([flat // role.p_out, flat // role.p_in], 1), axis=0)
            cls.union(e_out[pairs[:, 0]], e_in[pairs[:, 1]])
        elif role.kind in ("concat", "split"):
            whole = node.outputs[0] if role.kind == "concat" else node.inputs[0]
            parts = node.inputs if role.kind == "concat" else node.outputs
            e_whole = cls.elems(whole.name)
            offset = 0
            for t in parts:
                e = cls.elems(t.name)
                if role.axis == 1:
                    cls.union(e_whole[offset : offset + len(e)], e)
                    offset += len(e)
                else:
                    cls.union(e_whole, e)

    # ---- helpers on classes

    def roots(self, name: str) -> list[int] | None:
        e = self.cls.elems(name)
        return None if e is None else [self.cls.find(int(i)) for i in e]

    def scales(self, name: str) -> np.ndarray | None:
        """The scale per channel a tensor carries (its values are the original / scale)."""
        r = self.roots(name)
        if r is None:
            return None
        return np.array([self.assigned.get(x, (1.0, ""))[0] for x in r], dtype=np.float64)

    # ---- choosing the scales

    def solve(self, bounds: Bounds) -> list[_Decision]:
        sites = self._sites(bounds)
        # Unbounded ReLU6 first: their scalar max pins their channels to one scale, as it is.
        # Then sites right after a weight layer, largest activation first.
        order = sorted(sites, key=lambda s: (s.bounded, not s.fusable, -s.numel, s.order))
        decisions = [self._decide(s) for s in order]
        return sorted((d for d in decisions if d.site.bounded), key=lambda d: d.site.order)

    def _sites(self, bounds: Bounds) -> list[_Site]:
        by_output = {n.outputs[0].name: n for n in self.graph.nodes if n.outputs}
        for name in bounds:
            _site_node(by_output, name)  # a clear error for a key that is no Relu / Clip
        out = []
        for order, node in enumerate(self.graph.nodes):
            if not (node.op in ("Relu", "Clip") or is_unit_clip(node)) or not node.outputs:
                continue
            name = node.outputs[0].name
            hi = _clip_max(node, self.opset) if node.op != "Relu" else np.inf
            value = bounds.values.get(name)
            if value is None and not np.isfinite(hi):
                continue  # a plain Relu: passes scales through, nothing to write
            if self.roles[id(node)].kind != "unary":
                if value is not None:
                    out.append(_Site(name, node, value, None, order))
                continue
            c = self.cls.channels[name]
            z = np.asarray(value, np.float64) if value is not None else np.float64(np.inf)
            z = np.minimum(np.broadcast_to(z, (c,)), hi).astype(np.float64)
            dims = self._dims(node.outputs[0]) or ()
            numel = int(np.prod([d for d in dims[1:] if isinstance(d, int)] or [c]))
            a = node.inputs[0]
            fusable = (
                len(a.inputs) == 1
                and len(a.outputs) == 1
                and self.roles[id(a.inputs[0])].kind == "linear"
            )
            out.append(_Site(name, node, value, z, order, numel, fusable))
        return out

    def _decide(self, site: _Site) -> _Decision:
        if site.z is None:
            return _Decision(site, "as_before")
        roots = self.roots(site.name)
        z = site.z
        plan, reason = self._ratio_plan(roots, z, range(len(z)))
        if plan is not None:
            return self._commit(site, plan)
        dead = np.flatnonzero(z == 0)
        if len(dead):
            plan, why = self._ratio_plan(roots, z, np.flatnonzero(z > 0))
            if plan is not None:
                zeroing, why = self._dead_plan(site, dead)
                if zeroing is not None:
                    return self._commit(site, plan, dead, zeroing)
                why = f"{len(dead)} dead channel(s) cannot be zeroed: {why}"
            reason = why
        return _Decision(site, "min", reason=reason, dead=dead if len(dead) else None)

    def _ratio_plan(self, roots, z, channels) -> tuple[tuple | None, str]:
        """(k, {root: scale}) making z / scale == k on `channels`, or (None, why not)."""
        per_root: dict[int, float] = {}
        for c in channels:
            r = roots[c]
            if r in per_root and not _close(per_root[r], z[c]):
                return None, "channels with different bounds are tied to one scale"
            per_root[r] = float(z[c])
        if not per_root:
            return (1.0, {}), ""
        ratios = [(zc / self.assigned[r][0], r) for r, zc in per_root.items() if r in self.assigned]
        if ratios:
            k = ratios[0][0]
            if any(not _close(q, k) for q, _ in ratios):
                return None, self._conflict({r for _, r in ratios})
        else:
            vals = list(per_root.values())
            k = vals[0] if all(_close(v, vals[0]) for v in vals) else 1.0
        new = {}
        for r, zc in per_root.items():
            if r in self.assigned:
                continue
            if k == 0.0:
                if zc != 0.0:
                    return None, "bound 0 and > 0 on one scale"
                new[r] = 1.0
                continue
            s = zc / k if zc != 0.0 else 0.0
            if s == 0.0:
                return None, "dead channels"
            if not _SCALE_RANGE[0] <= s <= _SCALE_RANGE[1]:
                return None, "bounds span too many orders of magnitude for float32 weights"
            new[r] = s
        return (k, new), ""

    def _conflict(self, roots) -> str:
        """Why the scales already on `roots` do not fit a site's bounds."""
        sites = sorted({self.assigned[r][1] for r in roots if r not in self.fixed})
        if sites:
            return (
                f"shares the scale of its channels with {', '.join(sites[:3])} (a residual Add, "
                "Concat or shared producer) and their bounds are not proportional"
            )
        fixed = sorted({self.fixed[r] for r in roots if r in self.fixed})
        return "its channels must keep their scale: read by " + ", ".join(fixed[:3])

    def _commit(self, site, plan, dead=None, zeroing=None) -> _Decision:
        k, new = plan
        for r, s in new.items():
            owner = "site" if site.bounded else "the Clip max of"
            self.assigned[r] = (s, f"{owner} {site.name!r}")
        zero_rows = None
        if zeroing is not None:
            kind, payload = zeroing
            if kind == "rows":
                zero_rows = (payload, dead)
            else:
                for node, chans in payload:
                    self.sink_zero.setdefault(id(node), set()).update(chans)
        return _Decision(site, "fold", k=k, dead=dead, zero_rows=zero_rows,
                         zeroed=zeroing is not None)

    def _dead_plan(self, site: _Site, dead: np.ndarray):
        """How to keep dead channels at 0 with a scalar Clip: ("rows", producer) or
        ("columns", [(consumer, channels)]), or (None, why not)."""
        a = site.node.inputs[0]
        prod = a.inputs[0] if len(a.inputs) == 1 else None
        if (
            prod is not None
            and len(a.outputs) == 1
            and a.name not in self.graph_outputs
            and self.roles[id(prod)].kind == "linear"
        ):
            return ("rows", prod), ""
        # Else the site's output must reach only weight layers, through ops that keep 0 at 0.
        sinks: dict[int, tuple] = {}
        zeros: dict[str, set] = {}  # tensor -> its channels that hold a dead channel's value
        stack = [(site.node.outputs[0], frozenset(int(c) for c in dead))]
        while stack:
            t, zs = stack.pop()
            new = set(zs) - zeros.get(t.name, set())
            if not new:
                continue
            # A tensor reached again (a Concat of two paths) passes on the union.
            zs = frozenset(zeros.setdefault(t.name, set()).union(new))
            zeros[t.name] |= new
            if t.name in self.graph_outputs:
                return None, f"it reaches graph output {t.name!r}"
            for n in t.outputs:
                role = self.roles[id(n)]
                if role.kind == "shape":
                    continue
                passes = role.kind == "concat" or (
                    role.kind in ("unary", "mulconst", "reshape", "split", "linear")
                    and n.inputs[role.data] is t
                )
                if not passes:
                    return None, f"{n.op} node {n.name!r} mixes them with other values"
                if role.kind == "linear":
                    sinks[id(n)] = (n, zs)
                elif role.kind in ("unary", "mulconst"):
                    stack.append((n.outputs[0], zs))
                elif role.kind == "reshape":
                    c_out = self.cls.channels[n.outputs[0].name]
                    # An output channel is 0 when every element it holds came from a dead one.
                    keep = set()
                    for j in range(c_out):
                        lo, hi = j * role.p_out, (j + 1) * role.p_out
                        srcs = set(range(lo // role.p_in, (hi - 1) // role.p_in + 1))
                        if srcs <= zs:
                            keep.add(j)
                    stack.append((n.outputs[0], frozenset(keep)))
                elif role.kind == "concat":
                    if role.axis != 1:
                        return None, f"Concat node {n.name!r} mixes them with other values"
                    off = 0
                    for inp in n.inputs:
                        if inp is t:
                            break
                        off += self.cls.channels[inp.name]
                    stack.append((n.outputs[0], frozenset(c + off for c in zs)))
                else:  # split
                    off = 0
                    for out in n.outputs:
                        c = self.cls.channels[out.name]
                        part = {x - off for x in zs if off <= x < off + c} if role.axis == 1 else zs
                        stack.append((out, frozenset(part)))
                        off += c
        return ("columns", list(sinks.values())), ""


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _RTOL * max(abs(a), abs(b))


def _same_leading(d_in, d_out) -> bool:
    return bool(d_in) and bool(d_out) and len(d_in) == len(d_out) and d_in[:2] == d_out[:2]


def _const(t) -> np.ndarray | None:
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


def _clip_max(node: gs.Node, opset: int) -> float:
    if node.op == "HardSigmoid":  # a unit clip
        return 1.0
    if opset < _CLIP_INPUTS_OPSET:
        return float(node.attrs.get("max", np.inf))
    if len(node.inputs) > 2 and node.inputs[2].name:
        v = _const(node.inputs[2])
        return float(v) if v is not None else np.nan
    return np.inf


def _is_relu_clip(node: gs.Node, opset: int) -> bool:
    """A Clip with min exactly 0 and a constant (or no) max, or a unit clip."""
    if is_unit_clip(node):
        return True
    if opset < _CLIP_INPUTS_OPSET:
        lo = node.attrs.get("min", -np.inf)
    else:
        lo = -np.inf
        if len(node.inputs) > 1 and node.inputs[1].name:
            v = _const(node.inputs[1])
            lo = float(v) if v is not None else np.nan
    return lo == 0.0 and not np.isnan(_clip_max(node, opset))


def _outer_scope_names(graph: onnx.GraphProto) -> set[str]:
    """Tensors that nodes inside subgraphs (If, Loop, Scan) read from the outer graph."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                for n in sub.node:
                    names.update(i for i in n.input if i)
                names |= _outer_scope_names(sub)
    return names


# --------------------------------------------------------------------------- writing


class _Writer:
    """Applies a solved plan: new weights, Clip or Min at each site."""

    def __init__(self, plan: _Plan, fresh: _Namer, elem_types: dict, opset: int):
        self.plan = plan
        self.fresh = fresh
        self.elem_types = elem_types
        self.opset = opset
        self.uses: dict[int, int] = {}
        for node in plan.graph.nodes:
            for t in node.inputs:
                self.uses[id(t)] = self.uses.get(id(t), 0) + 1

    def write(self, decisions: list[_Decision]) -> FoldReport:
        plan = self.plan
        zero_rows = {}
        for d in decisions:
            if d.zero_rows is not None:
                node, chans = d.zero_rows
                zero_rows.setdefault(id(node), set()).update(int(c) for c in chans)
        for node in list(plan.graph.nodes):
            role = plan.roles[id(node)]
            if role.kind == "linear":
                self._linear(node, zero_rows.get(id(node), set()))
            elif role.kind == "elementwise" and role.consts:
                self._elementwise_consts(node, role)
        return FoldReport([self._site(d) for d in decisions])

    def _set_const(self, node: gs.Node, idx: int, value: np.ndarray, dtype) -> None:
        """Give input `idx` a new value without touching other readers of the old one."""
        t = node.inputs[idx]
        value = np.ascontiguousarray(value.astype(dtype))
        if isinstance(t, gs.Constant) and self.uses.get(id(t), 0) == 1:
            t.values = value
            return
        node.inputs[idx] = gs.Constant(self.fresh(t.name + "/folded"), values=value)

    def _linear(self, node: gs.Node, rows: set) -> None:
        plan = self.plan
        m = plan.scales(node.inputs[0].name)
        s = plan.scales(node.outputs[0].name)
        cols = plan.sink_zero.get(id(node), set())
        if np.all(m == 1.0) and np.all(s == 1.0) and not rows and not cols:
            return
        if cols:
            m[sorted(cols)] = 0.0
        rows = sorted(rows)
        w0 = _const(node.inputs[1])
        w = w0.astype(np.float64)
        if node.op == "Conv":
            g = int(node.attrs.get("group", 1))
            cout, cin_g = w.shape[0], w.shape[1]
            group = np.arange(cout) // (cout // g)
            mult = m[group[:, None] * cin_g + np.arange(cin_g)[None, :]]
            w = w * mult.reshape(mult.shape + (1,) * (w.ndim - 2))
            w = w / s.reshape((-1,) + (1,) * (w.ndim - 1))
            w[rows] = 0.0
            self._set_const(node, 1, w, w0.dtype)
            if len(node.inputs) > 2 and node.inputs[2].name:
                b0 = _const(node.inputs[2])
                b = b0.astype(np.float64) / s
                b[rows] = 0.0
                self._set_const(node, 2, b, b0.dtype)
        elif node.op in ("Gemm", "MatMul"):
            trans = node.op == "Gemm" and node.attrs.get("transB", 0)
            wk = w.T if trans else w  # [K, N]
            wk = wk * m[:, None] / s[None, :]
            wk[:, rows] = 0.0
            self._set_const(node, 1, wk.T if trans else wk, w0.dtype)
            if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
                c0 = _const(node.inputs[2])
                c = c0.astype(np.float64)
                c = np.broadcast_to(c, (c.shape[:-1] if c.ndim else ()) + (len(s),)) / s
                c[..., rows] = 0.0
                self._set_const(node, 2, c, c0.dtype)
        else:  # BatchNormalization, y = gamma (x - mean) / sqrt(var + eps) + beta
            gamma0, beta0, mean0, var0 = (_const(t) for t in node.inputs[1:5])
            gamma, beta, mean = (v.astype(np.float64) for v in (gamma0, beta0, mean0))
            if np.all(m > 0):
                new_mean = mean / m
            else:  # an input channel multiplied by 0: fold the mean into beta instead
                sigma = np.sqrt(var0.astype(np.float64) + float(node.attrs.get("epsilon", 1e-5)))
                beta = beta - gamma * mean / sigma
                new_mean = np.zeros_like(mean)
            gamma, beta = gamma * m / s, beta / s
            gamma[rows] = 0.0
            beta[rows] = 0.0
            self._set_const(node, 1, gamma, gamma0.dtype)
            self._set_const(node, 2, beta, beta0.dtype)
            self._set_const(node, 3, new_mean, mean0.dtype)

    def _elementwise_consts(self, node: gs.Node, role: _Role) -> None:
        s = self.plan.scales(node.outputs[0].name)
        if np.all(s == 1.0):
            return
        rank = len(self.plan.shapes[node.outputs[0].name])
        for i in role.consts:
            c0 = _const(node.inputs[i])
            c = c0.astype(np.float64).reshape((1,) * (rank - c0.ndim) + c0.shape)
            if c.shape[1] != len(s):
                c = np.repeat(c, len(s), axis=1)
            c = c / s.reshape((1, -1) + (1,) * (rank - 2))
            self._set_const(node, i, c, c0.dtype)

    def _unit_clip(self, node: gs.Node) -> str:
        """Bound a site at 1, after the MaxPools that alone read it where there are some.

        clip(maxpool(relu(a))) = maxpool(clip(relu(a))): the clip is monotone. onnxruntime's
        NCHWc conv applies a fused Relu inside its kernel but any other activation as a pass
        over the output, so the site stays a Relu and the clip runs on the pooled tensor
        (4x smaller after a 2x2 pool): +19% -> +4% latency on digits-cnn-badnet at batch 64.
        Returns the tensor the clip now writes ("" when it stayed at the site).
        """
        outputs = {t.name for t in self.plan.graph.outputs}
        pool, t = _pooled_by(node.outputs[0], outputs), None
        while pool is not None:
            t = pool.outputs[0]
            pool = _pooled_by(t, outputs)
        if t is None:
            _relu_to_unit_clip(node, self.fresh)
            return ""
        if node.op != "Relu":  # a ReLU6 site: its max is 1 in scaled units, the clip says so
            node.op = "Relu"
            _keep_first_input(node)
            node.attrs.clear()
        raw = gs.Variable(self.fresh(t.name + "/unbounded"), dtype=t.dtype, shape=t.shape)
        t.inputs[0].outputs[0] = raw
        clip = gs.Node("Relu", inputs=[raw], outputs=[t])
        _relu_to_unit_clip(clip, self.fresh)
        clip.name = self.fresh(BOUND_PREFIX + node.outputs[0].name, "node")
        self.plan.graph.nodes.append(clip)
        return t.name

    def _site(self, d: _Decision) -> SiteForm:
        site, node = d.site, d.site.node
        t = node.outputs[0]
        dtype = helper.tensor_dtype_to_np_dtype(self.elem_types.get(t.name, onnx.TensorProto.FLOAT))
        dead = int(np.sum((site.z if site.z is not None else np.atleast_1d(site.value)) == 0))
        s = self.plan.scales(t.name)
        if d.form == "fold":
            at = ""
            if d.k == 1.0:
                at = self._unit_clip(node)
            elif node.op == "Relu":
                _relu_to_clip(node, d.k, dtype, self.fresh, self.opset)
            else:
                _lower_clip_max(node, d.k, dtype, self.fresh, self.opset)
            scaled = not np.all(s == 1.0) or d.zeroed
            return SiteForm(site.name, "fold" if scaled else "clip", "", dead, at)
        rank = len(self.plan.shapes.get(t.name) or ())
        if d.form == "as_before" or np.all(s == 1.0):
            # Unscaled channels: exactly the unfolded rewrite (mmexport.rewrite).
            hi = _clip_max(node, self.opset) if node.op != "Relu" else np.inf
            form = _write_site(self.plan.graph, node, site.value, rank=rank, dtype=dtype,
                               clip_hi=hi, fresh=self.fresh, opset=self.opset)
            reason = d.reason or "the site cannot carry a per-channel scale"
            return SiteForm(site.name, form, reason if form == "min" else "", dead)
        if node.op != "Relu":  # a scalar max cannot stay on scaled channels: it joins the Min
            node.op = "Relu"
            _keep_first_input(node)
            node.attrs.clear()
        z = (site.z / s).reshape((-1,) + (1,) * (rank - 2))
        _insert_min(self.plan.graph, node, z.astype(dtype), self.fresh, self.opset)
        return SiteForm(site.name, "min", d.reason, dead)


def _pooled_by(t: gs.Variable, graph_outputs: set) -> gs.Node | None:
    """The MaxPool that alone reads `t`, if one does (and `t` is no graph output)."""
    if t.name in graph_outputs or len(t.outputs) != 1:
        return None
    pool = t.outputs[0]
    if pool.op != "MaxPool" or len(pool.outputs) != 1 or pool.inputs[0] is not t:
        return None
    return pool


def _write_metadata(out: onnx.ModelProto, bounds: Bounds, report: FoldReport, plan: _Plan) -> None:
    scales = {}
    for node in plan.graph.nodes:
        if node.op in ("Relu", "Clip", "HardSigmoid", "Min") and node.outputs:
            name = node.outputs[0].name
            s = plan.scales(name)
            if s is not None and not np.all(s == 1.0) and name in plan.cls.channels:
                scales[name] = [float(v) for v in s]
    entry = {
        "format": FORMAT,
        "meta": bounds.meta,
        "bounds": {k: v.tolist() for k, v in bounds.items()},
        "forms": {s.site: s.form for s in report.sites},
        "at": {s.site: s.at for s in report.sites if s.at},
        "scales": scales,
    }
    keep = [p for p in out.metadata_props if p.key != METADATA_KEY]
    del out.metadata_props[:]
    out.metadata_props.extend(keep)
    out.metadata_props.add(key=METADATA_KEY, value=json.dumps(entry, separators=(",", ":")))
