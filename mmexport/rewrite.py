"""Write bounds into an ONNX graph with onnx-graphsurgeon; no torch needed.

Two edits, both keeping the site's tensor name so every consumer and graph output still
reads it:

- a per-channel bound ([C]) renames the site's output to `<t>/unbounded` and adds
  `Min(<t>/unbounded, Z) -> <t>`, Z shaped [C, 1, ...] to broadcast over the activation;
- a scalar bound turns a Relu into `Clip(x, 0, z)`, or lowers the max of a ReLU6 Clip.

These are the unfolded form (`form="min"`). The default form folds per-channel bounds into
the neighbouring weights so the site is a unit clip, `HardSigmoid(alpha=1, beta=0)` =
clip(x, 0, 1) exactly, that onnxruntime fuses into the Conv or Gemm before it (mmexport.fold),
writing `Min` only where no exact folding exists.

Everything mmexport adds is named `mmexport/bound/<t>` (nodes and initializers), so a
hardened model can be recognised and its bounds read back (`count_bounded_sites`,
`extract_bounds`); a folded model also records its original bounds, the form per site and
the channel scales in metadata_props `mmexport.bounds`.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper, shape_inference

from .bounds import Bounds, check_bounds_for_sites
from .errors import MmexportError
from .model import _dims, find_sites, is_unit_clip, onnx_opset, site_max

BOUND_PREFIX = "mmexport/bound/"

# Min broadcasts (multidirectionally) from opset 8; earlier Min needs equal shapes.
_MIN_BROADCAST_OPSET = 8
# Clip takes min/max as inputs from opset 11, as attributes before.
_CLIP_INPUTS_OPSET = 11


FORMS = ("auto", "fold", "min")


def apply_bounds(
    proto: onnx.ModelProto,
    bounds: Bounds,
    *,
    sites=None,
    form: str = "auto",
    report: bool = False,
):
    """A new model with `bounds` written in; `proto` itself is left untouched.

    `sites` defaults to every Relu / Clip(min=0) of the model (mmexport.model.find_sites);
    each bound key must name one of them and a per-channel bound must match its channels.

    `form`: "auto" and "fold" fold per-channel bounds into the neighbouring weights where
    that is exact and write `Min` elsewhere (mmexport.fold; both the same today, "auto" is
    the default the CLI shows as "fold where exact"); "min" always writes `Min` (the
    unfolded form, whose intermediate tensors keep their original values). Scalar bounds
    are a `Clip` in every form. With `report=True` returns `(model, FoldReport)`, the form
    used per site and why a site could not fold.
    """
    if form not in FORMS:
        raise MmexportError(f"form {form!r}: expected one of {', '.join(FORMS)}")
    if form == "min":
        out, rep = _apply_unfolded(proto, bounds, sites)
    else:
        from .fold import fold_bounds

        out, rep = fold_bounds(proto, bounds, sites=sites)
    return (out, rep) if report else out


def _apply_unfolded(proto: onnx.ModelProto, bounds: Bounds, sites):
    from .fold import FoldReport, SiteForm

    shapes, elem_types = _value_types(proto)
    if sites is None:
        sites = find_sites(proto, shapes)
    check_bounds_for_sites(bounds, sites)
    by_name = {s.name: s for s in sites}
    opset = onnx_opset(proto)
    site_nodes = {node.output[0]: node for node in proto.graph.node if node.output}

    graph = gs.import_onnx(proto)
    producers = {n.outputs[0].name: n for n in graph.nodes if n.outputs}
    fresh = _Namer(set(graph.tensors()), {n.name for n in graph.nodes if n.name})

    forms = {}
    for name, value in bounds.items():
        node = _site_node(producers, name)
        dtype = helper.tensor_dtype_to_np_dtype(elem_types.get(name, onnx.TensorProto.FLOAT))
        rank = by_name[name].rank or len(node.outputs[0].shape or ())
        hi = site_max(proto.graph, site_nodes[name], opset)
        forms[name] = _write_site(graph, node, value, rank=rank, dtype=dtype, clip_hi=hi,
                                  fresh=fresh, opset=opset)

    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(out, proto)
    order = [s.name for s in find_sites(proto, shapes)]
    names = sorted(forms, key=lambda n: order.index(n) if n in order else len(order))
    return out, FoldReport([SiteForm(n, forms[n], "form 'min' requested" if forms[n] == "min"
                                     else "") for n in names])


def _site_node(producers: dict, name: str) -> gs.Node:
    node = producers.get(name)
    if node is None or not (node.op in ("Relu", "Clip") or is_unit_clip(node)):
        found = node.op if node is not None else "no node"
        raise MmexportError(f"site {name!r}: produced by {found}, expected Relu or Clip")
    return node


def _write_site(graph, node, value, *, rank, dtype, clip_hi, fresh, opset) -> str:
    """The unfolded edit of one site; returns its form, "min" or "clip".

    Per-channel: `Min` after the site. Scalar: a Relu becomes `Clip(0, z)`, a ReLU6 gets
    a lower max (or a scalar `Min` when its max is computed at run time).
    """
    if value.ndim == 1:
        if not rank or rank < 2:
            raise MmexportError(
                f"site {node.outputs[0].name!r}: activation rank unknown or < 2, cannot "
                f"place {value.shape[0]} per-channel bounds on axis 1"
            )
        z = value.reshape((value.shape[0],) + (1,) * (rank - 2)).astype(dtype)
        _insert_min(graph, node, z, fresh, opset)
        return "min"
    if node.op == "Relu":
        _relu_to_clip(node, float(value), dtype, fresh, opset)
        return "clip"
    if np.isnan(clip_hi):  # max computed at run time: bound after it instead
        _insert_min(graph, node, value.astype(dtype), fresh, opset)
        return "min"
    _lower_clip_max(node, min(clip_hi, float(value)), dtype, fresh, opset)
    return "clip"


class _Namer:
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


def _value_types(proto: onnx.ModelProto) -> tuple[dict[str, tuple], dict[str, int]]:
    """Shapes and element types of every tensor shape inference can tell."""
    try:
        inferred = shape_inference.infer_shapes(proto)
    except Exception:
        inferred = proto
    g = inferred.graph
    shapes, types = {}, {}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        shapes[vi.name] = _dims(vi)
        if vi.type.tensor_type.elem_type:
            types[vi.name] = vi.type.tensor_type.elem_type
    return shapes, types


def _insert_min(graph: gs.Graph, node: gs.Node, z: np.ndarray, fresh, opset: int) -> None:
    """`node -> t` becomes `node -> t/unbounded -> Min(., z) -> t`."""
    if opset < _MIN_BROADCAST_OPSET:
        raise MmexportError(
            f"site {node.outputs[0].name!r}: a per-channel bound needs opset >= "
            f"{_MIN_BROADCAST_OPSET} (broadcasting Min); the model has opset {opset}"
        )
    t = node.outputs[0]
    raw = gs.Variable(fresh(t.name + "/unbounded"), dtype=t.dtype, shape=t.shape)
    node.outputs[0] = raw
    bound = gs.Constant(fresh(BOUND_PREFIX + t.name), values=z)
    name = fresh(BOUND_PREFIX + t.name, "node")
    graph.nodes.append(gs.Node("Min", name=name, inputs=[raw, bound], outputs=[t]))


def _relu_to_clip(node: gs.Node, z: float, dtype, fresh, opset: int) -> None:
    t = node.outputs[0].name
    node.op = "Clip"
    node.name = fresh(BOUND_PREFIX + t, "node")
    node.attrs.clear()  # Relu < 6 had consumed_inputs
    if opset < _CLIP_INPUTS_OPSET:
        node.attrs["min"] = 0.0
        node.attrs["max"] = z
    else:
        node.inputs.append(gs.Constant(fresh(BOUND_PREFIX + t + "/min"), np.array(0, dtype)))
        node.inputs.append(gs.Constant(fresh(BOUND_PREFIX + t + "/max"), np.array(z, dtype)))


def _relu_to_unit_clip(node: gs.Node, fresh) -> None:
    """Relu or Clip -> HardSigmoid(alpha=1, beta=0) = clip(x, 0, 1), exactly: onnxruntime
    fuses it into a Conv (also after a residual Add) and a Gemm, where it fuses no Clip."""
    t = node.outputs[0].name
    node.op = "HardSigmoid"
    node.name = fresh(BOUND_PREFIX + t, "node")
    _keep_first_input(node)
    node.attrs.clear()
    node.attrs["alpha"] = 1.0
    node.attrs["beta"] = 0.0


def _keep_first_input(node: gs.Node) -> None:
    # graphsurgeon's input list keeps tensors' consumer lists in step; it has no slice delete.
    while len(node.inputs) > 1:
        node.inputs.pop()


def _lower_clip_max(node: gs.Node, hi: float, dtype, fresh, opset: int) -> None:
    t = node.outputs[0].name
    if node.op == "HardSigmoid":  # a unit clip: becomes Clip(0, hi)
        _relu_to_clip(node, hi, dtype, fresh, opset)
        return
    node.name = fresh(BOUND_PREFIX + t, "node")
    if opset < _CLIP_INPUTS_OPSET:
        node.attrs["max"] = hi
        return
    # A new initializer, never an edit of the old one: other Clips may share it.
    new_max = gs.Constant(fresh(BOUND_PREFIX + t + "/max"), np.array(hi, dtype))
    if len(node.inputs) > 2:
        node.inputs[2] = new_max
    else:
        node.inputs.append(new_max)


def _restore_model_fields(out: onnx.ModelProto, src: onnx.ModelProto) -> None:
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


def _bound_nodes(proto: onnx.ModelProto):
    return [
        n
        for n in proto.graph.node
        if n.name.startswith(BOUND_PREFIX) and n.op_type in ("Min", "Clip", "HardSigmoid") and n.output
    ]


def _folded_forms(proto: onnx.ModelProto) -> tuple[dict, dict, dict]:
    """(forms, bounds, site by bound tensor) a folded model records in metadata_props; empty
    for other models. A bound moved past a MaxPool writes the pool's tensor, not the site."""
    from .fold import read_fold_metadata

    meta = read_fold_metadata(proto)
    if meta is None:
        return {}, {}, {}
    site_of = {t: site for site, t in dict(meta.get("at", {})).items()}
    return dict(meta.get("forms", {})), dict(meta["bounds"]), site_of


