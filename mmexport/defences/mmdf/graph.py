"""The MMDF graph: the original model, a bounded branch sharing its weights, and the decision.

Torch-free. The bounded branch duplicates only the nodes that depend on a bounded site and
reads the very same weight initializers, so the file grows by a few nodes, not by a second
copy of the weights. Bounds are written unfolded (`Min` / `Clip`): folding them would rescale
weights the original branch shares.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from ...core.bounds import Bounds, check_bounds_for_sites
from ...core.errors import MmexportError
from ...core.model import onnx_opset
from ...core.provenance import get_metadata
from ...core.sites import NO_SITES, site_max
from ...graph.edit import (
    BOUND_PREFIX,
    Namer,
    channel_bound,
    restore_model_fields,
    value_types,
    write_site,
)
from .bounds import screen_scales
from .features import FeatureFit, write_feature_score
from .gate import FEATURE_FLAGGED, GATE_PREFIX, MIN_GATE_OPSET, SCREENED, gate_mmdf_graph

DETECTED = "mmdf_detected"
SCORE = "mmdf_score"
FEATURE_SCORE = "mmdf_feature_score"
BRANCH_PREFIX = "mmdf/bounded/"
DECISION_PREFIX = "mmdf/"
SCREEN_PREFIX = "mmdf/screen/"
# Where (the flagged output) exists from opset 9; every other decision op is older.
MIN_OPSET = 9
# The value the original class gets in a flagged row: far below any real logit, finite so a
# softmax or a difference downstream stays finite.
SUPPRESSED = -1e9


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(a, gs.Graph) for a in node.attrs.values())


def build_mmdf_graph(
    proto: onnx.ModelProto,
    bounds: Bounds,
    threshold: float,
    *,
    output_name: str | None = None,
    sites=None,
    features: FeatureFit | None = None,
    feature_threshold: float | None = None,
    avoid: int | None = None,
    focus: int | None = None,
    logits_name: str | None = None,
    gate: bool = True,
    screen: float | None = None,
    own_weights: bool = True,
) -> onnx.ModelProto:
    """The two-branch MMDF model; `proto` is left untouched.

    `output_name`: the logits output (default: the only graph output). `logits_name`: where
    that output is a Softmax of the logits, the Softmax's input: d is taken on it and the
    switch sits before the Softmax, so the output stays probabilities. `sites` defaults to
    every site of the model (mmexport.core.sites); each bound key must be one of them. With
    `features` (and `feature_threshold`) an input is also flagged when its feature score
    exceeds that threshold, output as `mmdf_feature_score` (score - threshold). `avoid`: a
    class a flagged input is never sent to (the suspected backdoor target). `focus`: only
    inputs the original model assigns to this class can be flagged; with `gate` (and opset >=
    11) only they run the tests (mmdf.gate), the others' scores are NaN. `screen`: a threshold
    on how far an input's activations pass the bounds (`bounds.exceedance`); only inputs past
    it can be flagged by the margin test, and with `gate` (no focus) only they and those the
    feature test flags run the bounded branch. `own_weights`: a focus branch holds copies of its
    conv weights (mmdf.gate). Keeps the model's IR version, opset, inputs and other outputs;
    needs opset >= 9.
    """
    opset = onnx_opset(proto)
    if opset < MIN_OPSET:
        raise MmexportError(
            f"MMDF needs opset >= {MIN_OPSET} (Where selects the flagged logits); "
            f"the model has opset {opset}"
        )
    if not math.isfinite(threshold):
        raise MmexportError(f"MMDF threshold {threshold}: must be finite")
    shapes, elem_types = value_types(proto)
    if sites is None:
        from ...core.model import find_sites

        sites = find_sites(proto, shapes)
    if not sites:
        raise MmexportError(f"MMDF: {NO_SITES}")
    check_bounds_for_sites(bounds, sites)
    if not len(bounds):
        raise MmexportError("MMDF: no bounds given; the bounded branch would equal the original")
    outputs = [o.name for o in proto.graph.output]
    if output_name is None:
        if len(outputs) != 1:
            raise MmexportError(
                f"MMDF: the graph has {len(outputs)} outputs ({', '.join(outputs)}); "
                "choose the logits one"
            )
        output_name = outputs[0]
    elif output_name not in outputs:
        raise MmexportError(
            f"MMDF: no graph output named {output_name!r} (has: {', '.join(outputs)})"
        )
    if screen is not None and not math.isfinite(screen):
        raise MmexportError(f"MMDF screen threshold {screen}: must be finite")
    if features is not None and (feature_threshold is None or not math.isfinite(feature_threshold)):
        raise MmexportError(f"MMDF feature threshold {feature_threshold}: must be finite")
    for name in (DETECTED, SCORE, FEATURE_SCORE):
        if name in outputs:
            raise MmexportError(f"MMDF: the model already has an output {name!r} (MMDF twice?)")
    logits_name = logits_name or output_name
    logits_shape = shapes.get(logits_name, ())
    k = logits_shape[-1] if logits_shape else None
    if len(logits_shape) != 2 or not isinstance(k, int) or k < 2:
        raise MmexportError(
            f"MMDF: logits {logits_name!r} are shaped {logits_shape or 'unknown'}, expected (N, K) "
            "with a static K >= 2"
        )
    if avoid is not None and not 0 <= avoid < k:
        raise MmexportError(f"MMDF: class to avoid {avoid} is not one of the model's {k} classes")
    if focus is not None and not 0 <= focus < k:
        raise MmexportError(f"MMDF: class to focus on {focus} is not one of the model's {k} classes")
    elem = elem_types.get(logits_name, onnx.TensorProto.FLOAT)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    site_info = {s.name: s for s in sites}
    site_nodes = {n.output[0]: n for n in proto.graph.node if n.output}

    graph = gs.import_onnx(proto)
    fresh = Namer(set(graph.tensors()), {n.name for n in graph.nodes if n.name})
    logits = graph.tensors().get(logits_name)
    if logits is None:
        raise MmexportError(f"MMDF: no tensor named {logits_name!r} in the model")
    site_tensors, site_ranks = {}, {}
    if features is not None:
        tensors = graph.tensors()
        missing = [g.site for g in features.sites if g.site not in tensors]
        if missing:
            raise MmexportError(f"MMDF features: no tensor {missing[0]!r} in the model")
        site_tensors = {g.site: tensors[g.site] for g in features.sites}
        site_ranks = {g.site: site_info[g.site].rank if g.site in site_info else None
                      for g in features.sites}
        unknown = [name for name, r in site_ranks.items() if not r or r < 2]
        if unknown:
            raise MmexportError(f"MMDF features: site {unknown[0]!r} has no known channel axis")
        for name, t in site_tensors.items():  # token features [N, T, C]: channels first
            r = site_ranks[name]
            if r > 2 and site_info[name].axis != 1:
                first = gs.Variable(fresh(DECISION_PREFIX + name + "/channels_first"), dtype=t.dtype)
                graph.nodes.append(gs.Node(
                    "Transpose", name=fresh(DECISION_PREFIX + "transpose", "node"), inputs=[t],
                    outputs=[first], attrs={"perm": [0, r - 1, *range(1, r - 1)]}))
                site_tensors[name] = first
    screened = None
    if screen is not None:
        screened = _write_screen(graph, bounds, site_info, float(screen), dtype, fresh, opset)
    bounded_logits = _bounded_branch(graph, logits, bounds, site_info, site_nodes, proto, dtype,
                                     fresh, opset)
    _decision(graph, logits, bounded_logits, k, float(threshold), dtype, fresh, opset,
              features=features, feature_threshold=feature_threshold, site_tensors=site_tensors,
              site_ranks=site_ranks, avoid=avoid, focus=focus, screened=screened)

    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    restore_model_fields(out, proto)  # outputs as the source listed them; ours follow
    # Shapes of our own tensors are onnxruntime's to infer; listing them added 2-6% to the
    # sample models' files.
    listed = {vi.name for vi in proto.graph.value_info}
    kept = [vi for vi in out.graph.value_info if vi.name in listed]
    del out.graph.value_info[:]
    out.graph.value_info.extend(kept)
    out.graph.output.extend([
        helper.make_tensor_value_info(DETECTED, onnx.TensorProto.BOOL, [logits_shape[0]]),
        helper.make_tensor_value_info(SCORE, onnx.TensorProto.FLOAT, [logits_shape[0]]),
    ])
    if features is not None:
        out.graph.output.append(
            helper.make_tensor_value_info(FEATURE_SCORE, onnx.TensorProto.FLOAT, [logits_shape[0]])
        )
    if gate and (focus is not None or screen is not None) and opset >= MIN_GATE_OPSET:
        ours = [DETECTED, SCORE] + ([FEATURE_SCORE] if features is not None else [])
        out = gate_mmdf_graph(out, proto, logits_name=logits_name, focus=focus, outputs=ours, own_weights=own_weights)
    return out


def is_gated(proto: onnx.ModelProto) -> bool:
    """Whether an MMDF graph runs its tests inside the focus gate (mmdf.gate)."""
    return any(n.op_type == "If" and n.name.startswith(GATE_PREFIX) for n in proto.graph.node)


def _bounded_branch(graph, logits, bounds, site_info, site_nodes, proto, dtype, fresh, opset):
    """Copy every node between a bounded site and the logits, bounds written into the copies.

    Nodes that no bound reaches (everything before the first site, Constant nodes, shape
    arithmetic on the input) are not copied: both branches read them, weights included.
    """
    producer = {id(t): n for n in graph.nodes for t in n.outputs}
    ancestors, stack = set(), [logits]
    while stack:  # the nodes the logits depend on
        node = producer.get(id(stack.pop()))
        if node is not None and id(node) not in ancestors:
            ancestors.add(id(node))
            stack.extend(node.inputs)
    copies: dict[int, gs.Variable] = {}  # id(original tensor) -> its bounded-branch tensor
    for node in list(graph.nodes):  # import order is topological
        if id(node) not in ancestors:
            continue
        site = node.outputs[0].name if node.outputs else None
        bounded_here = site in bounds.values
        shared = not any(id(t) in copies for t in node.inputs)
        if shared and bounded_here:
            # The first bounded site on a path: both branches share the site (and the Conv
            # fused with it); the bounded branch reads min(site, z).
            rank = site_info[site].rank or len(node.outputs[0].shape or ())
            copies[id(node.outputs[0])] = _min_after(graph, node.outputs[0], bounds[site], rank,
                                                     dtype, fresh, site_info[site].axis)
            continue
        if shared:
            continue
        if _has_subgraph(node):
            raise MmexportError(
                f"MMDF: node {node.name!r} ({node.op}) holds a subgraph; not supported"
            )
        inputs = [copies.get(id(t), t) for t in node.inputs]
        outputs = []
        for t in node.outputs:
            v = gs.Variable(fresh(BRANCH_PREFIX + t.name), dtype=t.dtype, shape=t.shape)
            copies[id(t)] = v
            outputs.append(v)
        copy = node.copy(inputs=inputs, outputs=outputs)
        copy.name = fresh(BRANCH_PREFIX + (node.name or node.op), "node")
        graph.nodes.append(copy)
        if bounded_here:
            orig = site_nodes[site]
            hi = site_max(proto.graph, orig, opset)
            rank = site_info[site].rank or len(node.outputs[0].shape or ())
            write_site(graph, copy, bounds[site], rank=rank, dtype=dtype, clip_hi=hi,
                        fresh=fresh, opset=opset, axis=site_info[site].axis)
    if id(logits) not in copies:
        raise MmexportError("MMDF: no bounded site lies upstream of the logits")
    return copies[id(logits)]


def _min_after(graph, t: gs.Variable, value: np.ndarray, rank: int | None, dtype, fresh,
               axis: int = 1):
    """A new tensor `Min(t, z)`: z per channel ([C, 1, ...] on axis 1, [C] on the last axis)
    or a scalar."""
    if value.ndim == 1:
        value = channel_bound(value, rank, axis, t.name)
    name = BOUND_PREFIX + BRANCH_PREFIX + t.name
    out = gs.Variable(fresh(BRANCH_PREFIX + t.name), dtype=t.dtype, shape=t.shape)
    z = gs.Constant(fresh(name), np.asarray(value, dtype=dtype))
    graph.nodes.append(gs.Node("Min", name=fresh(name, "node"), inputs=[t, z], outputs=[out]))
    return out


def _write_screen(graph, bounds, site_info, threshold, dtype, fresh, opset):
    """`mmdf/screened` [N, 1]: whether the input's exceedance (`bounds.exceedance`, on the
    original branch's sites) passes `threshold`. One max per channel and site, a MatMul."""
    tensors = graph.tensors()

    def node(op, inputs, name, out_dtype=dtype, **attrs):
        out = gs.Variable(fresh(SCREEN_PREFIX + name), dtype=out_dtype)
        graph.nodes.append(gs.Node(op, name=fresh(SCREEN_PREFIX + op.lower(), "node"), attrs=attrs,
                                   inputs=inputs, outputs=[out]))
        return out

    def const(name, value):
        return gs.Constant(fresh(SCREEN_PREFIX + name), np.asarray(value, dtype=dtype))

    def reduce_max(x, axes, name, keepdims):
        if opset >= 18:
            axes_c = gs.Constant(fresh(SCREEN_PREFIX + name + "/axes"), np.array(axes, np.int64))
            return node("ReduceMax", [x, axes_c], name, keepdims=keepdims)
        return node("ReduceMax", [x], name, axes=list(axes), keepdims=keepdims)

    # Each site's channel maxima, grouped by rank ([N, C] or pooled [N, C, 1, ...]) so that one
    # Concat per rank and one Sub, Relu and MatMul for all sites weigh them: per site only
    # its pool (a model has tens of sites and, at batch 1, a node costs about its arithmetic).
    groups: dict[int, list] = {}
    for i, (name, z) in enumerate(bounds.values.items()):
        tag = f"s{i}"
        t = tensors[name]
        info = site_info[name]
        rank = info.rank or len(t.shape or ())
        z = np.asarray(z)
        if z.ndim == 0:  # one bound for the site: its largest value
            m, m_rank = reduce_max(node("Flatten", [t], tag + "/flat", axis=1), [1], tag + "/max", 1), 2
        elif rank == 2:
            m, m_rank = t, 2
        elif info.axis == 1:
            m, m_rank = node("GlobalMaxPool", [t], tag + "/pool"), rank
        else:  # channels last: [N, ..., C]
            m, m_rank = reduce_max(t, list(range(1, rank - 1)), tag + "/max", 0), 2
        groups.setdefault(m_rank, []).append((m, z.reshape(-1)))
    maxima, z_all = [], []
    for m_rank, members in sorted(groups.items()):
        joined = members[0][0] if len(members) == 1 else node(
            "Concat", [m for m, _ in members], f"maxima{m_rank}", axis=1)
        maxima.append(joined if m_rank == 2 else node("Flatten", [joined], f"maxima{m_rank}/flat", axis=1))
        z_all += [z for _, z in members]
    m = maxima[0] if len(maxima) == 1 else node("Concat", maxima, "maxima", axis=1)
    z = np.concatenate(z_all)
    excess = node("Relu", [node("Sub", [m, const("z", z)], "over")], "excess")
    w = np.concatenate([1.0 / screen_scales(v) for v in z_all]).reshape(-1, 1)
    total = node("MatMul", [excess, const("weights", w)], "exceedance")
    out = gs.Variable(fresh(SCREENED), dtype=np.bool_)
    graph.nodes.append(gs.Node("Greater", name=fresh(SCREEN_PREFIX + "greater", "node"),
                               inputs=[total, const("threshold", np.array(threshold))], outputs=[out]))
    return out


