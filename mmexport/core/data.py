"""Datasets as .npz files: `x` float32 (N, ...) shaped like the model input, `y` int64 labels.

An attack set adds `y_true` (the true label); its `y` is the attacker's target per sample.
An optional `classes` (strings) names the classes in index order (`mmexport data pack` keeps a
folder's class names there). Files are read with allow_pickle=False: a pickle inside an .npz
is refused, never executed. Image folders are read by `images.py`; `sources.load_data` takes
either.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MmexportError


@dataclass(frozen=True)
class Dataset:
    """Images and labels; `y_true` is set for attack sets only; `classes` names the classes where known."""

    x: np.ndarray
    y: np.ndarray
    y_true: np.ndarray | None = None
    path: Path | None = None
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def is_attack(self) -> bool:
        return self.y_true is not None

    def subset(self, index) -> Dataset:
        yt = None if self.y_true is None else self.y_true[index]
        return Dataset(self.x[index], self.y[index], yt, self.path, self.classes)


def load_npz(path: str | os.PathLike, *, attack: bool = False) -> Dataset:
    """Read and check a dataset; `attack=True` requires `y_true`."""
    path = Path(path)
    if not path.exists():
        raise MmexportError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MmexportError(f"{path}: empty file, expected an .npz dataset")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise MmexportError(f"{path}: holds pickled objects; refusing to load them") from None
        raise MmexportError(f"{path}: not a readable .npz file ({exc})") from None
    except Exception as exc:
        raise MmexportError(f"{path}: not a readable .npz file ({exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise MmexportError(f"{path}: missing key {key!r} (has: {', '.join(arrays) or 'none'})")
    if attack and "y_true" not in arrays:
        raise MmexportError(f"{path}: an attack set needs key 'y_true' (the true labels)")
    x, y = arrays["x"], arrays["y"]
    y_true = arrays.get("y_true")
    if x.dtype.kind not in "fiu":
        raise MmexportError(f"{path}: key 'x' has dtype {x.dtype}, expected numbers")
    if y.dtype.kind not in "iu":
        raise MmexportError(f"{path}: key 'y' has dtype {y.dtype}, expected integer labels")
    if x.ndim < 2:
        raise MmexportError(f"{path}: key 'x' has shape {x.shape}, expected (N, ...)")
    if len(x) == 0:
        raise MmexportError(f"{path}: no samples")
    if y.shape != (len(x),):
        raise MmexportError(f"{path}: key 'y' has shape {y.shape}, expected ({len(x)},)")
    if y_true is not None:
        if y_true.dtype.kind not in "iu" or y_true.shape != (len(x),):
            raise MmexportError(f"{path}: key 'y_true' must be {len(x)} integer labels")
        y_true = y_true.astype(np.int64)
    classes = arrays.get("classes")
    if classes is not None:
        if classes.dtype.kind != "U" or classes.ndim != 1:
            raise MmexportError(f"{path}: key 'classes' must be a list of class names")
        classes = tuple(str(c) for c in classes)
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise MmexportError(f"{path}: key 'x' has NaN or Inf values in {bad} samples")
    return Dataset(x=x, y=y.astype(np.int64), y_true=y_true, path=path, classes=classes)


def check_for_model(data: Dataset, input_shape: tuple, num_classes: int | None, *, name: str = "") -> None:
    """Shapes must match the model input (free dims aside) and labels must be valid classes."""
    where = str(data.path) if data.path else (name or "data")
    if input_shape:
        want = tuple(input_shape[1:])
        got = tuple(data.x.shape[1:])
        ok = len(want) == len(got) and all(
            not isinstance(w, int) or w <= 0 or w == g for w, g in zip(want, got, strict=True)
        )
        if not ok:
            shown = ", ".join(str(w) if isinstance(w, int) and w > 0 else "?" for w in want)
            raise MmexportError(f"{where}: samples shaped {got} do not match the model input (N, {shown})")
    if num_classes is not None:
        for key, labels in (("y", data.y), ("y_true", data.y_true)):
            if labels is None:
                continue
            bad = (labels < 0) | (labels >= num_classes)
            if bad.any():
                raise MmexportError(
                    f"{where}: key {key!r} has labels outside 0..{num_classes - 1} (e.g. {int(labels[bad][0])})"
                )


def check_every_class(data: Dataset, num_classes: int) -> None:
    """The clean set must hold each class at least once: bounds are fitted per class."""
    counts = np.bincount(data.y, minlength=num_classes)
    missing = [c for c in range(num_classes) if counts[c] == 0]
    if missing:
        where = str(data.path) if data.path else "clean set"
        raise MmexportError(f"{where}: no sample of class(es) {', '.join(map(str, missing))}")


def npz_bytes(data: Dataset) -> bytes:
    """The dataset as a compressed .npz (x, y[, y_true][, classes]), for an atomic write."""
    arrays = {"x": data.x.astype(np.float32), "y": data.y.astype(np.int64)}
    if data.y_true is not None:
        arrays["y_true"] = data.y_true.astype(np.int64)
    if data.classes is not None:
        arrays["classes"] = np.asarray(data.classes, dtype=str)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def save_npz(path: str | os.PathLike, data: Dataset) -> None:
    Path(path).write_bytes(npz_bytes(data))


def as_dataset(data, *, attack: bool = False, model=None) -> Dataset:
    """A Dataset from a Dataset, an (x, y) pair, or a path (.npz or image folder): what the API takes.

    `model` (the one the data is for) fills an image folder's preprocessing from its input shape.
    """
    if isinstance(data, Dataset):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        return Dataset(np.asarray(data[0], np.float32), np.asarray(data[1], np.int64))
    from .sources import load_data  # sources reads through this module

    return load_data(data, attack=attack, model=model)
