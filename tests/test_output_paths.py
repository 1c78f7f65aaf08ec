"""Every output path is checked before any work: its folder exists, is a directory and takes
new files; it is not an input, nor an existing file without --force. A bad one is one line on
stderr, exit 1, and nothing is written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from builders import assert_one_line_error, write_tiny
from builders import run_cli as run

from mmexport.core.errors import MmexportError, OutputExistsError
from mmexport.core.provenance import check_output_path, check_output_paths


@pytest.fixture
def files(tmp_path):
    write_tiny(tmp_path, model="model.onnx")
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "a_file").write_text("not a folder")
    return tmp_path


def _commands(d: Path, out: Path) -> dict[str, list]:
    model, data = d / "model.onnx", d / "clean.npz"
    return {
        "harden": ["harden", model, "--data", data, "-o", out],
        "detect": ["detect", model, "--data", data, "-o", out],
        "apply": ["apply", model, d / "b.json", "-o", out],
        "scan --report": ["scan", model, "--data", data, "--report", out],
        "compare --markdown": ["compare", model, model, "--data", data, "--markdown", out],
        "compare --plot": ["compare", model, model, "--data", data, "--plot", out],
    }


def _unwritable_folder(monkeypatch) -> Path:
    """A folder this process cannot create files in. Root writes anywhere but, on most
    machines, /sys; where root can write there too, a temporary folder whose file creation the
    OS is made to refuse (tempfile.mkstemp raises PermissionError for it, as a read-only mount
    would), so the check still runs its real code path."""
    if os.geteuid() != 0:
        folder = Path(tempfile.mkdtemp())
        folder.chmod(0o500)
        return folder
    folder = Path("/sys")
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        return folder
    os.close(fd)
    os.unlink(probe)
    folder = Path(tempfile.mkdtemp())
    real = tempfile.mkstemp

    def refusing(*args, **kwargs):
        if Path(kwargs.get("dir") or "") == folder:
            raise PermissionError(13, "Permission denied", str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refusing)
    return folder


COMMANDS = list(_commands(Path("."), Path("o")))


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_under_a_file_is_refused_before_any_work(files, command):
    before = sorted(p.name for p in files.iterdir())
    result = run(*_commands(files, files / "a_file" / "out.onnx")[command])
    assert_one_line_error(result, "a_file", "is a file, not a directory")
    assert sorted(p.name for p in files.iterdir()) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_in_a_folder_that_takes_no_new_files_is_refused(files, command, monkeypatch):
    folder = _unwritable_folder(monkeypatch)
    result = run(*_commands(files, folder / "mmexport-out.onnx")[command])
    assert_one_line_error(result, str(folder), "not writable")
    assert not (folder / "mmexport-out.onnx").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_in_a_missing_folder_is_refused(files, command):
    result = run(*_commands(files, files / "no_such_dir" / "out.onnx")[command])
    assert_one_line_error(result, "no_such_dir", "does not exist")


def test_an_output_that_is_a_directory_is_refused(tmp_path):
    with pytest.raises(MmexportError, match="is a directory"):
        check_output_path(tmp_path, force=True)


def test_an_input_is_never_an_output_even_with_force(files):
    with pytest.raises(MmexportError, match="overwrite an input"):
        check_output_path(files / "model.onnx", force=True, inputs=(files / "model.onnx",))
    with pytest.raises(MmexportError, match="overwrite an input"):  # the same file by another name
        check_output_path(files / "." / "model.onnx", force=True, inputs=(files / "model.onnx",))


def test_an_existing_output_needs_force_and_two_outputs_must_differ(files):
    with pytest.raises(OutputExistsError):
        check_output_path(files / "b.json", force=False)
    assert check_output_path(files / "b.json", force=True) == files / "b.json"
    with pytest.raises(MmexportError, match="two outputs"):
        check_output_paths([files / "r.json", None, files / "r.json"], force=False)


def test_the_writability_probe_leaves_nothing_behind(files):
    before = sorted(p.name for p in files.iterdir())
    check_output_path(files / "new.onnx", force=False)
    assert sorted(p.name for p in files.iterdir()) == before