def _decision(graph, logits, bounded, k, threshold, dtype, fresh, opset, *, features=None,
              feature_threshold=None, site_tensors=None, site_ranks=None, avoid=None,
              focus=None, screened=None):
    """d = m_c^ - m_c^(Z), the flag, the score and the switched logits, appended to `graph`.

    The original logits tensor is renamed: the graph output of that name becomes the switch.
    """
    def var(name, dt=dtype, shape=None):
        return gs.Variable(fresh(DECISION_PREFIX + name), dtype=dt, shape=shape)

    def const(name, value):
        return gs.Constant(fresh(DECISION_PREFIX + name), np.asarray(value))

    def node(op, inputs, outputs, **attrs):
        graph.nodes.append(gs.Node(op, name=fresh(DECISION_PREFIX + op.lower(), "node"),
                                   attrs=attrs, inputs=inputs, outputs=outputs))
        return outputs[0]

    def reduce_max(x, name):
        out = var(name)
        if opset >= 18:
            axes = const("axis1", np.array([1], np.int64))
            return node("ReduceMax", [x, axes], [out], keepdims=1)
        return node("ReduceMax", [x], [out], axes=[1], keepdims=1)

    out_name = logits.name
    readers = list(logits.outputs)  # a final Softmax: it reads the switched logits
    logits.name = fresh(DECISION_PREFIX + "original/" + out_name)
    predicted = node("ArgMax", [logits], [var("predicted", np.int64)], axis=1, keepdims=1)
    classes = const("classes", np.arange(k, dtype=np.int64).reshape(1, k))
    own_mask = node("Equal", [classes, predicted], [var("is_predicted", np.bool_)])
    neg_inf = const("neg_inf", np.array(-np.inf, dtype))
    gaps = []
    for tag, z in (("original", logits), ("bounded", bounded)):
        own = reduce_max(node("Where", [own_mask, z, neg_inf], [var(f"{tag}/own_only")]),
                         f"{tag}/own")
        other = reduce_max(node("Where", [own_mask, neg_inf, z], [var(f"{tag}/others")]),
                           f"{tag}/best_other")
        gaps.append(node("Sub", [own, other], [var(f"{tag}/margin")]))
    d = node("Sub", gaps, [var("margin_gap")])
    score = node("Sub", [d, const("threshold", np.array(threshold, dtype))], [var("score_col")])
    zero = const("zero", np.array(0, dtype))
    flagged = node("Greater", [score, zero], [var("flagged", np.bool_)])
    if screened is not None:  # the margin test judges only inputs past the screen
        flagged = node("And", [flagged, screened], [var("flagged_screened", np.bool_)])
    flat = const("flat", np.array([-1], np.int64))
    feature_score = None
    if features is not None:
        classes_n = node("Reshape", [predicted, flat], [var("predicted_n", np.int64)])
        raw = write_feature_score(graph, site_tensors, site_ranks, classes_n, features, dtype,
                                  opset, node, var, const, focus=focus)
        feature_score = node("Sub", [raw, const("feature_threshold",
                                                np.array(feature_threshold, dtype))],
                             [var("feature_score_col")])
        far = node("Greater", [feature_score, zero], [gs.Variable(fresh(FEATURE_FLAGGED), np.bool_)])
        flagged = node("Or", [flagged, far], [var("flagged_any", np.bool_)])
    if focus is not None:
        sent = node("Equal", [predicted, const("focus", np.array([[focus]], np.int64))],
                    [var("sent_to_focus", np.bool_)])
        flagged = node("And", [flagged, sent], [var("flagged_focus", np.bool_)])
    if dtype != np.float32:
        score = node("Cast", [score], [var("score_f32", np.float32)], to=onnx.TensorProto.FLOAT)
        if feature_score is not None:
            feature_score = node("Cast", [feature_score], [var("feature_score_f32", np.float32)],
                                 to=onnx.TensorProto.FLOAT)
    graph.outputs.append(node("Reshape", [score, flat], [gs.Variable(SCORE, np.float32)]))
    graph.outputs.append(node("Reshape", [flagged, flat], [gs.Variable(DETECTED, np.bool_)]))
    if feature_score is not None:
        graph.outputs.append(node("Reshape", [feature_score, flat],
                                  [gs.Variable(FEATURE_SCORE, np.float32)]))
    low = -min(-SUPPRESSED, float(np.finfo(dtype).max) / 2)  # finite in float16 too
    suppressed = const("suppressed", np.array(low, dtype))
    fixed = node("Where", [own_mask, suppressed, bounded], [var("bounded/suppressed")])
    if avoid is not None:
        target = const("avoid", (np.arange(k) == avoid).reshape(1, k))
        fixed = node("Where", [target, suppressed, fixed], [var("bounded/avoided")])
    out = gs.Variable(out_name, dtype=logits.dtype, shape=logits.shape)
    node("Where", [flagged, fixed, logits], [out])
    graph.outputs = [out if t is logits else t for t in graph.outputs]
    for reader in readers:
        for i, t in enumerate(reader.inputs):
            if t is logits:
                reader.inputs[i] = out


def is_mmdf_model(proto: onnx.ModelProto) -> bool:
    """Whether `proto` is an MMDF model: its `mmdf_detected` output or its method metadata."""
    return any(o.name == DETECTED for o in proto.graph.output) or (
        get_metadata(proto).get("mmexport.method") == METHOD
    )


METHOD = "mmdf"
