"""Image folders as datasets: the torchvision `ImageFolder` layout, read with Pillow.

A clean or test set is `DIR/<class>/*.png` (also .jpg, .jpeg, .bmp, .ppm, .pgm, .tif, .tiff,
.webp, at any depth under the class folder); class index = the folders in sorted order, or the
order of `DIR/classes.txt` (one folder name a line). An attack set is either a folder per TRUE
class plus one target class, or any folder with a CSV (`labels.csv`: `file,target,y_true`, or
`file,y_true` plus a target) naming its images.

Each image becomes a model input by `Preprocess`: convert to 1 or 3 channels, resize, divide
by `scale`, subtract `mean`, divide by `std` (per channel), lay out as NCHW or NHWC. The
result is a plain `Dataset`, exactly what an .npz would hold. Pillow loads lazily.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .data import Dataset
from .errors import MmexportError, ParameterError, first_line

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
LAYOUTS = ("nchw", "nhwc")
CLASSES_FILE = "classes.txt"
LABELS_FILE = "labels.csv"
# Pillow modes read as one channel; the wide ones keep their values (divide by `scale` yourself).
GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _field(default, help: str):  # noqa: A002
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a model input: x = (pixels / scale - mean) / std, per channel.

    Fields left None are taken from the model's input shape where it has them (`for_input`),
    else from the images themselves. The result must be in the units the model's input expects:
    if the model normalises inside its graph, leave mean and std at 0 and 1.
    """

    resize: tuple[int, int] | None = _field(
        None, "Resize every image to H,W (or one int for a square), Pillow's bilinear filter; default: the "
              "model's input H,W where fixed, else the images' own size (then all must share it).")
    channels: int | None = _field(
        None, "Channels: 1 (grayscale, Pillow's 'L' conversion) or 3 (RGB); default: the model's input "
              "channels, else 1 if every image is grayscale, else 3.")
    layout: str | None = _field(
        None, "The array layout fed to the model, nchw or nhwc; default: nhwc only when the model's input is "
              "clearly channels-last (N,H,W,1|3), else nchw.")
    scale: float = _field(255.0, "Divide raw pixel values by this first; default 255 (8-bit images to [0,1]); 1 "
                                 "keeps 0..255.")
    mean: tuple[float, ...] = _field((0.0,), "Subtracted after scaling, one value or one per channel (e.g. "
                                             "0.485,0.456,0.406); default 0.")
    std: tuple[float, ...] = _field((1.0,), "Divides after the mean, one value or one per channel (e.g. "
                                           "0.229,0.224,0.225); default 1.")

    def __post_init__(self):
        # One number or a list, as a tuple (hashable, comparable); one size means a square.
        for name in ("mean", "std", "resize"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                one = (value,) * (2 if name == "resize" else 1)
                object.__setattr__(self, name, tuple(value) if isinstance(value, (list, np.ndarray)) else one)
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ParameterError("layout", f"{self.layout!r}: expected one of {', '.join(LAYOUTS)}")
        if self.channels is not None and self.channels not in (1, 3):
            raise ParameterError("channels", f"{self.channels!r}: expected 1 or 3")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ParameterError("scale", f"{self.scale!r}: expected a number > 0")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise ParameterError("resize", f"{self.resize!r}: expected H,W of at least 1 pixel")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, 3) or not np.isfinite(values).all():
                raise ParameterError(name, f"{values!r}: expected 1 or 3 finite numbers")
        if min(self.std) <= 0:
            raise ParameterError("std", f"{self.std!r}: every value must be > 0")

    @classmethod
    def parse(cls, values: Mapping) -> Preprocess:
        """From strings (the CLI: "16,16", "0.5,0.5,0.5") or JSON values (numbers, lists)."""
        known = [f.name for f in fields(cls)]
        out = {}
        for key, value in values.items():
            if key not in known:
                raise ParameterError(key, f"not a preprocessing key (keys: {', '.join(known)})")
            if value is None:
                continue
            if key == "resize":
                sizes = _numbers(key, value, int)
                out[key] = (sizes[0], sizes[0]) if len(sizes) == 1 else tuple(sizes)
            elif key == "channels":
                out[key] = _numbers(key, value, int, count=1)[0]
            elif key == "layout":
                out[key] = str(value).lower()
            elif key == "scale":
                out[key] = _numbers(key, value, float, count=1)[0]
            else:
                out[key] = tuple(_numbers(key, value, float))
        return cls(**out)

    @classmethod
    def from_json(cls, path: str | os.PathLike, overrides: Mapping | None = None) -> Preprocess:
        """Read a JSON object with the field names as keys; `overrides` (not None) win over it."""
        path = Path(path)
        try:
            obj = json.loads(path.read_text())
        except FileNotFoundError:
            raise MmexportError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise MmexportError(f"{path}: not a readable JSON file ({first_line(exc)})") from None
        if not isinstance(obj, dict):
            raise MmexportError(f"{path}: expected a JSON object with keys {', '.join(f.name for f in fields(cls))}")
        try:
            cls.parse(obj)
        except ParameterError as exc:
            raise MmexportError(f"{path}: key {exc.param!r}: {exc.detail}") from None
        return cls.parse(obj | {k: v for k, v in (overrides or {}).items() if v is not None})

    def to_json(self) -> dict:
        return asdict(self)

    def for_input(self, input_shape: tuple) -> Preprocess:
        """Fill the unset layout, channels and size from a model input shape (N, C, H, W) or (N, H, W, C)."""
        if len(input_shape) != 4:
            return self

        def fixed(d):
            return d if isinstance(d, int) and d > 0 else None

        _, a, b, c = (fixed(d) for d in input_shape)
        layout = self.layout or ("nhwc" if c in (1, 3) and a not in (1, 3) else "nchw")
        ch, h, w = (a, b, c) if layout == "nchw" else (c, a, b)
        return replace(
            self,
            layout=layout,
            channels=self.channels or (ch if ch in (1, 3) else None),
            resize=self.resize or ((h, w) if h and w else None),
        )


