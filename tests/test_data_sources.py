"""Data as users hold it: image folders read as the .npz they stand for, attack folders, `data pack`.

The folders are written from a sample's .npz as 8-bit PNGs (u8 = round(255 x)) and read back with
scale 255, so x becomes u8 / 255: the .npz quantised the same way. Every equality below is exact
against that quantised .npz (in the folder's order: classes in sorted order, files by name); against
the original float .npz only the metrics are compared, within one sample.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from builders import assert_one_line_error
from builders import run_cli as run
from PIL import Image

import mmexport
from mmexport.core.data import Dataset, load_npz, save_npz
from mmexport.core.errors import MmexportError, ParameterError
from mmexport.core.images import Preprocess

SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "digits-cnn-badnet"
MODEL = SAMPLE / "model.onnx"
FAST = dict(max_epochs=2, restarts=2, warmup_steps=5, steps=2, unlearn="off", seed=0, device="cpu")


def to_u8(x: np.ndarray) -> np.ndarray:
    return np.round(x * 255).astype(np.uint8)


def quantised(x: np.ndarray) -> np.ndarray:
    """What the folder holds, read back with scale 255."""
    return to_u8(x).astype(np.float32) / np.float32(255)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)  # uint8 (H, W): mode L; (H, W, 3): RGB
    return path


def write_class_folders(root: Path, x: np.ndarray, labels: np.ndarray) -> Path:
    """root/<label>/i<index>.png: sorted order gives the samples grouped by label, in index order."""
    for i, (img, label) in enumerate(zip(to_u8(x), labels, strict=True)):
        write_png(root / str(label) / f"i{i:05d}.png", img[0])
    return root


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """The sample's sets as folders, and the quantised .npz each folder stands for (same order)."""
    tmp = tmp_path_factory.mktemp("data")
    sets = {name: load_npz(SAMPLE / f"{name}.npz", attack=name == "attack") for name in ("clean", "test", "attack")}
    out = {"tmp": tmp}
    # Three images per class: enough for harden to run, quick enough to run it twice.
    clean = sets["clean"]
    sets["small"] = clean.subset(np.concatenate([np.flatnonzero(clean.y == c)[:3] for c in range(10)]))
    for name in ("clean", "test", "small"):
        d = sets[name]
        out[name] = write_class_folders(tmp / name, d.x, d.y)
        order = np.argsort(d.y, kind="stable")
        out[f"{name}_q"] = tmp / f"{name}_q.npz"
        save_npz(out[f"{name}_q"], Dataset(quantised(d.x)[order], d.y[order]))
    att = sets["attack"]
    # A folder per true class; the target (0) has no triggered images, so classes.txt lists all ten.
    out["attack_dirs"] = write_class_folders(tmp / "attack_dirs", att.x, att.y_true)
    (out["attack_dirs"] / "classes.txt").write_text("".join(f"{c}\n" for c in range(10)))
    order = np.argsort(att.y_true, kind="stable")
    out["attack_dirs_q"] = tmp / "attack_dirs_q.npz"
    save_npz(out["attack_dirs_q"], Dataset(quantised(att.x)[order], att.y[order], att.y_true[order]))
    # One flat folder and a CSV in the .npz's own order.
    out["attack_csv"] = tmp / "attack_csv"
    for i, img in enumerate(to_u8(att.x)):
        write_png(out["attack_csv"] / "img" / f"{i:05d}.png", img[0])
    out["attack_q"] = tmp / "attack_q.npz"
    save_npz(out["attack_q"], Dataset(quantised(att.x), att.y, att.y_true))
    out["sets"] = sets
    return out


def write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def assert_same(a: Dataset, b: Dataset) -> None:
    assert a.x.dtype == b.x.dtype == np.float32
    assert np.array_equal(a.x, b.x)
    assert np.array_equal(a.y, b.y)
    assert (a.y_true is None) == (b.y_true is None)
    if a.y_true is not None:
        assert np.array_equal(a.y_true, b.y_true)


