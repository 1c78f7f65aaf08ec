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

The same holds for every positively homogeneous activation, act(a / z) * z = act(a) for
z > 0: LeakyRelu and PRelu sites fold too, with a scalar `Min` after them in scaled units
(a LeakyRelu channel bounded at 0 does not: min(leaky(a), 0) is not 0, it keeps `Min`). No
other activation commutes with a scale (gelu(a / z) * z != gelu(a)): a GELU, SiLU, ELU, ...
site keeps its `Min`, with that reason reported.

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
`mmexport.graph.rewrite.extract_bounds` reads back for folded sites.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from ...core.bounds import Bounds, check_bounds_for_sites
from ...core.model import find_sites, onnx_opset
from ..edit import Namer, restore_model_fields, value_types
from .plan import Plan
from .report import METADATA_KEY, FoldReport, SiteForm, read_fold_metadata
from .writer import Writer, write_metadata

__all__ = ["METADATA_KEY", "FoldReport", "SiteForm", "fold_bounds", "read_fold_metadata"]


def fold_bounds(
    proto: onnx.ModelProto, bounds: Bounds, *, sites=None
) -> tuple[onnx.ModelProto, FoldReport]:
    """A new model with `bounds` folded into the weights where that is exact, Min elsewhere.

    Outputs equal those of `apply_bounds(..., form="min")` up to float rounding; `proto`
    is left untouched. Returns the model and the form used per bounded site.
    """
    shapes, elem_types = value_types(proto)
    if sites is None:
        sites = find_sites(proto, shapes)
    check_bounds_for_sites(bounds, sites)
    graph = gs.import_onnx(proto)
    plan = Plan(graph, shapes, proto)
    by_name = {s.name: s for s in sites}
    decisions = plan.solve(bounds, by_name)
    fresh = Namer(set(graph.tensors()), {n.name for n in graph.nodes if n.name})
    report = Writer(plan, fresh, elem_types, onnx_opset(proto), by_name).write(decisions)

    graph.cleanup().toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    restore_model_fields(out, proto)
    if report.count("fold"):
        write_metadata(out, bounds, report, plan)
    return out, report
