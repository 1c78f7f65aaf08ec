"""What folding did to each site (`FoldReport`) and where a folded model records its bounds."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import onnx

from ...core.errors import MmexportError

METADATA_KEY = "mmexport.bounds"


@dataclass(frozen=True)
class SiteForm:
    """How one bounded site was written.

    form: "fold" (a unit clip, the bound folded into neighbouring weights), "clip" (scalar
    Clip, nothing to fold: a scalar bound or an unscaled channel group) or "min" (a Min node
    with the per-channel bound). reason: why a site is "min"; dead: channels with bound 0;
    at: the tensor the clip writes when it moved past a MaxPool (the site stays a Relu).
    """

    site: str
    form: str
    reason: str = ""
    dead: int = 0
    at: str = ""


@dataclass
class FoldReport:
    """The form of every bounded site, in graph order."""

    sites: list[SiteForm] = field(default_factory=list)

    def __getitem__(self, site: str) -> SiteForm:
        for s in self.sites:
            if s.site == site:
                return s
        raise KeyError(site)

    def count(self, form: str) -> int:
        return sum(s.form == form for s in self.sites)

    @property
    def counts(self) -> dict[str, int]:
        return {f: self.count(f) for f in ("fold", "clip", "min")}

    @property
    def fallbacks(self) -> list[SiteForm]:
        """Sites left as Min: the ones that still cost latency."""
        return [s for s in self.sites if s.form == "min"]

    def to_json(self) -> dict:
        return {"counts": self.counts, "sites": [asdict(s) for s in self.sites]}

    def lines(self) -> list[str]:
        """One line per site: `<form>  <site>  (<reason>)`, for the CLI to print."""
        out = []
        for s in self.sites:
            extra = [s.reason] if s.reason else []
            if s.at:
                extra.append(f"clipped after max-pooling, at {s.at!r}")
            if s.dead:
                extra.append(f"{s.dead} dead channel(s)")
            out.append(f"{s.form:<4}  {s.site}" + (f"  ({'; '.join(extra)})" if extra else ""))
        return out


def read_fold_metadata(proto: onnx.ModelProto) -> dict | None:
    """The `mmexport.bounds` entry of a folded model: bounds, forms, scales; else None."""
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            try:
                obj = json.loads(p.value)
            except json.JSONDecodeError:
                raise MmexportError(f"metadata {METADATA_KEY!r}: not valid JSON") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("bounds"), dict):
                raise MmexportError(f"metadata {METADATA_KEY!r}: no 'bounds' object")
            return obj
    return None
