"""Provenance and safe writes: content hashes, metadata_props, output-path checks, atomic writes.

Every command checks its output paths before any work and writes through a temp file, so a
failed run never leaves half a file nor overwrites an input.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from .errors import MmexportError, OutputExistsError

if TYPE_CHECKING:
    from .data import Dataset
    from .model import Model


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_output_path(path: str | os.PathLike, *, force: bool, inputs=()) -> Path:
    """Refuse, before any work, an output that must not or cannot be written.

    Not an input, not an existing file without `force`, not a directory; its folder must
    exist, be a directory and take a new file (checked by creating and removing one, which
    also catches read-only file systems and root-owned folders that `os.access` passes).
    """
    path = Path(path)
    for inp in inputs:
        if inp is not None and _same_file(path, Path(inp)):
            raise MmexportError(f"{path}: refusing to overwrite an input file")
    if path.is_dir():
        raise MmexportError(f"{path}: is a directory, expected an output file name")
    parent = path.parent
    if not parent.is_dir():
        above = next((p for p in (parent, *parent.parents) if p.exists()), None)
        if above is not None and not above.is_dir():
            raise MmexportError(f"{above}: is a file, not a directory (output {path})")
        raise MmexportError(f"{parent}: output directory does not exist")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: exists")
    if not _takes_new_files(parent):
        raise MmexportError(f"{parent}: output directory is not writable (output {path})")
    return path


def check_output_paths(paths, *, force: bool, inputs=()) -> list[Path]:
    """`check_output_path` for each of a command's outputs (None skipped), and no two the same."""
    seen: dict[Path, Path] = {}
    out = []
    for p in paths:
        if p is None:
            continue
        p = check_output_path(p, force=force, inputs=inputs)
        key = p.resolve()
        if key in seen:
            raise MmexportError(f"{p}: given for two outputs")
        seen[key] = p
        out.append(p)
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _takes_new_files(folder: Path) -> bool:
    try:
        fd, probe = tempfile.mkstemp(prefix=".mmexport-probe.", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def set_metadata(proto: onnx.ModelProto, entries: dict[str, str]) -> None:
    """Add or replace metadata_props entries (values are strings)."""
    keep = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in entries.items():
        proto.metadata_props.add(key=k, value=str(v))


def get_metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def model_sha256(model: Model) -> str:
    """The model file's hash where it came from a file, else that of its serialised proto."""
    if model.path is not None and Path(model.path).exists():
        return sha256_file(model.path)
    return sha256_bytes(model.proto.SerializeToString())


def data_sha256(data: Dataset) -> str:
    return sha256_bytes(np.ascontiguousarray(data.x).tobytes() + np.ascontiguousarray(data.y).tobytes())


def default_output(model_path: str | os.PathLike, method: str) -> Path:
    """`<model>.<method>.onnx` beside the input model."""
    p = Path(model_path)
    return p.with_name(f"{p.stem}.{method}.onnx")