def _numbers(key: str, value, kind, *, count: int | None = None) -> list:
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
    try:
        if any(isinstance(v, bool) for v in items):
            raise ValueError
        out = [kind(float(v)) if kind is float else kind(str(v).strip()) for v in items]
    except (TypeError, ValueError):
        raise ParameterError(key, f"{value!r}: expected {'a number' if count == 1 else 'comma-separated numbers'}") \
            from None
    if not out or (count is not None and len(out) != count):
        raise ParameterError(key, f"{value!r}: expected {count or 'some'} value(s)")
    return out


# --- reading ------------------------------------------------------------------------------------


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise MmexportError("reading image folders needs Pillow: pip install pillow") from None
    return Image


def _images_under(folder: Path) -> list[Path]:
    """Image files at any depth under `folder`, hidden ones aside, in sorted path order."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(s.startswith(".") for s in rel.parts) and p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _headers(files: list[Path]) -> list[tuple[str, tuple[int, int]]]:
    """(mode, (width, height)) of every file, from its header: bad files fail before any decoding."""
    Image = _pil()
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                out.append((im.mode, im.size))
        except Exception as exc:
            raise MmexportError(f"{f}: not a readable image ({first_line(exc)})") from None
    return out


def read_images(files: list[Path], preprocess: Preprocess) -> np.ndarray:
    """The images as one float32 array (N, C, H, W) or (N, H, W, C), preprocessed."""
    Image = _pil()
    heads = _headers(files)
    channels = preprocess.channels or (1 if all(mode in GRAY_MODES for mode, _ in heads) else 3)
    if channels == 3:
        for f, (mode, _) in zip(files, heads, strict=True):
            if mode in WIDE_MODES:
                raise ParameterError("channels", f"{f}: mode {mode} (16-bit or float) is read as one channel only")
    if preprocess.resize is None:
        first_size = heads[0][1]
        for f, (_, size) in zip(files, heads, strict=True):
            if size != first_size:
                raise ParameterError(
                    "resize", f"{f}: {size[1]}x{size[0]} pixels where {files[0]} has {first_size[1]}x{first_size[0]}; "
                              "images of different sizes need a resize (H,W)")
    for name in ("mean", "std"):
        if len(getattr(preprocess, name)) not in (1, channels):
            raise ParameterError(name, f"{len(getattr(preprocess, name))} values for {channels}-channel images")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                if channels == 1 and im.mode in WIDE_MODES:
                    im = im.convert("F") if im.mode != "F" else im.copy()
                else:
                    im = im.convert("L" if channels == 1 else "RGB")
                if preprocess.resize is not None and im.size != preprocess.resize[::-1]:
                    im = im.resize(preprocess.resize[::-1], Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.float32))
        except Exception as exc:
            raise MmexportError(f"{f}: not a readable image ({first_line(exc)})") from None
    x = np.stack(arrays).reshape(len(arrays), *arrays[0].shape[:2], channels)  # (N, H, W, C)
    x /= np.float32(preprocess.scale)
    x -= np.asarray(preprocess.mean, np.float32)
    x /= np.asarray(preprocess.std, np.float32)
    if (preprocess.layout or "nchw") == "nchw":
        # A copy, not a view: with one channel the view passes as C-contiguous in numpy, yet torch
        # reads its strides as channels-last and runs other conv kernels than for an .npz's array.
        x = x.transpose(0, 3, 1, 2).copy()
    return x


def class_folders(path: Path, *, allow_missing: bool = False) -> list[tuple[str, Path | None]]:
    """(class name, folder) in index order: classes.txt's order, else the sorted folder names.

    `allow_missing` (attack sets) lets classes.txt name a class without a folder: a class with
    no triggered images, usually the target itself.
    """
    present = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    listing = path / CLASSES_FILE
    if not listing.is_file():
        if not present:
            raise MmexportError(f"{path}: no class folders (expected {path}/<class>/*.png)")
        return [(name, path / name) for name in present]
    try:
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise MmexportError(f"{listing}: not a readable text file ({first_line(exc)})") from None
    if not names:
        raise MmexportError(f"{listing}: lists no classes")
    seen = set()
    for i, name in enumerate(names):
        if name in seen:
            raise MmexportError(f"{listing}: line {i + 1}: class {name!r} listed twice")
        seen.add(name)
        if name not in present and not allow_missing:
            raise MmexportError(f"{listing}: names {name!r}, but there is no folder {path / name}")
    extra = [name for name in present if name not in seen]
    if extra:
        raise MmexportError(f"{path / extra[0]}: a class folder that {listing.name} does not list")
    return [(name, path / name if name in present else None) for name in names]


def _per_class(path: Path, *, allow_missing: bool, num_classes: int | None):
    """(files, labels, class names) of a folder per class."""
    if not path.is_dir():
        raise MmexportError(f"{path}: no such folder")
    classes = class_folders(path, allow_missing=allow_missing)
    listed = (path / CLASSES_FILE).is_file()
    if num_classes is not None and not listed and len(classes) != num_classes:
        raise MmexportError(
            f"{path}: {len(classes)} class folders for a {num_classes}-class model; add {CLASSES_FILE} naming "
            f"the {num_classes} classes in index order so each folder gets its class")
    files, labels = [], []
    for index, (_, folder) in enumerate(classes):
        if folder is None:
            continue
        found = _images_under(folder)
        if not found:
            raise MmexportError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [index] * len(found)
    if not files:
        raise MmexportError(f"{path}: no images")
    return files, np.asarray(labels, np.int64), tuple(name for name, _ in classes)


def load_image_folder(path: str | os.PathLike, *, preprocess: Preprocess | None = None,
                      num_classes: int | None = None) -> Dataset:
    """A clean or test set from `DIR/<class>/*.png`: y = the class index of each image's folder.

    `num_classes` (the model's) guards the sorted-order rule: without classes.txt, the folder
    count must equal it, or a missing class would shift every label after it.
    """
    path = Path(path)
    files, y, classes = _per_class(path, allow_missing=False, num_classes=num_classes)
    x = read_images(files, preprocess or Preprocess())
    return Dataset(x=x, y=y, path=path, classes=classes)


def load_attack_folder(path: str | os.PathLike, *, preprocess: Preprocess | None = None,
                       target: int | None = None, labels: str | os.PathLike | None = None,
                       num_classes: int | None = None) -> Dataset:
    """An attack set (y = the attacker's target, y_true = the true class) from an image folder.

    With a CSV (`labels`, else `DIR/labels.csv`): its rows name the images (relative to DIR)
    in order, columns `file,target,y_true`, or `file,y_true` and `target` given here. Without
    one: a folder per true class (as a clean set, classes.txt may name classes with no folder)
    and `target` for every image.
    """
    path = Path(path)
    if not path.is_dir():
        raise MmexportError(f"{path}: no such folder")
    csv_path = Path(labels) if labels is not None else path / LABELS_FILE
    if target is not None and (not isinstance(target, (int, np.integer)) or target < 0):
        raise ParameterError("target", f"{target!r}: expected a class number >= 0")
    if labels is not None or csv_path.is_file():
        files, y, y_true = _read_labels_csv(csv_path, path, target)
        classes = None
    else:
        if target is None:
            raise ParameterError(
                "target", f"{path}: an attack folder needs {LABELS_FILE} (file,target,y_true) or a folder per "
                          "true class and the target class")
        files, y_true, classes = _per_class(path, allow_missing=True, num_classes=num_classes)
        y = np.full(len(files), target, np.int64)
    x = read_images(files, preprocess or Preprocess())
    return Dataset(x=x, y=y, y_true=y_true, path=path, classes=classes)


def _read_labels_csv(csv_path: Path, root: Path, target: int | None):
    if not csv_path.is_file():
        raise MmexportError(f"{csv_path}: no such file")
    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MmexportError(f"{csv_path}: not a readable CSV file ({first_line(exc)})") from None
    header = [h.strip() for h in rows[0]] if rows else []
    if "file" not in header or "y_true" not in header:
        raise MmexportError(f"{csv_path}: needs a header with columns file,target,y_true or file,y_true "
                            f"(has: {','.join(header) or 'nothing'})")
    has_target = "target" in header
    if has_target and target is not None:
        raise ParameterError("target", f"{csv_path} has a target column already; give one or the other")
    if not has_target and target is None:
        raise ParameterError("target", f"{csv_path} has no target column; give the target class")
    col = {name: header.index(name) for name in ("file", "y_true", "target") if name in header}
    files, y, y_true = [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise MmexportError(f"{csv_path}: line {line}: {len(row)} columns, the header has {len(header)}")
        file = root / row[col["file"]].strip()
        if not file.is_file():
            raise MmexportError(f"{csv_path}: line {line}: no such file {file}")
        files.append(file)
        for key, out in (("y_true", y_true), ("target", y)):
            if key not in col:
                continue
            try:
                value = int(row[col[key]].strip())
            except ValueError:
                raise MmexportError(f"{csv_path}: line {line}: {key} {row[col[key]]!r} is not a class number") \
                    from None
            if value < 0:
                raise MmexportError(f"{csv_path}: line {line}: {key} {value} is not a class number")
            out.append(value)
    if not files:
        raise MmexportError(f"{csv_path}: no rows")
    y = y if has_target else [target] * len(files)
    return files, np.asarray(y, np.int64), np.asarray(y_true, np.int64)
