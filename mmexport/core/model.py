"""Load and save ONNX models; find the model's input, logits output and clipping sites.

The sites (every activation a bound can clip, `Site`, `find_sites`) live in
`mmexport.core.sites`.
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
from .sites import Site, find_sites

# onnxruntime 1.31 loads IR <= 13, while onnx 1.23 writes IR 14 by default: every model
# we build from scratch is pinned to this IR unless it copies an input model's IR.
DEFAULT_IR_VERSION = 10


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
