"""Write bounds into an ONNX graph with onnx-graphsurgeon; no torch needed.

Two edits, both keeping the site's tensor name so every consumer and graph output still
reads it:

- a per-channel bound ([C]) renames the site's output to `<t>/unbounded` and adds
  `Min(<t>/unbounded, Z) -> <t>`, Z shaped [C, 1, ...] to broadcast over the activation;
- a scalar bound turns a Relu into `Clip(x, 0, z)`, or lowers the max of a ReLU6 Clip; after
  any other activation (LeakyRelu, GELU, SiLU, ...) it is a `Min` with a scalar too.

These are the unfolded form (`form="min"`). The default form folds per-channel bounds into
the neighbouring weights so the site is a unit clip, `HardSigmoid(alpha=1, beta=0)` =
clip(x, 0, 1) exactly, that onnxruntime fuses into the Conv or Gemm before it (mmexport.fold),
writing `Min` only where no exact folding exists: always after an activation that is not
positively homogeneous (`mmexport.core.sites.FOLDABLE`).

Everything mmexport adds is named `mmexport/bound/<t>` (nodes and initializers), so a
hardened model can be recognised and its bounds read back (`count_bounded_sites`,
`extract_bounds`); a folded model also records its original bounds, the form per site and
the channel scales in metadata_props `mmexport.bounds`.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from ..core.bounds import Bounds, check_bounds_for_sites
from ..core.errors import MmexportError
from ..core.model import find_sites, onnx_opset
from ..core.sites import site_max
from .edit import BOUND_PREFIX, Namer, restore_model_fields, site_node, value_types, write_site

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

    `sites` defaults to every site of the model (mmexport.core.sites.find_sites);
    each bound key must name one of them and a per-channel bound must match its channels.

    `form`: "auto" and "fold" fold per-channel bounds into the neighbouring weights where
    that is exact and write `Min` elsewhere (mmexport.fold; both the same today, "auto" is
    the default the CLI shows as "fold where exact"); "min" always writes `Min` (the
    unfolded form, whose intermediate tensors keep their original values). Scalar bounds
    are a `Clip` in every form on a ReLU, a `Min` after other activations. With
    `report=True` returns `(model, FoldReport)`, the form used per site and why a site
    could not fold.
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
    from .fold.report import FoldReport, SiteForm

    shapes, elem_types = value_types(proto)
    if sites is None:
        sites = find_sites(proto, shapes)
    check_bounds_for_sites(bounds, sites)
    by_name = {s.name: s for s in sites}
    opset = onnx_opset(proto)
    site_nodes = {node.output[0]: node for node in proto.graph.node if node.output}

    graph = gs.import_onnx(proto)
    producers = {n.outputs[0].name: n for n in graph.nodes if n.outputs}
    fresh = Namer(set(graph.tensors()), {n.name for n in graph.nodes if n.name})

    forms = {}
    for name, value in bounds.items():
        node = site_node(producers, name)
        dtype = helper.tensor_dtype_to_np_dtype(elem_types.get(name, onnx.TensorProto.FLOAT))
        rank = by_name[name].rank or len(node.outputs[0].shape or ())
        hi = site_max(proto.graph, site_nodes[name], opset)
        forms[name] = write_site(graph, node, value, rank=rank, dtype=dtype, clip_hi=hi,
                                  fresh=fresh, opset=opset, axis=by_name[name].axis)

    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    restore_model_fields(out, proto)
    order = [s.name for s in find_sites(proto, shapes)]
    names = sorted(forms, key=lambda n: order.index(n) if n in order else len(order))
    return out, FoldReport([SiteForm(n, forms[n], "form 'min' requested" if forms[n] == "min"
                                     else "") for n in names])


def _bound_nodes(proto: onnx.ModelProto):
    """The nodes that write bounds, in subgraphs too (a gated MMDF graph holds them in an If)."""
    return [
        n
        for n in all_nodes(proto.graph)
        if n.name.startswith(BOUND_PREFIX) and n.op_type in ("Min", "Clip", "HardSigmoid") and n.output
    ]


def bound_tensors(proto: onnx.ModelProto) -> set[str]:
    """The initializers mmexport's bound nodes read (a Min's bound, a Clip's limits): what a
    fine-tune of a hardened model leaves as it is."""
    inits = {i.name for i in proto.graph.initializer}
    return {name for n in _bound_nodes(proto) for name in n.input[1:] if name in inits}


def all_nodes(graph: onnx.GraphProto):
    """Every node of `graph`, those of its subgraphs (If, Loop, Scan) included."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from all_nodes(g)


def _folded_forms(proto: onnx.ModelProto) -> tuple[dict, dict, dict]:
    """(forms, bounds, site by bound tensor) a folded model records in metadata_props; empty
    for other models. A bound moved past a MaxPool writes the pool's tensor, not the site."""
    from .fold.report import read_fold_metadata

    meta = read_fold_metadata(proto)
    if meta is None:
        return {}, {}, {}
    site_of = {t: site for site, t in dict(meta.get("at", {})).items()}
    return dict(meta.get("forms", {})), dict(meta["bounds"]), site_of


def count_bounded_sites(proto: onnx.ModelProto) -> dict:
    """How many bounds mmexport wrote: {'total', 'min' (Min nodes), 'clip' (scalar Clips),
    'fold' (Clips, unit clips or, after a LeakyRelu / PRelu, scalar Mins whose per-channel
    bound is folded into the weights), 'sites'}."""
    nodes = _bound_nodes(proto)
    forms, _, site_of = _folded_forms(proto)
    sites = [site_of.get(n.output[0], n.output[0]) for n in nodes]
    folded = [forms.get(s) == "fold" for s in sites]
    return {
        "total": len(nodes),
        "min": sum(n.op_type == "Min" and not f for n, f in zip(nodes, folded, strict=True)),
        "clip": sum(n.op_type != "Min" and not f for n, f in zip(nodes, folded, strict=True)),
        "fold": sum(folded),
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
