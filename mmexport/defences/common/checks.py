"""The checks every defence makes before any work: the right model, data that fits it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...core.data import Dataset, check_every_class, check_for_model
from ...core.errors import MmexportError
from ...core.model import MMDF_OUTPUTS, Model
from ...core.provenance import get_metadata
from ...core.sites import NO_SITES
from ...graph.rewrite import count_bounded_sites


def check_original(m: Model, *, hardened_hint: str = "") -> int:
    """An original classifier (not hardened, not MMDF) with sites and >= 2 classes; returns K."""
    where = m.path or "model"
    mmdf = MMDF_OUTPUTS[0] in {o.name for o in m.proto.graph.output}
    if mmdf or get_metadata(m.proto).get("mmexport.method") == "mmdf":
        raise MmexportError(f"{where}: already an MMDF model; give the original model")
    if count_bounded_sites(m.proto)["total"]:
        raise MmexportError(
            f"{where}: already hardened by mmexport (bounded sites found); give the original model{hardened_hint}"
        )
    if not m.sites:
        raise MmexportError(f"{where}: {NO_SITES}")
    if m.num_classes is None or m.num_classes < 2:
        raise MmexportError(
            f"{where}: output {m.output_name!r} has no static class dimension >= 2 "
            f"(shape {m.output_shape or 'unknown'})"
        )
    return m.num_classes


def check_made_from(proto, source_sha: str, where: str, *, required: bool = False) -> None:
    """`proto` was hardened by mmexport from the model of hash `source_sha` (its
    `mmexport.source_sha256`; a model without one passes unless `required`)."""
    made_from = get_metadata(proto).get("mmexport.source_sha256")
    if not made_from and required:
        raise MmexportError(f"{where}: not written by mmexport harden (no mmexport.source_sha256 metadata)")
    if made_from and made_from != source_sha:
        raise MmexportError(
            f"{where}: was hardened from another model (source sha256 {made_from[:12]}..., "
            f"this model {source_sha[:12]}...)"
        )


def with_site_shapes(m: Model, x: np.ndarray) -> Model:
    """`m` with the rank and channel count of every site that shape inference left unknown,
    read from one onnxruntime pass over x[:1]; `m` itself where none is.

    A transformer exported by torch reshapes with sizes computed at run time, so ONNX shape
    inference knows nothing of its MLP's GELU; per-channel bounds need the rank to be written.
    """
    unknown = [s.name for s in m.sites if s.rank is None or (s.rank >= 2 and s.channels is None)]
    if not unknown or len(x) == 0:
        return m
    from ...runtime.sessions import tensor_summaries

    axes = {s.name: s.axis for s in m.sites}

    def shape(name, a):
        return np.array([[a.ndim, a.shape[axes[name]] if a.ndim > 1 else 0]])

    got = tensor_summaries(m.proto, unknown, x[:1], shape, input_name=m.input_name)
    sites = [replace(s, rank=int(got[s.name][0, 0]), channels=int(got[s.name][0, 1]) or None)
             if s.name in got else s for s in m.sites]
    return replace(m, sites=sites)


def check_clean_set(clean: Dataset, m: Model, k: int) -> None:
    """D fits the model's input and holds every class (the searches need each one)."""
    check_for_model(clean, m.input_shape, k)
    check_every_class(clean, k)
