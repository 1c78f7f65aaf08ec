"""MMDF backing a hardened model: the inputs MMDF does not flag get the hardened model's logits.

`harden --method mmac-ft` removes the triggers it can name (its stamp, the scan's shift) from
the weights; a trigger it cannot name (a 20% blend on the real tier's EfficientNet) passes
untouched, and MMDF, which needs no trigger named, catches it at test time. Stacked, MMDF's
tests run on the original model as they were calibrated; every input gets the hardened
model's logits, except that in a flagged row the classes MMDF's fix suppresses (the original
prediction, the suspected target) stay suppressed: the hardened model's best other class,
which for a trigger mmac-ft unlearned is mostly the true one (MMDF's own fix, the bounded
original's best other class, is often not). Where the output is probabilities (a final
Softmax), a flagged row gets MMDF's output as it is. The graph then holds both models'
weights and runs the hardened one on every input: about the hardened model's cost on top
of MMDF's. Torch-free.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import compose, helper

from ...core.errors import MmexportError
from ...core.model import onnx_opset
from ...core.provenance import get_metadata
from ...graph.rewrite import all_nodes
from ..common.checks import check_made_from
from .graph import DETECTED, SUPPRESSED, is_mmdf_model

SERVED_PREFIX = "mmdf/served/"
SWITCHED = "mmdf/switched/"


def check_served(served: onnx.ModelProto, original: onnx.ModelProto, *, where: str, output_name: str,
                 source_sha: str) -> dict:
    """What the stacked graph needs of the served model, checked before any work; returns its
    description for the report (file, method)."""
    if is_mmdf_model(served):
        raise MmexportError(f"{where}: an MMDF model; --serve takes a model harden wrote")
    check_made_from(served, source_sha, where, required=True)
    if onnx_opset(served) != onnx_opset(original) or served.ir_version != original.ir_version:
        raise MmexportError(f"{where}: opset {onnx_opset(served)}, IR {served.ir_version}; the model has opset "
                            f"{onnx_opset(original)}, IR {original.ir_version}")
    ins, want = _inputs(served), _inputs(original)
    if ins != want:
        raise MmexportError(f"{where}: inputs {list(ins)} differ from the model's {list(want)}")
    outs = {o.name: o.type for o in served.graph.output}
    theirs = {o.name: o.type for o in original.graph.output}
    if output_name not in outs or outs[output_name] != theirs.get(output_name):
        raise MmexportError(f"{where}: no output {output_name!r} typed as the model's")
    return {"file": where, "method": get_metadata(served).get("mmexport.method")}


def _inputs(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The graph inputs that are not initializers (older IRs list those too)."""
    inits = {i.name for i in proto.graph.initializer}
    return {i.name: i.type for i in proto.graph.input if i.name not in inits}


def _rename_inputs(graph: onnx.GraphProto, names: dict[str, str]) -> None:
    """Node inputs renamed, in subgraphs too (they read outer-scope tensors by name)."""
    for node in all_nodes(graph):
        for i, name in enumerate(node.input):
            if name in names:
                node.input[i] = names[name]


def serve_unflagged(mmdf: onnx.ModelProto, served: onnx.ModelProto, output_name: str, *,
                    logits: bool = True) -> onnx.ModelProto:
    """`mmdf` whose output `output_name` is `served`'s output of that name in the rows
    `mmdf_detected` leaves unflagged, and in flagged rows too where `logits` (the output is
    the logits MMDF switches), but for the classes MMDF suppressed there. Both protos are left
    untouched."""
    theirs = compose.add_prefix(served, SERVED_PREFIX, inplace=False)
    shared = {SERVED_PREFIX + name: name for name in _inputs(served)}
    _rename_inputs(theirs.graph, shared)
    out = onnx.ModelProto()
    out.CopyFrom(mmdf)
    g = out.graph
    switched = SWITCHED + output_name
    for node in g.node:  # MMDF's output becomes a tensor of its own; its readers keep reading it
        for i, name in enumerate(node.output):
            if name == output_name:
                node.output[i] = switched
    _rename_inputs(g, {output_name: switched})
    g.node.extend(theirs.graph.node)
    g.initializer.extend(theirs.graph.initializer)
    g.sparse_initializer.extend(theirs.graph.sparse_initializer)
    g.value_info.extend(theirs.graph.value_info)
    column = helper.make_tensor(SERVED_PREFIX + "column", onnx.TensorProto.INT64, [2], [-1, 1])
    g.initializer.append(column)
    keep = SERVED_PREFIX + "flagged"
    g.node.append(helper.make_node("Reshape", [DETECTED, column.name], [keep], name=keep))
    if logits:  # flagged rows keep MMDF's suppressed classes, the served logits elsewhere
        elem = {o.name: o.type.tensor_type.elem_type for o in out.graph.output}[output_name]
        low = -min(-SUPPRESSED, float(np.finfo(helper.tensor_dtype_to_np_dtype(elem)).max) / 2)
        half = helper.make_tensor(SERVED_PREFIX + "half_suppressed", elem, [], [low / 2])
        g.initializer.append(half)
        g.node.extend([
            helper.make_node("Less", [switched, half.name], [SERVED_PREFIX + "suppressed"],
                             name=SERVED_PREFIX + "suppressed"),
            helper.make_node("And", [keep, SERVED_PREFIX + "suppressed"], [SERVED_PREFIX + "kept"],
                             name=SERVED_PREFIX + "kept"),
        ])
        keep = SERVED_PREFIX + "kept"
    g.node.append(helper.make_node("Where", [keep, switched, SERVED_PREFIX + output_name], [output_name],
                                   name=SERVED_PREFIX + "switch"))
    domains = {o.domain for o in out.opset_import}
    out.opset_import.extend(o for o in served.opset_import if o.domain not in domains)
    known = {(f.domain, f.name) for f in out.functions}
    out.functions.extend(f for f in theirs.functions if (f.domain, f.name) not in known)
    return out


def read_served(serve, original: onnx.ModelProto, *, output_name: str,
                source_sha: str) -> tuple[onnx.ModelProto | None, dict | None]:
    """`serve` (None, a path or a ModelProto) read and checked against the original, and its
    report entry ({"file", "method", "sha256"})."""
    from ...core.model import read_onnx
    from ...core.provenance import sha256_bytes, sha256_file

    if serve is None:
        return None, None
    if isinstance(serve, onnx.ModelProto):
        proto, where, sha = serve, "served model", sha256_bytes(serve.SerializeToString())
    else:
        proto, where, sha = read_onnx(serve), str(serve), sha256_file(serve)
    info = check_served(proto, original, where=where, output_name=output_name, source_sha=source_sha)
    return proto, info | {"sha256": sha}
