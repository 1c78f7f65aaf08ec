"""MMDF's tests run only on the inputs they can flag.

With a focus class, an input the original model sends to another class is never flagged and
keeps its original logits: the bounded branch and the feature test are wasted on it, and on
clean traffic that is most inputs (K - 1 of K classes). The gated graph runs the original
model, then an `If` on "some input of the batch is sent to the focus class". Its then-branch
gathers those rows, runs MMDF's nodes (the bounded copy, the feature test, the decision) on
them alone and scatters the results back into the batch; its else-branch passes the original
logits through. Logits and flags are those of the ungated graph; the scores of the rows not
tested are NaN.

Torch-free, on the ONNX protos: the ungated graph is cut in two along the names the source
model produced. Weights stay where they are, in the outer graph, which the branches read; a
focus branch holds copies of its conv weights (`_own_weights`). The then-branch gathers the
tested rows of the input and recomputes on them whatever source tensors MMDF's nodes read (the
sites, the logits) rather than reading them from the outer graph: an outer activation read by
the `If` must be kept whole and in plain layout on every run: the real tier's MobileNetV2 cost
1.31x / 1.83x its original (batch 1 / 64) that way, 1.08x / 1.72x recomputing; the ResNet-18
1.03x / 1.17x and 1.01x / 1.26x (docs/experiments.md, MMDF gated on the focus class).

Without a focus class every input can be flagged, but the margin test judges only those past
the screen (`bounds.exceedance`, set so that about a fifth of clean inputs pass it): the
screen and the feature test run on the whole batch in the outer graph, and the `If` runs the
bounded branch on the rows either of them marks.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ...core.model import dims

GATE_PREFIX = "mmdf/gated/"
# The screen's and the feature test's flags ([N, 1] bool), by which the gate finds them.
SCREENED = "mmdf/screened"
FEATURE_FLAGGED = "mmdf/feature_flagged"
# The branch's nodes whose weights it owns (`_own_weights`).
OWN_WEIGHTS = frozenset({"Conv", "ConvTranspose"})
# ScatterND (writing the tested rows back) exists from opset 11.
MIN_GATE_OPSET = 11


def gate_mmdf_graph(full: onnx.ModelProto, source: onnx.ModelProto, *, logits_name: str,
                    focus: int | None, outputs: list[str], own_weights: bool = True) -> onnx.ModelProto:
    """`full` (an ungated MMDF graph built from `source`) with its MMDF nodes inside an `If`.

    `logits_name`: the switched logits (the source's logits tensor); `outputs`: MMDF's own
    graph outputs (flag, score, feature score). `focus`: the class whose inputs are tested;
    None: those the screen passes or the feature test flags (`full` must hold a screen). Rows
    are gathered only where the input's batch axis is symbolic; a model with a fixed batch
    runs the tests on the whole batch when any row is tested. `own_weights`: a focus branch
    holds copies of the weights of its `OWN_WEIGHTS` nodes (`_own_weights`).
    """
    g = full.graph
    produced_by_source = {o for n in source.graph.node for o in n.output if o} - {logits_name}
    switch = next(n for n in g.node if logits_name in n.output)
    original_logits = switch.input[2]  # Where(flagged, fixed, original)
    produced_by_source.add(original_logits)
    is_original = [all(o in produced_by_source for o in n.output if o) for n in g.node]
    original = [n for n, keep in zip(g.node, is_original, strict=True) if keep]
    mmdf = [n for n, keep in zip(g.node, is_original, strict=True) if not keep]
    outer_mmdf = _outer_nodes(mmdf, produced_by_source) if focus is None else []
    if focus is None and not outer_mmdf:
        raise ValueError(f"gate: no focus class and no {SCREENED!r} tensor in the MMDF graph")
    mmdf = [n for n in mmdf if not any(n is o for o in outer_mmdf)]
    made_outer = {o for n in outer_mmdf for o in n.output if o}
    outputs = [o for o in outputs if o not in made_outer]  # the outer graph's own: feature score

    inits = {i.name for i in g.initializer}
    real_inputs = [i for i in g.input if i.name not in inits]
    batch = dims(real_inputs[0])[0] if real_inputs and dims(real_inputs[0]) else None
    gather = not isinstance(batch, int)
    input_names = {i.name for i in real_inputs}
    taken = {t for n in g.node for t in (*n.input, *n.output)} | inits | {i.name for i in g.input}
    taken |= {n.name for n in g.node}

    def fresh(name: str) -> str:
        out, i = name, 0
        while out in taken:
            i += 1
            out = f"{name}_{i}"
        taken.add(out)
        return out

    new_inits = []

    def const(name: str, value) -> str:
        arr = np.asarray(value)
        new_inits.append(numpy_helper.from_array(arr, fresh(GATE_PREFIX + name)))
        return new_inits[-1].name

    def node(nodes, op, inputs, name, **attrs):
        out = fresh(GATE_PREFIX + name)
        nodes.append(helper.make_node(op, inputs, [out], name=fresh(GATE_PREFIX + op.lower()), **attrs))
        return out

    # Which tensors change with the input: only those need gathering or recomputing.
    varying = {i.name for i in real_inputs}
    for n in g.node:
        if any(i in varying for i in n.input):
            varying.update(o for o in n.output if o)
    producer = {o: n for n in original for o in n.output if o}
    # Source tensors the screen and the feature test read (the sites, the logits) are made
    # whole on every run anyway: the branch gathers their rows instead of recomputing them.
    materialised = {i for n in outer_mmdf for i in n.input if i in producer}

    # The gate, on the outer graph.
    outer = []
    if focus is not None:
        # Five small nodes on every batch: at 16x16 a model runs in ~30 us, and each costs ~1 us.
        predicted = node(outer, "ArgMax", [original_logits], "predicted", axis=1, keepdims=0)
        tested = node(outer, "Equal", [predicted, const("focus", np.array(focus, np.int64))], "tested")
    else:
        marked = SCREENED
        if FEATURE_FLAGGED in made_outer:
            marked = node(outer, "Or", [SCREENED, FEATURE_FLAGGED], "marked")
        tested = node(outer, "Reshape", [marked, const("rows", np.array([-1], np.int64))], "tested")
    counted = node(outer, "Cast", [tested], "tested_i32", to=TensorProto.INT32)
    any_tested = node(outer, "ReduceMax", [counted], "any_tested", keepdims=0)
    cond = node(outer, "Cast", [any_tested], "run_tests", to=TensorProto.BOOL)
    flat = const("flat", np.array([-1], np.int64))
    nan = const("nan", np.array(np.nan, np.float32))

    # The then-branch: MMDF's nodes on the tested rows.
    inner, renamed = [], {}
    nan_n = node(inner, "Where", [tested, nan, nan], "not_scored") if len(outputs) > 1 else None
    if gather:
        idx = node(inner, "NonZero", [tested], "rows")
        rows = node(inner, "Reshape", [idx, flat], "rows_flat")
        at = node(inner, "Transpose", [idx], "rows_at", perm=[1, 0])

    def inside(name: str) -> str:
        if not name or name in renamed or name in made_inside:
            return renamed.get(name, name)
        if name not in varying or not gather:
            return name  # weights, constants, or the whole batch read as it is
        if name in input_names or name in made_outer or name in materialised:
            renamed[name] = node(inner, "Gather", [name, rows], name + "/rows", axis=0)
            return renamed[name]
        copy(producer[name])  # the source model's nodes, recomputed on the gathered rows
        return renamed[name]

    outer_names = {logits_name, *outputs}
    made_inside = {o for n in mmdf for o in n.output if o}

    def copy(n: onnx.NodeProto, moved: bool = False) -> None:
        """A node into the then-branch: MMDF's own keep their names (bounds stay readable by
        name), a source node recomputed there gets new ones."""
        c = onnx.NodeProto()
        c.CopyFrom(n)
        c.input[:] = [inside(i) for i in n.input]
        for i, o in enumerate(n.output):
            if o and (not moved or o in outer_names):
                renamed[o] = c.output[i] = fresh(GATE_PREFIX + o)
        if not moved:
            c.name = fresh(GATE_PREFIX + (n.name or n.op_type))
        inner.append(c)

    for n in mmdf:
        copy(n, moved=True)
    then_out = []
    # Untested rows keep the original logits, are not flagged (`tested` is False there) and
    # get NaN scores.
    bases = [original_logits, tested] + [nan_n] * (len(outputs) - 1)
    for name, base in zip([logits_name, *outputs], bases, strict=True):
        if gather:
            then_out.append(node(inner, "ScatterND", [base, at, renamed[name]], name + "/all"))
        elif name == logits_name or name == outputs[0]:
            then_out.append(node(inner, "Identity", [renamed[name]], name + "/all"))
        else:
            then_out.append(node(inner, "Where", [tested, renamed[name], nan_n], name + "/all"))
    else_nodes = []
    else_out = [node(else_nodes, "Identity", [original_logits], logits_name + "/untested"),
                node(else_nodes, "Identity", [tested], outputs[0] + "/untested")]
    if len(outputs) > 1:
        else_out.append(node(else_nodes, "Where", [tested, nan, nan], outputs[1] + "/untested"))
        else_out += [node(else_nodes, "Identity", [else_out[2]], o + "/untested") for o in outputs[2:]]

    # The logits' type is the model output's (a final Softmax keeps it); no shape inference.
    out_types = {o.name: o.type.tensor_type.elem_type for o in g.output}
    logits_type = out_types.get(logits_name) or g.output[0].type.tensor_type.elem_type or TensorProto.FLOAT

    def branch(name, nodes, outs, initializers=()):
        elems = [logits_type, TensorProto.BOOL] + [TensorProto.FLOAT] * (len(outs) - 2)
        return helper.make_graph(nodes, fresh(GATE_PREFIX + name), [],
                                 [helper.make_tensor_value_info(o, e, None)
                                  for o, e in zip(outs, elems, strict=True)], initializer=list(initializers))

    # With a focus class the branch recomputes the model on the tested rows: it owns its conv
    # weights. Without, it runs the bounded copy of what follows the first site, where owning
    # them bought nothing on the ResNet-18 and 2% on the EfficientNet, for twice the file.
    ops = OWN_WEIGHTS if own_weights and focus is not None else ()
    owned = _own_weights(inner, {i.name: i for i in g.initializer}, ops, fresh)

    gate = helper.make_node("If", [cond], [logits_name, *outputs], name=fresh(GATE_PREFIX + "if"),
                            then_branch=branch("then", inner, then_out, owned),
                            else_branch=branch("else", else_nodes, else_out))

    after = {logits_name}  # source nodes reading the switched logits (a final Softmax) go last
    first, last = [], []
    for n in original:
        if any(i in after for i in n.input):
            after.update(n.output)
            last.append(n)
        else:
            first.append(n)
    out = onnx.ModelProto()
    out.CopyFrom(full)
    del out.graph.node[:]
    out.graph.node.extend([*first, *outer_mmdf, *outer, gate, *last])
    out.graph.initializer.extend(new_inits)
    kept = {t for n in out.graph.node for t in n.output}  # the others live in the branches now
    listed = [vi for vi in out.graph.value_info if vi.name in kept]
    del out.graph.value_info[:]
    out.graph.value_info.extend(listed)
    return out


def _own_weights(nodes, inits: dict, ops, fresh) -> list[onnx.TensorProto]:
    """Copies, owned by the branch, of the outer weights its `ops` nodes read (renamed there).

    onnxruntime rewrites a Conv into its blocked (NCHWc) layout only where the weights are the
    graph's own initializers: a branch reading the outer graph's ran its convolutions at about
    half the speed of the outer graph's (MobileNetV2 at batch 64; docs/experiments.md, MMDF's
    focus branch owns its conv weights). The file grows by those weights; the session holds
    about what it held before (the outer plain copies were kept for the branch).
    """
    local = {}
    for n in nodes:
        if n.op_type not in ops:
            continue
        for k, name in enumerate(n.input):
            if k == 0 or name not in inits:
                continue
            if name not in local:
                local[name] = onnx.TensorProto()
                local[name].CopyFrom(inits[name])
                local[name].name = fresh(GATE_PREFIX + "own/" + name)
            n.input[k] = local[name].name
    return list(local.values())


def _outer_nodes(mmdf: list[onnx.NodeProto], source_made: set[str]) -> list[onnx.NodeProto]:
    """MMDF's nodes that run on the whole batch before the gate: those the screen and the
    feature test's flag depend on, and those that read nothing else (the feature score's
    output). Empty where the graph has no screen."""
    made = {o: n for n in mmdf for o in n.output if o}
    if SCREENED not in made:
        return []
    keep, stack = set(), [SCREENED] + ([FEATURE_FLAGGED] if FEATURE_FLAGGED in made else [])
    while stack:
        n = made.get(stack.pop())
        if n is not None and id(n) not in keep:
            keep.add(id(n))
            stack.extend(n.input)
    made_outer = {o for n in mmdf if id(n) in keep for o in n.output}
    for n in mmdf:  # topological: a node reading only the outer tests' tensors joins them
        reads = [i for i in n.input if i in made or i in source_made]
        if id(n) not in keep and reads and all(i in made_outer for i in reads):
            keep.add(id(n))
            made_outer.update(n.output)
    return [n for n in mmdf if id(n) in keep]
