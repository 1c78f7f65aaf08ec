"""The checks every defence makes before any work: the right model, data that fits it."""

from __future__ import annotations

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


def check_clean_set(clean: Dataset, m: Model, k: int) -> None:
    """D fits the model's input and holds every class (the searches need each one)."""
    check_for_model(clean, m.input_shape, k)
    check_every_class(clean, k)