def validate_json(*args) -> dict:
    r = run("validate", MODEL, *args, "--provider", "cpu", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    out.pop("images_per_s")
    return out


# --- reading -------------------------------------------------------------------------------------


def test_a_class_folder_reads_back_as_the_quantised_npz_exactly(src):
    d = mmexport.load_data(src["clean"], model=MODEL)
    ref = load_npz(src["clean_q"])
    assert_same(d, ref)
    # Same strides too: torch reads odd ones (a one-channel transposed view) as channels-last,
    # and then runs other conv kernels, whose rounding a search amplifies.
    assert d.x.strides == ref.x.strides
    assert d.classes == tuple(str(c) for c in range(10))
    assert d.path == src["clean"]


def test_the_model_gives_size_and_channels_the_images_need(src, tmp_path):
    # 8x8 RGB images, resized to the model's 16x16 and converted to one channel.
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
    for c in range(10):
        write_png(tmp_path / str(c) / "a.png", rgb)
    d = mmexport.load_data(tmp_path, model=MODEL)
    assert d.x.shape == (10, 1, 16, 16)
    assert mmexport.load_data(tmp_path).x.shape == (10, 3, 8, 8)  # no model: the images' own size, RGB


def test_scale_mean_std_and_layout_are_applied_per_channel(tmp_path):
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    write_png(tmp_path / "a" / "x.png", rgb)
    prep = Preprocess.parse({"mean": "0.5,0.25,0", "std": "0.5,0.25,2", "layout": "nhwc"})
    d = mmexport.load_image_folder(tmp_path, preprocess=prep)
    want = (rgb.astype(np.float32) / 255 - np.float32([0.5, 0.25, 0])) / np.float32([0.5, 0.25, 2])
    assert d.x.shape == (1, 2, 3, 3)
    np.testing.assert_allclose(d.x[0], want, rtol=1e-6)
    raw = mmexport.load_image_folder(tmp_path, preprocess=Preprocess(scale=1, channels=1, resize=(4, 6)))
    assert raw.x.shape == (1, 1, 4, 6) and raw.x.max() > 1


def test_16_bit_images_keep_their_values_and_only_as_one_channel(tmp_path):
    write_png(tmp_path / "a" / "x.png", np.arange(16, dtype=np.uint16).reshape(4, 4) * 4000)
    d = mmexport.load_image_folder(tmp_path, preprocess=Preprocess(scale=1))
    assert d.x.ravel().tolist() == [4000.0 * i for i in range(16)]
    with pytest.raises(ParameterError, match="one channel only"):
        mmexport.load_image_folder(tmp_path, preprocess=Preprocess(channels=3))


def test_classes_txt_sets_the_class_order(tmp_path):
    for name in ("cat", "dog"):
        write_png(tmp_path / name / "a.png", np.full((4, 4), 10 if name == "cat" else 20, np.uint8))
    (tmp_path / "classes.txt").write_text("dog\ncat\n")
    d = mmexport.load_image_folder(tmp_path, preprocess=Preprocess(scale=1))
    assert d.classes == ("dog", "cat")
    assert d.y.tolist() == [0, 1] and d.x[:, 0, 0, 0].tolist() == [20.0, 10.0]


def test_preprocess_json_keys_are_the_option_names_and_options_win(tmp_path):
    f = tmp_path / "prep.json"
    f.write_text(json.dumps({"resize": 16, "mean": [0.5], "std": 0.25, "layout": "nhwc", "scale": 255}))
    p = Preprocess.from_json(f, {"std": "0.5", "channels": None})
    assert p == Preprocess(resize=(16, 16), mean=(0.5,), std=(0.5,), layout="nhwc", scale=255.0)
    assert Preprocess(resize=16, mean=0.5, std=[0.5]) == Preprocess(resize=(16, 16), mean=(0.5,), std=(0.5,))


def test_an_nhwc_model_input_gives_the_nhwc_layout():
    assert Preprocess().for_input(("N", 32, 32, 3)) == Preprocess(resize=(32, 32), channels=3, layout="nhwc")
    assert Preprocess().for_input(("N", 3, 32, 32)) == Preprocess(resize=(32, 32), channels=3, layout="nchw")
    assert Preprocess(layout="nchw").for_input(("N", 32, 32, 3)).layout == "nchw"


def test_an_npz_is_read_as_before_and_refuses_folder_options(src):
    assert_same(mmexport.load_data(SAMPLE / "test.npz"), load_npz(SAMPLE / "test.npz"))
    with pytest.raises(ParameterError, match="image folders only"):
        mmexport.load_data(SAMPLE / "test.npz", preprocess=Preprocess())


def test_the_api_reads_a_folder_where_it_takes_a_path(src):
    rep = mmexport.validate(MODEL, src["test"], provider="cpu")
    assert rep.n == 497


# --- the commands on a folder equal them on the .npz --------------------------------------------


def test_validate_on_folders_equals_validate_on_the_quantised_npz(src):
    folder = validate_json("--data", src["test"], "--attack", src["attack_dirs"], "--target", 0)
    npz = validate_json("--data", src["test_q"], "--attack", src["attack_dirs_q"])
    assert folder == npz
    # Against the original float data: uint8 rounding moves x by < 0.002, no decision moves here.
    orig = validate_json("--data", SAMPLE / "test.npz", "--attack", SAMPLE / "attack.npz")
    assert abs(folder["accuracy"] - orig["accuracy"]) * folder["n"] <= 1
    assert abs(folder["asr"] - orig["asr"]) * folder["n_attack"] <= 1


def test_harden_on_a_folder_equals_harden_on_the_quantised_npz(src):
    a = mmexport.harden(MODEL, src["small"], **FAST)
    b = mmexport.harden(MODEL, src["small_q"], **FAST)
    assert a.report.data_sha256 == b.report.data_sha256  # the very same x and y
    assert a.bounds.to_json()["bounds"] == b.bounds.to_json()["bounds"]
    for key in ("clean_set_accuracy", "max_margins_before", "max_margins_after"):
        assert a.report.to_json()[key] == b.report.to_json()[key], key


@pytest.mark.parametrize("command", ["harden", "detect", "scan", "validate", "compare"])
def test_every_data_command_reads_a_folder_with_the_model(tmp_path, command):
    # Nine folders for a ten-class model: only a reader that knows the model refuses them.
    root, fragments = bad_folder(tmp_path, "too_few_folders")
    models = (MODEL, MODEL) if command == "compare" else (MODEL,)
    quiet = () if command == "validate" else ("-q",)
    assert_one_line_error(run(command, *models, "--data", root, *quiet), *fragments)


# --- attack sets ---------------------------------------------------------------------------------


def test_attack_folder_per_true_class_takes_the_target(src):
    d = mmexport.load_data(src["attack_dirs"], attack=True, target=0, model=MODEL)
    assert_same(d, load_npz(src["attack_dirs_q"], attack=True))


def test_attack_csv_with_a_target_column(src):
    att = src["sets"]["attack"]
    rows = [(f"img/{i:05d}.png", t, yt) for i, (t, yt) in enumerate(zip(att.y, att.y_true, strict=True))]
    labels = write_csv(src["tmp"] / "with_target.csv", ("file", "target", "y_true"), rows)
    d = mmexport.load_data(src["attack_csv"], attack=True, labels=labels)
    assert_same(d, load_npz(src["attack_q"], attack=True))


def test_attack_labels_csv_in_the_folder_with_the_target_option(src):
    att = src["sets"]["attack"]
    write_csv(src["attack_csv"] / "labels.csv", ("file", "y_true"),
              [(f"img/{i:05d}.png", yt) for i, yt in enumerate(att.y_true)])
    r = run("validate", MODEL, "--data", src["test_q"], "--attack", src["attack_csv"], "--target", 0, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["asr"] == validate_json("--data", src["test_q"], "--attack", src["attack_q"])["asr"]


# --- data pack and show --------------------------------------------------------------------------


def test_data_pack_writes_what_load_data_reads(src, tmp_path):
    out = tmp_path / "clean.npz"
    r = run("data", "pack", src["clean"], "-o", out, "--model", MODEL)
    assert r.exit_code == 0, r.output
    packed, read = load_npz(out), mmexport.load_data(src["clean"], model=MODEL)
    assert_same(packed, read)
    assert packed.classes == read.classes
    r = run("data", "pack", src["attack_dirs"], "-o", tmp_path / "attack.npz", "--target", 0, "--model", MODEL)
    assert r.exit_code == 0, r.output
    assert_same(load_npz(tmp_path / "attack.npz", attack=True), load_npz(src["attack_dirs_q"], attack=True))


def test_data_pack_checks_the_output_before_reading(src, tmp_path):
    out = tmp_path / "clean.npz"
    out.write_bytes(b"keep")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run("data", "pack", empty, "-o", out), str(out), "--force")
    assert out.read_bytes() == b"keep"
    assert_one_line_error(run("data", "pack", src["clean"], "-o", tmp_path / "nope" / "c.npz"), "does not exist")


def test_data_show_counts_the_classes(src):
    r = run("data", "show", src["attack_dirs"], "--target", 0, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["n"] == 449 and info["shape"] == [449, 1, 16, 16] and info["attack"]
    assert info["counts"] == np.bincount(src["sets"]["attack"].y_true, minlength=10).tolist()
    assert info["targets"] == {"0": 449}


# --- bad input: one line naming the file at fault, exit 1 ----------------------------------------


def bad_folder(tmp_path: Path, kind: str) -> tuple[Path, tuple[str, ...]]:
    """A folder with one fault, and the fragments its error must name."""
    root = tmp_path / kind
    img = np.zeros((16, 16), np.uint8)
    if kind == "empty":
        root.mkdir()
        return root, (str(root), "no class folders")
    for c in range(10):
        write_png(root / str(c) / "a.png", img)
    if kind == "class_without_images":
        (root / "3" / "a.png").unlink()
        (root / "3" / "notes.txt").write_text("no images here")
        return root, (str(root / "3"), "no images")
    if kind == "unreadable":
        (root / "4" / "b.png").write_bytes(b"not a png")
        return root, (str(root / "4" / "b.png"), "not a readable image")
    if kind == "missing_class_folder":
        (root / "classes.txt").write_text("".join(f"{c}\n" for c in range(10)) + "ten\n")
        return root, ("classes.txt", "'ten'", "no folder")
    if kind == "too_few_folders":
        for f in (root / "9").iterdir():
            f.unlink()
        (root / "9").rmdir()
        return root, (str(root), "9 class folders for a 10-class model", "classes.txt")
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["empty", "class_without_images", "unreadable", "missing_class_folder",
                                  "too_few_folders"])
def test_a_bad_folder_is_a_one_line_error(tmp_path, kind):
    root, fragments = bad_folder(tmp_path, kind)
    assert_one_line_error(run("validate", MODEL, "--data", root), *fragments)


def test_a_png_file_as_data_says_what_is_accepted(tmp_path):
    png = write_png(tmp_path / "x.png", np.zeros((16, 16), np.uint8))
    assert_one_line_error(run("validate", MODEL, "--data", png), str(png), "not an .npz file or an image folder",
                          "DIR/<class>/*.png")
    assert_one_line_error(run("validate", MODEL, "--data", tmp_path / "nope"), "no such file or folder")


def test_images_of_different_sizes_need_a_resize(tmp_path):
    write_png(tmp_path / "a" / "1.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "b" / "2.png", np.zeros((8, 9), np.uint8))
    assert_one_line_error(run("data", "show", tmp_path), "--resize", str(tmp_path / "b" / "2.png"), "8x9")
    assert run("data", "show", tmp_path, "--resize", "8,8").exit_code == 0


def test_a_csv_row_naming_a_missing_file_is_an_error(src, tmp_path):
    labels = write_csv(tmp_path / "labels.csv", ("file", "target", "y_true"),
                       [("img/00000.png", 0, 1), ("img/nope.png", 0, 2)])
    assert_one_line_error(run("validate", MODEL, "--data", src["test_q"], "--attack", src["attack_csv"],
                              "--attack-labels", labels), str(labels), "line 3", "nope.png")


def test_an_attack_folder_without_labels_or_target_is_an_error(src):
    assert_one_line_error(run("validate", MODEL, "--data", src["test_q"], "--attack", src["attack_dirs"]),
                          "--target", str(src["attack_dirs"]))


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("--mean", "0.5,0.5"), ("--mean",)),
        (("--channels", "2"), ("--channels", "1 or 3")),
        (("--scale", "0"), ("--scale",)),
    ],
)
def test_bad_preprocessing_options_name_the_flag(src, args, fragments):
    assert_one_line_error(run("validate", MODEL, "--data", src["test"], *args), *fragments)


def test_a_bad_layout_is_a_usage_error_naming_the_choices(src):
    r = run("validate", MODEL, "--data", src["test"], "--layout", "chw")
    assert r.exit_code == 2 and "--layout" in r.output and "nhwc" in r.output


def test_a_bad_preprocess_json_names_the_file_and_key(src, tmp_path):
    f = tmp_path / "prep.json"
    f.write_text(json.dumps({"resize": 16, "bogus": 1}))
    assert_one_line_error(run("validate", MODEL, "--data", src["test"], "--preprocess", f), str(f), "'bogus'")


def test_folder_options_with_npz_data_are_refused(tmp_path):
    assert_one_line_error(run("validate", MODEL, "--data", SAMPLE / "test.npz", "--mean", "0.5"),
                          "apply to image folders")
    assert_one_line_error(run("validate", MODEL, "--data", SAMPLE / "test.npz", "--attack",
                              SAMPLE / "attack.npz", "--target", "0"), "--target", "attack.npz")


def test_load_errors_are_mmexport_errors(tmp_path):
    with pytest.raises(MmexportError, match="no class folders"):
        mmexport.load_image_folder(tmp_path)
