"""mmexport: harden ONNX classifiers with maximum-margin activation clipping.

The flat public API. Every defence takes an ONNX model (path, ModelProto or Model) and a
small clean labelled set (.npz or image folder path, Dataset or (x, y)); its settings are one config
dataclass (`MmacConfig`, `MmomConfig`, `MmdfConfig`, `ScanConfig`) or keyword overrides of
its fields. torch and onnxruntime load lazily: `validate` must not pay for torch.
"""

from importlib import import_module

__version__ = "0.1.0"

from .core.bounds import Bounds, load_bounds  # noqa: E402
from .core.data import Dataset, load_npz, save_npz  # noqa: E402
from .core.errors import MmexportError, ParameterError  # noqa: E402
from .core.model import Model, Site, load_model, save_model  # noqa: E402

# name -> module that defines it, imported on first use.
_LAZY = {
    "load_data": "core.sources",
    "Preprocess": "core.images",
    "load_image_folder": "core.images",
    "harden": "defences.harden",
    "HardenResult": "defences.harden",
    "HardenReport": "defences.harden",
    "MmacConfig": "defences.mmac.config",
    "MmomConfig": "defences.mmom.config",
    "detect": "defences.mmdf.detector",
    "DetectResult": "defences.mmdf.detector",
    "DetectReport": "defences.mmdf.detector",
    "MmdfConfig": "defences.mmdf.config",
    "scan": "defences.mmbd.scan",
    "ScanResult": "defences.mmbd.scan",
    "ScanConfig": "defences.mmbd.scan",
    "apply_bounds": "graph.rewrite",
    "extract_bounds": "graph.rewrite",
    "validate": "runtime.metrics",
    "ValidationReport": "runtime.metrics",
    "compare": "comparison",
    "CompareReport": "comparison",
}

__all__ = [
    "Bounds",
    "CompareReport",
    "Dataset",
    "DetectReport",
    "DetectResult",
    "HardenReport",
    "HardenResult",
    "MmacConfig",
    "MmdfConfig",
    "MmexportError",
    "MmomConfig",
    "Model",
    "ParameterError",
    "Preprocess",
    "ScanConfig",
    "ScanResult",
    "Site",
    "ValidationReport",
    "__version__",
    "apply_bounds",
    "compare",
    "detect",
    "extract_bounds",
    "harden",
    "load_bounds",
    "load_data",
    "load_image_folder",
    "load_model",
    "load_npz",
    "save_model",
    "save_npz",
    "scan",
    "validate",
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'mmexport' has no attribute {name!r}")


def __dir__():
    return __all__
