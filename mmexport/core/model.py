"""Load and save ONNX models; find the model's input, logits output and clipping sites.

A *site* is a ReLU-like node whose output we may bound from above: every `Relu`, every
`Clip` whose lower bound is 0 (ReLU6), and every `HardSigmoid(alpha=1, beta=0)`, which is
clip(x, 0, 1) (the form a folded bound takes, `mmexport.graph.fold`). A site is named by its output tensor, the
same keying Polygraphy's SetUpperBound uses, so bounds files travel between tools.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from .errors import MmexportError, first_line
from .provenance import atomic_write_bytes, check_output_path

# onnxruntime 1.31 loads IR <= 13, while onnx 1.23 writes IR 14 by default: every model
# we build from scratch is pinned to this IR unless it copies an input model's IR.
DEFAULT_IR_VERSION = 10


@dataclass(frozen=True)
class Site:
    """One bounded activation: the output tensor of a Relu, a Clip(min=0) or a unit clip."""

    name: str
    node: str
    op: str
    channels: int | None
    rank: int | None = None


@dataclass
class Model:
    """An ONNX classifier with its chosen input, logits output and sites."""

    proto: onnx.ModelProto
    input_name: str
    output_name: str
    input_shape: tuple
    output_shape: tuple
    sites: list[Site] = field(default_factory=list)
    path: Path | None = None

    @property
    def opset(self) -> int:
        return onnx_opset(self.proto)

    @property
    def ir_version(self) -> int:
        return int(self.proto.ir_version)

    @property
    def num_classes(self) -> int | None:
        dim = self.output_shape[-1] if self.output_shape else None
        return dim if isinstance(dim, int) else None

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        raise MmexportError(f"no site named {name!r} in the model")


def onnx_opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 1


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (external data included) and check it, with one-line errors."""
    path = Path(path)
    if not path.exists():
        raise MmexportError(f"{path}: no such file")
    if path.is_dir():
        raise MmexportError(f"{path}: is a directory, expected an .onnx file")
    if path.stat().st_size == 0:
        raise MmexportError(f"{path}: empty file, expected an ONNX model")
    try:
        proto = onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises several types
        raise MmexportError(f"{path}: not a readable ONNX model ({first_line(exc)})") from None
    if len(proto.graph.node) == 0:
        raise MmexportError(f"{path}: not an ONNX model (no graph nodes; truncated or wrong file?)")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise MmexportError(f"{path}: invalid ONNX model ({first_line(exc)})") from None
    return proto


def initializer_names(graph: onnx.GraphProto) -> set[str]:
    return {init.name for init in graph.initializer}


def replace_initializers(proto: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of `proto` with the named initializers set to new values of the same shape.

    How re-fitted or fine-tuned weights go back into a model: names, graph and IR stay.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    by_name = {init.name: init for init in out.graph.initializer}
    for name, value in values.items():
        init = by_name.get(name)
        if init is None:
            raise MmexportError(f"no initializer named {name!r} to replace")
        old = numpy_helper.to_array(init)
        value = np.asarray(value)
        if value.shape != old.shape:
            raise MmexportError(f"initializer {name!r}: new shape {value.shape} differs from {old.shape}")
        init.CopyFrom(numpy_helper.from_array(value.astype(old.dtype), name))
    return out


def dims(value_info: onnx.ValueInfoProto) -> tuple:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return ()
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim)


