"""What a model's input and output hold beyond their shapes.

- Whether the batch is fixed: most exported models (the ONNX zoo's, torch exports without
  dynamic axes) take batches of exactly N (mostly 1); onnxruntime then runs N at a time.
- Where the input keeps its channels. The defences take the input box per channel (the range
  of each channel over D), share a stamp's mask over the channels and shift images by a pixel
  along the spatial axes, so they need the channel axis. PyTorch exports are NCHW; TensorFlow
  models converted by tf2onnx take NHWC and transpose it to NCHW as their first node, which is
  how an NHWC input is recognised (or the caller says `layout="nhwc"`).
- Whether the output is logits or probabilities. A classifier exported with its final
  Softmax (or LogSoftmax) outputs probabilities; margins between probabilities saturate at 1,
  so margins, the bound search and MMDF use the Softmax's input, the logits, while the model
  keeps its output.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .errors import ParameterError
from .model import Model, onnx_opset

LAYOUTS = ("nchw", "nhwc")
PROBABILITY_OPS = ("Softmax", "LogSoftmax")
# Ops that may stand between the input and its transpose to NCHW (normalisation, casts).
_ELEMENTWISE = ("Sub", "Div", "Mul", "Add", "Cast", "Identity")
_DEFAULT_DOMAINS = ("", "ai.onnx")


def fixed_batch(model: Model) -> int | None:
    """The batch size the model's input is fixed at (most exports: 1), or None where it is free."""
    d = model.input_shape[0] if model.input_shape else None
    return d if isinstance(d, int) and d > 0 else None


@dataclass(frozen=True)
class Layout:
    """The input's layout, its channel axis (None for inputs without one, rank < 3) and why."""

    name: str
    channel_axis: int | None
    reason: str


def input_layout(model: Model, layout: str | None = None) -> Layout:
    """The layout of the model's input: `layout` when given ("nchw" or "nhwc"), else NHWC
    where the graph starts by transposing the input to NCHW, else NCHW."""
    rank = len(model.input_shape)
    if layout is not None and layout not in LAYOUTS:
        raise ParameterError("layout", f"{layout!r}: expected one of {', '.join(LAYOUTS)}")
    if layout is not None:
        reason = "given"
    elif rank >= 3 and _starts_with_transpose_to_nchw(model.proto, model.input_name, rank):
        layout, reason = "nhwc", "the graph transposes the input to NCHW first"
    else:
        layout, reason = "nchw", "no transpose to NCHW at the top of the graph"
    if rank < 3:
        return Layout(layout, None, "flat input: one range per feature")
    return Layout(layout, 1 if layout == "nchw" else rank - 1, reason)


def _starts_with_transpose_to_nchw(proto: onnx.ModelProto, name: str, rank: int) -> bool:
    to_nchw = [0, rank - 1, *range(1, rank - 1)]
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    for _ in range(8):  # through a few elementwise ops (x / 255 - mean ...)
        readers = consumers.get(name, [])
        if len(readers) != 1 or readers[0].domain not in _DEFAULT_DOMAINS:
            return False
        node = readers[0]
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            return perm == to_nchw
        if node.op_type not in _ELEMENTWISE:
            return False
        name = node.output[0]
    return False


@dataclass(frozen=True)
class Logits:
    """The tensor whose margins count (`name`) for the chosen output; `via` is the op that
    turns it into that output ("Softmax", "LogSoftmax"), None when the output is the logits."""

    name: str
    output: str
    via: str | None = None


def logits_of(model: Model) -> Logits:
    """The logits behind the model's chosen output: a final Softmax / LogSoftmax over the
    classes of an (N, K) output is looked through."""
    out = model.output_name
    node = next((n for n in model.proto.graph.node if out in n.output), None)
    if node is None or node.op_type not in PROBABILITY_OPS or node.domain not in _DEFAULT_DOMAINS:
        return Logits(out, out)
    rank = len(model.output_shape) if model.output_shape else None
    axis = next((a.i for a in node.attribute if a.name == "axis"), None)
    if axis is None:
        axis = 1 if onnx_opset(model.proto) < 13 else -1
    if rank not in (None, 2) or axis not in (1, -1):
        return Logits(out, out)
    return Logits(node.input[0], out, node.op_type)
