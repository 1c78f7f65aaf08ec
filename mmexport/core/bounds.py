"""Bounds: one upper bound per channel (shape [C]) or one scalar (shape []) per site.

Serialised as JSON keyed by site tensor name, the keying Polygraphy's SetUpperBound uses.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MmexportError

FORMAT = "mmexport.bounds/1"


@dataclass
class Bounds:
    """Upper bounds keyed by site name; values are float32 arrays of shape [C] or []."""

    values: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = {k: np.asarray(v, dtype=np.float32) for k, v in self.values.items()}
        for k, v in self.values.items():
            if v.ndim > 1:
                raise MmexportError(f"bounds for site {k!r}: shape {v.shape}, expected [C] or scalar")
            if not np.isfinite(v).all() or (v < 0).any():
                raise MmexportError(f"bounds for site {k!r}: values must be finite and >= 0")

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self):
        return iter(self.values)

    def __getitem__(self, site: str) -> np.ndarray:
        return self.values[site]

    def items(self):
        return self.values.items()

    @property
    def granularity(self) -> str:
        return "layer" if all(v.ndim == 0 for v in self.values.values()) else "channel"

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "meta": self.meta,
            "bounds": {k: v.tolist() for k, v in self.values.items()},
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)

    @classmethod
    def from_json(cls, obj, *, where: str = "bounds") -> Bounds:
        if not isinstance(obj, dict):
            raise MmexportError(f"{where}: expected a JSON object")
        raw = obj.get("bounds", obj if "format" not in obj else None)
        if not isinstance(raw, dict):
            raise MmexportError(f"{where}: key 'bounds' must map site names to numbers or lists")
        values = {}
        for k, v in raw.items():
            try:
                arr = np.asarray(v, dtype=np.float32)
            except (TypeError, ValueError):
                raise MmexportError(f"{where}: site {k!r} has a non-numeric bound") from None
            values[k] = arr
        try:
            return cls(values, dict(obj.get("meta", {})) if "format" in obj else {})
        except MmexportError as exc:
            raise MmexportError(f"{where}: {exc}") from None


def load_bounds(path: str | os.PathLike) -> Bounds:
    path = Path(path)
    if not path.exists():
        raise MmexportError(f"{path}: no such file")
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MmexportError(f"{path}: not valid JSON ({exc})") from None
    return Bounds.from_json(obj, where=str(path))


def check_bounds_for_sites(bounds: Bounds, sites, *, where: str = "bounds") -> None:
    """Every key must be a site, and per-channel bounds must match its channel count."""
    by_name = {s.name: s for s in sites}
    for k, v in bounds.items():
        site = by_name.get(k)
        if site is None:
            raise MmexportError(f"{where}: key {k!r} is not a site of the model")
        if v.ndim == 1 and site.channels is not None and v.shape[0] != site.channels:
            raise MmexportError(f"{where}: site {k!r} has {site.channels} channels but {v.shape[0]} bounds")