def count_bounded_sites(proto: onnx.ModelProto) -> dict:
    """How many bounds mmexport wrote: {'total', 'min' (Min nodes), 'clip' (scalar Clips),
    'fold' (Clips / unit clips whose per-channel bound is folded into the weights), 'sites'}."""
    nodes = _bound_nodes(proto)
    forms, _, site_of = _folded_forms(proto)
    sites = [site_of.get(n.output[0], n.output[0]) for n in nodes]
    scalar = [s for n, s in zip(nodes, sites, strict=True) if n.op_type in ("Clip", "HardSigmoid")]
    folded = [s for s in scalar if forms.get(s) == "fold"]
    return {
        "total": len(nodes),
        "min": sum(n.op_type == "Min" for n in nodes),
        "clip": len(scalar) - len(folded),
        "fold": len(folded),
        "sites": sites,
    }


def extract_bounds(proto: onnx.ModelProto) -> Bounds:
    """Read back the bounds mmexport wrote, keyed by site tensor name (per-channel as [C]).

    In a folded model the graph holds bounds in scaled units (Clip(0, 1), Min with z / s);
    the original bounds of every site are read from its `mmexport.bounds` metadata.
    """
    inits = {i.name: i for i in proto.graph.initializer}
    opset = onnx_opset(proto)
    _, recorded, site_of = _folded_forms(proto)
    values = {}
    for node in _bound_nodes(proto):
        site = site_of.get(node.output[0], node.output[0])
        if site in recorded:
            values[site] = np.asarray(recorded[site], dtype=np.float32)
            continue
        if node.op_type in ("Clip", "HardSigmoid"):
            values[site] = np.float32(site_max(proto.graph, node, opset))
            continue
        z = next((inits[i] for i in node.input if i in inits), None)
        if z is None:
            raise MmexportError(f"node {node.name!r}: its bound is not an initializer")
        arr = numpy_helper.to_array(z).astype(np.float32)
        values[site] = arr.reshape(()) if arr.ndim == 0 else arr.reshape(arr.shape[0])
    return Bounds(values, {"source": "model"})
