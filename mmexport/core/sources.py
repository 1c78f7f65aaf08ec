"""Where a dataset comes from: `load_data` reads an .npz file or an image folder alike."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .data import Dataset, load_npz
from .errors import MmexportError, ParameterError
from .images import Preprocess, load_attack_folder, load_image_folder

ACCEPTED = "an .npz (x, y[, y_true]) or an image folder DIR/<class>/*.png"
ACCEPTED_ATTACK = ("an .npz (x, y = target, y_true) or an image folder (labels.csv, or DIR/<true class>/*.png "
                   "and a target)")


def _is_zip(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def load_data(
    path: str | os.PathLike,
    *,
    attack: bool = False,
    preprocess: Preprocess | None = None,
    model=None,
    target: int | None = None,
    labels: str | os.PathLike | None = None,
) -> Dataset:
    """A Dataset from an .npz file or an image folder, whichever `path` is.

    For a folder, `preprocess` says how images become model inputs (default `Preprocess()`:
    pixels / 255); `model` (path, ModelProto or Model) fills what it leaves unset from the
    model's input shape (size, channels, layout) and guards the class count. `attack=True`
    reads an attack set: y = the attacker's target, y_true = the true class; a folder takes
    `target` and `labels` (a CSV) as `load_attack_folder` says. An .npz already holds model
    inputs and labels: preprocessing, `target` and `labels` do not apply to it.
    """
    path = Path(path)
    if path.is_dir():
        num_classes = None
        prep = preprocess or Preprocess()
        if model is not None:
            from .model import as_model

            m = as_model(model)
            prep = prep.for_input(m.input_shape)
            num_classes = m.num_classes
        if attack:
            return load_attack_folder(path, preprocess=prep, target=target, labels=labels, num_classes=num_classes)
        if target is not None or labels is not None:
            raise ParameterError("target" if target is not None else "labels",
                                 f"{path}: a target and a labels CSV apply to attack sets only")
        return load_image_folder(path, preprocess=prep, num_classes=num_classes)
    if not path.exists():
        raise MmexportError(f"{path}: no such file or folder")
    if path.suffix.lower() != ".npz" and not _is_zip(path):
        raise MmexportError(f"{path}: not an .npz file or an image folder; "
                            f"{'an attack set' if attack else 'data'} is {ACCEPTED_ATTACK if attack else ACCEPTED}")
    for name, value in (("preprocess", preprocess), ("target", target), ("labels", labels)):
        if value is not None:
            raise ParameterError(name, f"{path}: an .npz holds model inputs and labels already; "
                                       f"{name} applies to image folders only")
    return load_npz(path, attack=attack)


def describe(data: Dataset) -> dict:
    """What a dataset holds: size, array shape and range, classes and counts (plain JSON)."""
    k = int(max(data.y.max(), -1 if data.y_true is None else data.y_true.max())) + 1
    if data.classes is not None:
        k = max(k, len(data.classes))
    labels = data.y_true if data.is_attack else data.y
    out = {
        "path": str(data.path) if data.path else None,
        "source": "folder" if data.path is not None and data.path.is_dir() else "npz",
        "n": len(data),
        "shape": list(data.x.shape),
        "dtype": str(data.x.dtype),
        "min": float(data.x.min()),
        "max": float(data.x.max()),
        "attack": data.is_attack,
        "classes": list(data.classes) if data.classes is not None else None,
        "counts": np.bincount(labels, minlength=k).tolist(),
    }
    if data.is_attack:
        out["targets"] = {int(t): int(c) for t, c in zip(*np.unique(data.y, return_counts=True), strict=True)}
    return out
