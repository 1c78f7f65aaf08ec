"""MMDF: test-time backdoor detection and fix in one ONNX graph (Wang, Miller & Kesidis).

A backdoor trigger drives a few neurons far outside anything clean inputs do; bounding the
ReLUs removes that, while a clean input's margin barely moves. So for the original model's
predicted class c^ = argmax g(x),

    d(x) = m_c^(x) - m_c^(x; Z),      m_c(x) = g_c(x) - max_{k != c} g_k(x),

the margin the bounds Z take away, is small on clean inputs and large on triggered ones. An
input is flagged when d exceeds a threshold calibrated on the clean set D (the *null*).

Bounds. The default ("clean-max") bounds every channel at the upper end of its range on D
(and D's 1-pixel shifts): the limit of MMAC's search at lambda = 0, the point it starts
from. MMAC's margin term pulls bounds into the clean range; that moves clean margins too
and blurs clean and triggered inputs (on the sample patch models MMAC bounds detect 82-95%
of triggered inputs, clean-max bounds 95-99.6%; the lower the accuracy floor, the worse).
Bounds fitted on D hold every D activation, so d on D is 0: the null is cross-fitted (each
image scored with bounds fitted on the other folds). MMAC or any other bounds can be given
instead; their null is d on D itself, optimistic when they were fitted on D (up to ~2x
alpha false positives on new clean inputs).

Null law. d on clean data is a point mass at 0 plus a short, skewed right tail: a fitted
Gaussian (the paper's choice) puts the threshold far too low (1.6-2.6% false positives at
alpha = 0.5% here, 5% on the prototype). The default is the conformal quantile, the
ceil((n + 1)(1 - alpha))-th smallest null score, which a new clean score exceeds with
probability <= alpha whatever the law (`fit_null`).

The graph holds both branches. The bounded branch duplicates only the nodes that depend on
a bounded site and reads the very same weight initializers, so the file grows by a few
nodes, not by a second copy of the weights. It outputs

- the original logits name: the original logits where the input is not flagged; where it
  is, the bounded logits with c^ pushed to a large negative value (argmax = the best other
  class);
- `mmdf_detected` (bool [N]) and `mmdf_score` (float [N], d - threshold);
- with the feature test (`statistic="margin+features"`, the default), `mmdf_feature_score`:
  how far the input's site channel statistics (mean, spread, skew) lie from class c^ on D
  (from the focus class, see below), minus its threshold (`mmexport.features`). It catches
  triggers that stay inside the clean range, which d cannot see; an input is flagged by
  either test, alpha split between them.

Focus. A trigger that works makes the model predict its target. Where the MM-BD scan on D
(or the user) names the suspected target t, only inputs the original model sends to t can
be flagged, and both thresholds are set on D's inputs sent to t at alpha / p (p: their
share of D), so the false-positive rate over all clean inputs stays alpha while the tests
spend it where triggered inputs are. On the sample zoo this removed the false positives on
classes a trigger never produces (correctly classified "1"s of a signal-attack CNN, 2.0% ->
0.2%); the price: a wrongly named target leaves the triggered inputs untested. The graph
then stores the focus class's feature means only, and scores every input against them.

Bounds are written unfolded (`Min` / `Clip`, as `apply_bounds(form="min")`): folding them
would rescale weights the original branch shares.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from . import __version__
from .bounds import Bounds, check_bounds_for_sites, load_bounds
from .data import Dataset, as_dataset, check_for_model
from .errors import MmexportError
from .features import FeatureFit, fit_features, site_feature_arrays, write_feature_score
from .model import Model, get_metadata, onnx_opset, set_metadata, sha256_bytes, site_max
from .rewrite import (
    BOUND_PREFIX,
    _Namer,
    _restore_model_fields,
    _value_types,
    _write_site,
    count_bounded_sites,
)

DETECTED = "mmdf_detected"
SCORE = "mmdf_score"
FEATURE_SCORE = "mmdf_feature_score"
BRANCH_PREFIX = "mmdf/bounded/"
DECISION_PREFIX = "mmdf/"
METHOD = "mmdf"
# Where (the flagged output) exists from opset 9; every other decision op is older.
MIN_OPSET = 9
# The value the original class gets in a flagged row: far below any real logit, finite so a
# softmax or a difference downstream stays finite.
SUPPRESSED = -1e9
# d is a difference of float32 margins: below this (relative) it is rounding, not clipping.
_ROUNDING = 1e-5
LAWS = ("conformal", "exponential-tail", "gaussian")
# Cross-fitting folds of the calibration scores: each held-out score comes from a fit on
# 90% of D, closer to the final fit on all of D than 80% is; over ten seeds the signal MLP's
# ASR ranged 0.9-1.8% with 10 folds, 0.4-3.6% with 5 (docs/experiments.md section 22).
FOLDS = 10
BOUNDS_METHODS = ("clean-max", "mmac")
# "margin": the paper's test, the margin gap alone. "margin+features": also flag an input
# whose site activations lie far from its predicted class on D (mmexport.features); the
# false-positive budget alpha is split evenly between the two tests.
STATISTICS = ("margin+features", "margin")


# --------------------------------------------------------------------------- scores


def margin_gap(logits: np.ndarray, bounded_logits: np.ndarray) -> np.ndarray:
    """d = m_c^(x) - m_c^(x; Z) per row, c^ the original argmax; logits are [N, K], K >= 2."""
    g = np.asarray(logits, dtype=np.float64)
    b = np.asarray(bounded_logits, dtype=np.float64)
    if g.shape != b.shape or g.ndim != 2 or g.shape[1] < 2:
        raise MmexportError(
            f"margin gap: logits shaped {g.shape} and {b.shape}, expected (N, K >= 2)"
        )
    rows = np.arange(len(g))
    c = g.argmax(1)

    def margin(z):
        others = z.copy()
        others[rows, c] = -np.inf
        return z[rows, c] - others.max(1)

    return margin(g) - margin(b)


# --------------------------------------------------------------------------- the null law


@dataclass(frozen=True)
class NullFit:
    """The law of d on clean data, the threshold it gives and how it does on that data.

    threshold: d above it is flagged; fpr: the fraction of the calibration scores above it
    (the observed false-positive rate on D); params: the law's fitted parameters.
    """

    law: str
    alpha: float
    threshold: float
    fpr: float
    n: int
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"law": self.law, "alpha": self.alpha, "threshold": self.threshold,
                "fpr": self.fpr, "n": self.n, "params": self.params}


def fit_null(d: np.ndarray, alpha: float = 0.005, *, law: str = "conformal",
             tail: float = 0.1, floor: float = 0.0) -> NullFit:
    """The threshold on d that clean inputs exceed with probability about `alpha`.

    "conformal" (default): the ceil((n + 1)(1 - alpha))-th smallest of the n clean scores.
    For a test score exchangeable with them, P(score > threshold) <= alpha, whatever the
    law; when n + 1 < 1 / alpha the largest score is used and the guarantee is 1 / (n + 1).
    "exponential-tail": peaks over threshold, an exponential law fitted to the excesses over
    the 1 - `tail` quantile u, threshold u + beta ln(p_u / alpha): extrapolates past the
    largest score when n is small. "gaussian": mean + z_(1-alpha) sd, the paper's choice;
    d is right-skewed with a point mass at 0, and this puts the threshold far too low.
    The threshold is at least `floor` (rounding noise: d of an unclipped input is 0 only
    up to float error).
    """
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    if law not in LAWS:
        raise MmexportError(f"null law {law!r}: expected one of {', '.join(LAWS)}")
    if not 0.0 < alpha < 0.5:
        raise MmexportError(f"--alpha must be in (0, 0.5), got {alpha}")
    if len(d) < 10:
        raise MmexportError(f"{len(d)} clean scores: need at least 10 to fit the null law")
    if not np.isfinite(d).all():
        raise MmexportError("clean scores hold NaN or Inf: the model's logits are not finite on D")
    n = len(d)
    if law == "conformal":
        rank = math.ceil((n + 1) * (1 - alpha))
        thr = float(np.sort(d)[min(rank, n) - 1])
        params = {"rank": min(rank, n), "guarantee": max(alpha, 1 / (n + 1))}
    elif law == "exponential-tail":
        u = float(np.quantile(d, 1 - tail))
        excess = d[d > u] - u
        p_u = len(excess) / n
        beta = float(excess.mean()) if len(excess) else 0.0
        thr = u + beta * math.log(p_u / alpha) if p_u > alpha else u
        params = {"u": u, "p_u": p_u, "beta": beta}
    else:
        mu, sd = float(d.mean()), float(d.std())
        thr = mu + NormalDist().inv_cdf(1 - alpha) * sd
        params = {"mean": mu, "std": sd}
    # The graph compares in float32: the threshold is that float32 number.
    thr = float(np.float32(max(float(thr), floor)))
    return NullFit(law=law, alpha=alpha, threshold=thr, fpr=float(np.mean(d > thr)), n=n,
                   params=params)


# --------------------------------------------------------------------------- clean-range bounds


def shifted(x: np.ndarray) -> np.ndarray:
    """x and its four 1-pixel shifts (edges replicated), [5N, ...], for image batches
    [N, C, H, W]; other inputs come back as they are. Copy j of sample i is row j*N + i."""
    if x.ndim != 4:
        return x
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = x.shape[2], x.shape[3]
    moves = ((-1, 0), (1, 0), (0, -1), (0, 1))
    return np.concatenate([x] + [pad[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
                                 for dy, dx in moves])


def site_maxima(proto: onnx.ModelProto, sites, x: np.ndarray, *, input_name: str,
                provider: str = "cpu", batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per sample, the largest activation of every channel of every site: {site: [N, C]}.

    A site without a known channel axis gets one value per sample ([N, 1] -> a scalar bound).
    Run by onnxruntime with the sites added as graph outputs.
    """
    from .runtime import tensor_summaries

    channelled = {s.name for s in sites if s.channels is not None}

    def per_channel_max(name, a):
        if name in channelled and a.ndim >= 2:
            return a.reshape(a.shape[0], a.shape[1], -1).max(axis=2)
        return a.reshape(a.shape[0], -1).max(axis=1, keepdims=True)

    return tensor_summaries(proto, [s.name for s in sites], x, per_channel_max,
                            input_name=input_name, provider=provider, batch_size=batch_size)


