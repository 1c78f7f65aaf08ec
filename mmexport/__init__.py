"""mmexport: harden ONNX classifiers with maximum-margin activation clipping.

Flat public API; see README.md for the commands built on it.
"""

__version__ = "0.1.0"

from .bounds import Bounds, load_bounds  # noqa: E402
from .data import Dataset, load_npz  # noqa: E402
from .errors import MmexportError  # noqa: E402
from .model import Model, Site, load_model  # noqa: E402

__all__ = [
    "__version__",
    "Bounds",
    "Dataset",
    "Model",
    "MmexportError",
    "Site",
    "apply_bounds",
    "compare",
    "detect",
    "harden",
    "load_bounds",
    "load_model",
    "load_npz",
    "scan",
    "validate",
]


def __getattr__(name):
    # torch and onnxruntime load lazily: `validate` must not pay for torch, `harden` needs it.
    if name == "harden":
        from .pipeline import harden

        return harden
    if name == "HardenResult":
        from .pipeline import HardenResult

        return HardenResult
    if name == "apply_bounds":
        from .rewrite import apply_bounds

        return apply_bounds
    if name == "validate":
        from .runtime import validate

        return validate
    if name in ("compare", "CompareReport"):
        # The module is `comparison`, not `compare`: a submodule named like the function
        # would replace it as the package attribute once imported.
        from . import comparison

        return getattr(comparison, name)
    if name in ("scan", "ScanResult"):
        from .search import scan as scan_module

        return getattr(scan_module, name)
    if name in ("detect", "DetectResult"):
        from . import mmdf

        return getattr(mmdf, name)
    raise AttributeError(f"module 'mmexport' has no attribute {name!r}")