def _choose(kind: str, names: list[str], wanted: str | None, where: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise MmexportError(f"{where}: no graph {kind} named {wanted!r} (has: {', '.join(names)})")
        return wanted
    if len(names) == 1:
        return names[0]
    if not names:
        raise MmexportError(f"{where}: the graph has no {kind}")
    raise MmexportError(
        f"{where}: the graph has {len(names)} {kind}s ({', '.join(names)}); choose one with --{kind} NAME"
    )


def from_proto(
    proto: onnx.ModelProto,
    *,
    input_name: str | None = None,
    output_name: str | None = None,
    path: str | os.PathLike | None = None,
) -> Model:
    """Wrap a checked ModelProto: pick input/output, infer shapes, find sites."""
    where = str(path) if path is not None else "model"
    graph = proto.graph
    inits = initializer_names(graph)
    # Models of IR < 4 list every initializer among the graph inputs.
    inputs = [vi.name for vi in graph.input if vi.name not in inits]
    outputs = [vi.name for vi in graph.output]
    inp = _choose("input", inputs, input_name, where)
    out = _choose("output", outputs, output_name, where)
    try:
        inferred = shape_inference.infer_shapes(proto)
    except Exception:
        inferred = proto
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shapes[vi.name] = dims(vi)
    return Model(
        proto=proto,
        input_name=inp,
        output_name=out,
        input_shape=shapes.get(inp, ()),
        output_shape=shapes.get(out, ()),
        sites=find_sites(proto, shapes),
        path=Path(path) if path is not None else None,
    )


def load_model(path: str | os.PathLike, *, input_name: str | None = None, output_name: str | None = None) -> Model:
    """Read, check and wrap an ONNX classifier."""
    return from_proto(read_onnx(path), input_name=input_name, output_name=output_name, path=path)


def _const_value(graph: onnx.GraphProto, name: str):
    """The value of a tensor that is an initializer or a Constant node's output, else None."""
    if not name:
        return None
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and name in node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
    return None


def clip_range(graph: onnx.GraphProto, node: onnx.NodeProto, opset: int) -> tuple[float, float]:
    """(min, max) of a Clip node: attributes below opset 11, optional inputs from 11."""
    lo, hi = -np.inf, np.inf
    if opset < 11:
        for attr in node.attribute:
            if attr.name == "min":
                lo = float(attr.f)
            elif attr.name == "max":
                hi = float(attr.f)
    else:
        if len(node.input) > 1 and node.input[1]:
            v = _const_value(graph, node.input[1])
            lo = float(v) if v is not None else np.nan
        if len(node.input) > 2 and node.input[2]:
            v = _const_value(graph, node.input[2])
            hi = float(v) if v is not None else np.nan
    return lo, hi


def is_unit_clip(node) -> bool:
    """A HardSigmoid with alpha 1 and beta 0: max(0, min(1, x)), a ReLU bounded at 1.

    Takes an onnx NodeProto or a graphsurgeon Node."""
    if isinstance(node, onnx.NodeProto):
        op, attrs = node.op_type, {a.name: a.f for a in node.attribute}
    else:
        op, attrs = node.op, node.attrs
    if op != "HardSigmoid":
        return False
    return float(attrs.get("alpha", 0.2)) == 1.0 and float(attrs.get("beta", 0.5)) == 0.0


def site_max(graph: onnx.GraphProto, node: onnx.NodeProto, opset: int) -> float:
    """The upper end a site already has: inf for a Relu, the max of a Clip (NaN when computed
    at run time), 1 for a unit clip."""
    if node.op_type == "Clip":
        return clip_range(graph, node, opset)[1]
    return 1.0 if is_unit_clip(node) else np.inf


def find_sites(proto: onnx.ModelProto, shapes: dict[str, tuple] | None = None) -> list[Site]:
    """Every Relu, every Clip with min 0 and every unit clip, in graph order, named by
    output tensor."""
    shapes = shapes or {}
    opset = onnx_opset(proto)
    sites = []
    for node in proto.graph.node:
        if node.op_type == "Relu" or is_unit_clip(node):
            pass
        elif node.op_type == "Clip":
            lo, _ = clip_range(proto.graph, node, opset)
            if lo != 0.0:
                continue
        else:
            continue
        shape = shapes.get(node.output[0])
        channels = shape[1] if shape and len(shape) > 1 and isinstance(shape[1], int) else None
        sites.append(
            Site(
                name=node.output[0],
                node=node.name,
                op=node.op_type,
                channels=channels,
                rank=len(shape) if shape else None,
            )
        )
    return sites


def save_model(proto: onnx.ModelProto, path: str | os.PathLike, *, force: bool = False, inputs=()) -> Path:
    """Check and atomically write a model; keeps its IR version as set on the proto."""
    path = check_output_path(path, force=force, inputs=inputs)
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


# The outputs an MMDF model adds beside its logits (named in mmexport.defences.mmdf.graph).
MMDF_OUTPUTS = ("mmdf_detected", "mmdf_score", "mmdf_feature_score")


def as_model(model, *, input_name: str | None = None, output_name: str | None = None) -> Model:
    """A Model from a path, a ModelProto or a Model; an MMDF model's logits output is found
    without being named."""
    if isinstance(model, Model):
        if input_name is None and output_name is None:
            return model
        return from_proto(
            model.proto, input_name=input_name, output_name=output_name, path=model.path
        )
    path = None
    if not isinstance(model, onnx.ModelProto):
        path, model = model, read_onnx(model)
    if output_name is None:
        output_name = _mmdf_logits(model)
    return from_proto(model, input_name=input_name, output_name=output_name, path=path)


def _mmdf_logits(proto: onnx.ModelProto) -> str | None:
    """The logits output of an MMDF model (beside its flag and score outputs), else None."""
    names = [o.name for o in proto.graph.output]
    if MMDF_OUTPUTS[0] not in names:
        return None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("mmexport.mmdf.output") in names:
        return meta["mmexport.mmdf.output"]
    rest = [n for n in names if n not in MMDF_OUTPUTS]
    return rest[0] if len(rest) == 1 else None