def clean_max_bounds(maxima: dict[str, np.ndarray], index=None) -> Bounds:
    """The upper end of each channel's clean range, from per-sample maxima {site: [N, C]}.

    x_(n) + (x_(n) - x_(n-1)) per channel (the two largest values): the largest clean value
    seen plus the last gap, an estimate of the range's endpoint that a new clean input rarely
    passes and a trigger, which drives a few channels well outside it, does. `index` picks
    the samples to use. Sites without a channel axis ([N, 1]) get a scalar bound.
    """
    values = {}
    for name, m in maxima.items():
        m = m if index is None else m[index]
        top = np.sort(m, axis=0)[-2:] if len(m) > 1 else np.concatenate([m, m])
        z = np.maximum(2 * top[-1] - top[-2], 0.0).astype(np.float32)
        values[name] = z.reshape(()) if z.shape == (1,) else z
    return Bounds(values, {"method": "clean-max"})


def fold_ids(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold number per sample, stratified by label, seeded."""
    rng = np.random.default_rng(seed)
    ids = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        ids[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    return ids


# --------------------------------------------------------------------------- the graph


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
) -> onnx.ModelProto:
    """The two-branch MMDF model; `proto` is left untouched.

    `output_name`: the logits output (default: the only graph output). `sites` defaults to
    every Relu / Clip(min=0) of the model; each bound key must be one of them. With
    `features` (and `feature_threshold`) an input is also flagged when its feature score
    exceeds that threshold, output as `mmdf_feature_score` (score - threshold). `avoid`: a
    class a flagged input is never sent to (the suspected backdoor target). `focus`: only
    inputs the original model assigns to this class can be flagged. Keeps the model's IR
    version, opset, inputs and other outputs; needs opset >= 9.
    """
    opset = onnx_opset(proto)
    if opset < MIN_OPSET:
        raise MmexportError(
            f"MMDF needs opset >= {MIN_OPSET} (Where selects the flagged logits); "
            f"the model has opset {opset}"
        )
    if not math.isfinite(threshold):
        raise MmexportError(f"MMDF threshold {threshold}: must be finite")
    shapes, elem_types = _value_types(proto)
    if sites is None:
        from .model import find_sites

        sites = find_sites(proto, shapes)
    if not sites:
        raise MmexportError("MMDF: the model has no ReLU sites (Relu or Clip(min=0)) to bound")
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
    if features is not None and (feature_threshold is None or not math.isfinite(feature_threshold)):
        raise MmexportError(f"MMDF feature threshold {feature_threshold}: must be finite")
    for name in (DETECTED, SCORE, FEATURE_SCORE):
        if name in outputs:
            raise MmexportError(f"MMDF: the model already has an output {name!r} (MMDF twice?)")
    logits_shape = shapes.get(output_name, ())
    k = logits_shape[-1] if logits_shape else None
    if len(logits_shape) != 2 or not isinstance(k, int) or k < 2:
        raise MmexportError(
            f"MMDF: output {output_name!r} is shaped {logits_shape or 'unknown'}, expected (N, K) "
            "logits with a static K >= 2"
        )
    if avoid is not None and not 0 <= avoid < k:
        raise MmexportError(f"MMDF: class to avoid {avoid} is not one of the model's {k} classes")
    if focus is not None and not 0 <= focus < k:
        raise MmexportError(f"MMDF: class to focus on {focus} is not one of the model's {k} classes")
    elem = elem_types.get(output_name, onnx.TensorProto.FLOAT)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    site_info = {s.name: s for s in sites}
    site_nodes = {n.output[0]: n for n in proto.graph.node if n.output}

    graph = gs.import_onnx(proto)
    fresh = _Namer(set(graph.tensors()), {n.name for n in graph.nodes if n.name})
    logits = next(t for t in graph.outputs if t.name == output_name)
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
    bounded_logits = _bounded_branch(graph, logits, bounds, site_info, site_nodes, proto, dtype,
                                     fresh, opset)
    _decision(graph, logits, bounded_logits, k, float(threshold), dtype, fresh, opset,
              features=features, feature_threshold=feature_threshold, site_tensors=site_tensors,
              site_ranks=site_ranks, avoid=avoid, focus=focus)

    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    _restore_model_fields(out, proto)  # outputs as the source listed them; ours follow
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
    return out


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
            # fused with it); the bounded branch reads min(site, z) = clip(a, 0, z).
            rank = site_info[site].rank or len(node.outputs[0].shape or ())
            copies[id(node.outputs[0])] = _min_after(graph, node.outputs[0], bounds[site], rank,
                                                     dtype, fresh)
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
            _write_site(graph, copy, bounds[site], rank=rank, dtype=dtype, clip_hi=hi,
                        fresh=fresh, opset=opset)
    if id(logits) not in copies:
        raise MmexportError("MMDF: no bounded site lies upstream of the logits")
    return copies[id(logits)]


def _min_after(graph, t: gs.Variable, value: np.ndarray, rank: int | None, dtype, fresh):
    """A new tensor `Min(t, z)`: z per channel ([C, 1, ...] on axis 1) or a scalar."""
    if value.ndim == 1:
        if not rank or rank < 2:
            raise MmexportError(
                f"site {t.name!r}: activation rank unknown or < 2, cannot place "
                f"{value.shape[0]} per-channel bounds on axis 1"
            )
        value = value.reshape((value.shape[0],) + (1,) * (rank - 2))
    name = BOUND_PREFIX + BRANCH_PREFIX + t.name
    out = gs.Variable(fresh(BRANCH_PREFIX + t.name), dtype=t.dtype, shape=t.shape)
    z = gs.Constant(fresh(name), np.asarray(value, dtype=dtype))
    graph.nodes.append(gs.Node("Min", name=fresh(name, "node"), inputs=[t, z], outputs=[out]))
    return out


def _decision(graph, logits, bounded, k, threshold, dtype, fresh, opset, *, features=None,
              feature_threshold=None, site_tensors=None, site_ranks=None, avoid=None,
              focus=None):
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
    flat = const("flat", np.array([-1], np.int64))
    feature_score = None
    if features is not None:
        classes_n = node("Reshape", [predicted, flat], [var("predicted_n", np.int64)])
        raw = write_feature_score(graph, site_tensors, site_ranks, classes_n, features, dtype,
                                  opset, node, var, const, focus=focus)
        feature_score = node("Sub", [raw, const("feature_threshold",
                                                np.array(feature_threshold, dtype))],
                             [var("feature_score_col")])
        far = node("Greater", [feature_score, zero], [var("feature_flagged", np.bool_)])
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


# --------------------------------------------------------------------------- the pipeline


@dataclass
class DetectResult:
    """The MMDF model, its threshold on d, the bounds it holds and a JSON-ready report."""

    model: onnx.ModelProto
    threshold: float
    report: dict = field(default_factory=dict)
    bounds: Bounds | None = None
    null: NullFit | None = None


def _model_sha256(m: Model) -> str:
    from .model import sha256_file

    if m.path is not None and m.path.exists():
        return sha256_file(m.path)
    return sha256_bytes(m.proto.SerializeToString())


def _data_sha256(data: Dataset) -> str:
    x, y = np.ascontiguousarray(data.x), np.ascontiguousarray(data.y)
    return sha256_bytes(x.tobytes() + y.tobytes())


def is_mmdf_model(proto: onnx.ModelProto) -> bool:
    """Whether `proto` is an MMDF model: its `mmdf_detected` output or its method metadata."""
    return any(o.name == DETECTED for o in proto.graph.output) or (
        get_metadata(proto).get("mmexport.method") == METHOD
    )


def _check_model(m: Model) -> int:
    where = m.path or "model"
    if is_mmdf_model(m.proto):
        raise MmexportError(f"{where}: already an MMDF model; give the original model")
    if count_bounded_sites(m.proto)["total"]:
        raise MmexportError(
            f"{where}: already hardened by mmexport (bounded sites found); give the original "
            "model and pass the hardened one with --hardened"
        )
    if not m.sites:
        raise MmexportError(f"{where}: no ReLU sites to bound (no Relu or Clip(min=0) nodes)")
    if m.num_classes is None or m.num_classes < 2:
        raise MmexportError(
            f"{where}: output {m.output_name!r} has no static class dimension >= 2 "
            f"(shape {m.output_shape or 'unknown'})"
        )
    return m.num_classes


def _bounds_from_hardened(hardened, m: Model, source_sha: str) -> tuple[Bounds, str]:
    """The bounds a hardened model holds (Min / Clip nodes, or fold metadata)."""
    from .model import read_onnx
    from .rewrite import extract_bounds

    if isinstance(hardened, onnx.ModelProto):
        proto, where = hardened, "hardened model"
    else:
        proto, where = read_onnx(hardened), str(hardened)
    if not count_bounded_sites(proto)["total"]:
        raise MmexportError(f"{where}: holds no mmexport bounds (not a hardened model)")
    made_from = get_metadata(proto).get("mmexport.source_sha256")
    if made_from and made_from != source_sha:
        raise MmexportError(
            f"{where}: was hardened from another model (source sha256 {made_from[:12]}..., "
            f"this model {source_sha[:12]}...)"
        )
    try:
        bounds = extract_bounds(proto)
    except MmexportError as exc:
        raise MmexportError(f"{where}: {exc}") from None
    return bounds, f"hardened:{where}"


def _scores(proto: onnx.ModelProto, x: np.ndarray, m: Model, provider: str,
            output: str = SCORE) -> np.ndarray:
    """One output of `proto` (default: the MMDF score) on x, run by onnxruntime, as float64."""
    from .runtime import predict, session

    sess, _ = session(proto, provider=provider)
    return predict(sess, x, input_name=m.input_name, output_name=output).astype(np.float64)


def _probe(m: Model, bounds: Bounds) -> onnx.ModelProto:
    """The MMDF graph at threshold 0: its score output is d itself."""
    return build_mmdf_graph(m.proto, bounds, 0.0, output_name=m.output_name, sites=m.sites)


def _cross_fitted_scores(m: Model, maxima: dict, x: np.ndarray, y: np.ndarray, copies: int,
                         folds: int, seed: int, provider: str) -> np.ndarray:
    """d of every calibration input under clean-max bounds fitted without its source image.

    Bounds fitted on D itself hold every D activation, so d on D would be 0 and say nothing
    about a new input; K-fold cross-fitting scores each image (and its shifts) with the
    bounds of the other folds, as a new clean input meets the bounds of all of D.
    """
    fold = np.tile(fold_ids(y, folds, seed), copies)
    d = np.empty(len(x), dtype=np.float64)
    for k in range(folds):
        rows = np.flatnonzero(fold == k)
        if len(rows) == 0:
            continue
        bounds = clean_max_bounds(maxima, np.flatnonzero(fold != k))
        d[rows] = _scores(_probe(m, bounds), x[rows], m, provider)
    return d


def _class_to_avoid(avoid, m: Model, clean: Dataset, seed: int, device: str, progress) -> dict:
    """{"class": the class flagged inputs must not go to or None, "source", "scan": its report}.

    Where the scan cannot run (fewer than 3 classes, a class missing from D) no class is
    avoided and the report says why: the rule is an addition to MMDF, not a precondition.
    """
    if avoid != "scan":
        return {"class": avoid, "source": None if avoid is None else "given", "scan": None}
    from .search.scan import scan

    if progress is not None:
        progress({"stage": "scan (MM-BD: which class would a backdoor target?)", "n": len(clean)})
    try:
        res = scan(m, clean, seed=seed, device=device)
    except MmexportError as exc:
        return {"class": None, "source": "scan", "scan": {"skipped": str(exc)}}
    report = {"verdict": res.verdict, "target_class": res.target_class, "p_value": res.p_value,
              "statistic": res.statistic, "alpha": res.alpha}
    target = res.target_class if res.verdict == "backdoor" else None
    return {"class": target, "source": "scan", "scan": report}


def focus_plan(target: int | None, predicted: np.ndarray | None, alpha: float) -> dict:
    """Which inputs can be flagged and at what level: {"class", "n", "share", "alpha", "reason"}.

    A trigger that works makes the model predict its target, so when the target is known
    only inputs sent to it need testing: the calibration keeps D's inputs predicted as the
    target (share p of D), tested at alpha / p, so that P(flagged) = p * alpha / p = alpha
    over all clean inputs. Too few such inputs (< 10) and every input is tested.
    """
    if target is None:
        return {"class": None, "reason": "no suspected target"}
    on = predicted == target
    n = int(on.sum())
    if n < 10:
        return {"class": None, "reason": f"{n} calibration inputs predicted as class {target}, "
                                         "need at least 10"}
    share = n / len(predicted)
    return {"class": int(target), "n": n, "share": share, "alpha": min(alpha / share, 0.25)}


def detect(
    model,
    clean_set,
    *,
    bounds=None,
    hardened=None,
    method: str = "clean-max",
    statistic: str = "margin+features",
    alpha: float = 0.005,
    law: str = "conformal",
    folds: int = FOLDS,
    augment: bool = True,
    seed: int = 0,
    input_name: str | None = None,
    output_name: str | None = None,
    device: str = "auto",
    provider: str = "cpu",
    avoid: int | str | None = "scan",
    focus: bool = True,
    progress: Callable[[dict], None] | None = None,
    **search,
) -> DetectResult:
    """Build the MMDF model of `model`, its threshold calibrated on `clean_set`.

    `model`: path, ModelProto or Model. `clean_set`: .npz path, Dataset or (x, y).
    Bounds come from `bounds` (Bounds or a .bounds.json path), from `hardened` (a model
    mmexport hardened from this one), or are computed on the clean set by `method`:
    "clean-max" (default: each channel's clean range endpoint, `clean_max_bounds`, with the
    null cross-fitted over `folds` folds) or "mmac" (`mmexport.harden(..., seed=seed,
    **search)`). `augment` adds the 1-pixel shifts of image inputs to D. The threshold is
    the 1 - `alpha` quantile of `law` (`fit_null`) over d on D; d is computed by onnxruntime
    (`provider`) on the built graph itself, so the model reproduces the calibrated scores.
    `statistic` "margin+features" (default) adds the feature test (`mmexport.features`,
    fitted and cross-fitted on the same inputs and folds) and splits alpha between the two
    tests; "margin" is the paper's test alone.
    `avoid`: a class that a flagged input is never sent to. "scan" (default): the target of
    the MM-BD scan on the clean set (`mmexport.scan`, same seed and device) when its verdict
    is backdoor, else none; an int: that class; None: none. Without it, a triggered input
    that the backdoor did not win over is flagged, its (true) class suppressed, and the
    bounded model's best other class is often the target.
    `focus` (default): where a class is avoided, only inputs the original model assigns to
    it can be flagged, and the thresholds are set on D's inputs assigned to it at the level
    that keeps the false-positive rate over all clean inputs at `alpha` (`focus_plan`).
    """
    from .runtime import as_model

    if bounds is not None and hardened is not None:
        raise MmexportError("give bounds or a hardened model, not both")
    if method not in BOUNDS_METHODS:
        raise MmexportError(
            f"bounds method {method!r}: expected one of {', '.join(BOUNDS_METHODS)}"
        )
    given = bounds is not None or hardened is not None
    if search and (given or method != "mmac"):
        raise MmexportError(
            f"search option(s) {', '.join(sorted(search))} apply to method 'mmac' only"
        )
    if law not in LAWS:
        raise MmexportError(f"null law {law!r}: expected one of {', '.join(LAWS)}")
    if statistic not in STATISTICS:
        raise MmexportError(f"statistic {statistic!r}: expected one of {', '.join(STATISTICS)}")
    if not 0.0 < alpha < 0.5:
        raise MmexportError(f"--alpha must be in (0, 0.5), got {alpha}")
    if folds < 2:
        raise MmexportError(f"--folds must be >= 2, got {folds}")
    if not (avoid is None or avoid == "scan" or (isinstance(avoid, int) and not isinstance(avoid, bool))):
        raise MmexportError(f"--avoid {avoid!r}: expected 'scan', 'none' or a class number")
    m = as_model(model, input_name=input_name, output_name=output_name)
    k = _check_model(m)
    if isinstance(avoid, int) and not 0 <= avoid < k:
        raise MmexportError(f"--avoid {avoid}: not one of the model's {k} classes (0..{k - 1})")
    clean = as_dataset(clean_set)
    check_for_model(clean, m.input_shape, k)
    if len(clean) < max(folds, 10):
        raise MmexportError(
            f"{clean.path or 'clean set'}: {len(clean)} samples; MMDF needs at least "
            f"{max(folds, 10)} to calibrate its threshold"
        )
    source_sha = _model_sha256(m)
    x = shifted(clean.x) if augment else clean.x
    copies = len(x) // len(clean)

    harden_report = None
    cross_fit = False
    if isinstance(bounds, Bounds):
        source = "bounds"
    elif bounds is not None:
        source, bounds = f"bounds:{bounds}", load_bounds(bounds)
    elif hardened is not None:
        bounds, source = _bounds_from_hardened(hardened, m, source_sha)
    elif method == "mmac":
        from .pipeline import harden

        res = harden(m, clean, seed=seed, device=device, progress=progress, **search)
        bounds, source = res.bounds, "mmac"
        harden_report = {k_: v for k_, v in res.report.items() if k_ != "history"}
    else:
        if progress is not None:
            progress({"stage": "clean range", "n": len(x)})
        maxima = site_maxima(m.proto, m.sites, x, input_name=m.input_name, provider=provider)
        bounds, source, cross_fit = clean_max_bounds(maxima), "clean-max", True
    where = source.split(":", 1)[1] if ":" in source else "bounds"
    try:
        check_bounds_for_sites(bounds, m.sites, where=where)
    except MmexportError as exc:
        raise MmexportError(f"{exc} ({m.path or 'model'})") from None

    avoid_report = _class_to_avoid(avoid, m, clean, seed, device, progress)
    avoided = avoid_report["class"]
    if progress is not None:
        progress({"stage": "calibrate", "n": len(x)})
    if cross_fit:
        d = _cross_fitted_scores(m, maxima, x, clean.y, copies, folds, seed, provider)
    else:
        d = _scores(_probe(m, bounds), x, m, provider)
    use_features = statistic == "margin+features"
    features = predicted = None
    target = avoided if focus else None
    if use_features:
        if progress is not None:
            progress({"stage": "features", "n": len(x)})
        # The same inputs as the margin test (D and, with `augment`, its shifts): fitted
        # without them, the Gaussians flag up to 28% of shifted clean test images.
        feats, logits = site_feature_arrays(m.proto, m.sites, x, input_name=m.input_name,
                                            output_name=m.output_name, provider=provider)
        predicted = logits.argmax(axis=1)
        features = fit_features(feats, np.tile(clean.y, copies), predicted, k,
                                np.tile(fold_ids(clean.y, folds, seed), copies))
    elif target is not None:
        predicted = _scores(m.proto, x, m, provider, m.output_name).argmax(axis=1)
    alpha_each = alpha / 2 if use_features else alpha
    plan = focus_plan(target, predicted, alpha_each)
    tested = predicted == plan["class"] if plan["class"] is not None else np.ones(len(d), bool)
    level = plan.get("alpha", alpha_each)
    null = fit_null(d[tested], level, law=law,
                    floor=_ROUNDING * max(1.0, float(np.abs(d).max())))
    feature_null = None if features is None else fit_null(features.null[tested], level, law=law)
    flagged_on_d = d > null.threshold
    if feature_null is not None:
        flagged_on_d = flagged_on_d | (features.null > feature_null.threshold)
    flagged_on_d &= tested
    out = build_mmdf_graph(m.proto, bounds, null.threshold, output_name=m.output_name,
                           sites=m.sites, features=features,
                           feature_threshold=feature_null.threshold if feature_null else None,
                           avoid=avoided, focus=plan["class"])

    calibration = {"n": len(d), "images": len(clean), "augment": copies > 1,
                   "cross_fit_folds": folds if cross_fit else None,
                   "feature_folds": folds if use_features else None}
    report = {
        "mmexport_version": __version__,
        "method": METHOD,
        "model": str(m.path) if m.path else None,
        "data": str(clean.path) if clean.path else None,
        "model_sha256": source_sha,
        "data_sha256": _data_sha256(clean),
        "bounds_source": source,
        "sites": len(bounds),
        "seed": seed,
        "alpha": alpha,
        "statistic": statistic,
        "threshold": null.threshold,
        "null": null.to_json(),
        "features": None if features is None else {
            "threshold": feature_null.threshold,
            "null": feature_null.to_json(),
            "sites": [g.to_json() for g in features.sites],
        },
        "calibration": calibration,
        "false_positive_rate_clean_set": float(np.mean(flagged_on_d)),
        "margin_gap_clean_set": {
            "mean": float(d.mean()), "std": float(d.std()), "max": float(d.max()),
            "zero_fraction": float(np.mean(np.abs(d) <= 1e-6)),
            "quantiles": {str(q): float(np.quantile(d, q)) for q in (0.5, 0.9, 0.99)},
        },
        "harden": harden_report,
        "avoid": avoid_report,
        "focus": plan,
    }
    set_metadata(out, {
        "mmexport.version": __version__,
        "mmexport.method": METHOD,
        "mmexport.mmdf.threshold": repr(null.threshold),
        "mmexport.mmdf.statistic": statistic,
        "mmexport.mmdf.feature_threshold": repr(feature_null.threshold) if feature_null else "",
        "mmexport.mmdf.alpha": repr(alpha),
        "mmexport.mmdf.null": json.dumps(null.to_json(), sort_keys=True),
        "mmexport.mmdf.calibration": json.dumps(calibration, sort_keys=True),
        "mmexport.mmdf.bounds_source": source,
        "mmexport.mmdf.avoid": "" if avoided is None else str(avoided),
        "mmexport.mmdf.focus": "" if plan["class"] is None else str(plan["class"]),
        "mmexport.mmdf.output": m.output_name,
        "mmexport.seed": str(seed),
        "mmexport.source_sha256": source_sha,
        "mmexport.data_sha256": report["data_sha256"],
    })
    return DetectResult(model=out, threshold=null.threshold, report=report, bounds=bounds,
                        null=null)
