"""`compare`: PRE vs POST on the same data and provider, with one verdict per metric."""

import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import assert_one_line_error, labelled_set, tiny_cnn
from builders import run_cli as run

import mmexport
from mmexport.comparison import verdict
from mmexport.core.bounds import Bounds
from mmexport.core.data import Dataset
from mmexport.graph.rewrite import apply_bounds

FAST = dict(restarts=2, ascent_steps=5, runs=3, warmup=1, provider="cpu", device="cpu")
FAST_CLI = [
    "--restarts",
    "2",
    "--ascent-steps",
    "5",
    "--runs",
    "3",
    "--provider",
    "cpu",
    "--device",
    "cpu",
    "-q",
]
# Where margins are not the point: onnxruntime only.
ORT_CLI = ["--no-margins", "--runs", "2", "--provider", "cpu", "-q"]






@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny CNN, the same with every ReLU bounded at 0.3, a test set and an attack set."""
    tmp = tmp_path_factory.mktemp("compare")
    pre = tiny_cnn(seed=3)
    post = apply_bounds(pre, Bounds({"r1": np.full(4, 0.3), "r2": np.float32(0.3)}), form="min")
    paths = {"pre": tmp / "pre.onnx", "post": tmp / "post.onnx"}
    onnx.save(pre, paths["pre"])
    onnx.save(post, paths["post"])
    x, y = labelled_set(pre, 10, seed=1)
    np.savez(tmp / "test.npz", x=x, y=y)
    np.savez(tmp / "attack.npz", x=x, y=np.zeros_like(y), y_true=y)
    np.savez(tmp / "no_y_true.npz", x=x, y=np.zeros_like(y))
    paths |= {k: tmp / f"{k}.npz" for k in ("test", "attack", "no_y_true")}
    paths["tmp"] = tmp
    return paths


def test_a_model_against_itself_agrees_everywhere_and_is_the_same(pair):
    data = mmexport.load_npz(pair["test"])
    rep = mmexport.compare(pair["pre"], pair["pre"], data, **FAST)
    assert rep.agreement == 1.0 and rep.max_abs_logit_diff == 0.0
    assert rep.pre.max_margins == rep.post.max_margins  # same seed, same graph
    assert rep.node_type_diff == {} and rep.post.bounded_sites == 0
    for metric in ("accuracy", "balanced_accuracy", "worst_class_accuracy", "max_margin", "size"):
        assert rep.verdicts[metric] == "same", metric


def test_bounded_model_shows_its_bounds_attack_metrics_and_latency(pair):
    data = mmexport.load_npz(pair["test"])
    attack = mmexport.load_npz(pair["attack"], attack=True)
    rep = mmexport.compare(pair["pre"], pair["post"], data, attack=attack, **FAST)
    assert (
        rep.provider == "cpu" and rep.pre.validation["provider"] == rep.post.validation["provider"]
    )
    assert rep.post.bounded_sites == 2 and rep.pre.bounded_sites == 0
    assert rep.node_type_diff == {"Min": 1, "Relu": -1, "Clip": 1}
    assert len(rep.pre.max_margins) == len(rep.post.max_margins) == 3
    assert np.isfinite(rep.pre.max_margins + rep.post.max_margins).all()
    assert rep.pre.validation["asr"] is not None and "ra" in rep.verdicts
    assert set(rep.pre.latency) == {"1", "64"} and set(rep.latency_ratio) == {"1", "64"}
    assert rep.post.size_bytes > rep.pre.size_bytes and rep.verdicts["size"] == "worse"


def test_verdict_follows_the_direction_and_tolerance_of_each_metric():
    assert verdict(0.90, 0.95, higher_is_better=True, tolerance=0.01) == "better"
    assert verdict(0.90, 0.905, higher_is_better=True, tolerance=0.01) == "same"
    assert verdict(0.90, 0.50, higher_is_better=False, tolerance=0.01) == "better"  # ASR
    assert verdict(10.0, 10.9, higher_is_better=False, tolerance=0.1, relative=True) == "same"
    assert verdict(10.0, 11.5, higher_is_better=False, tolerance=0.1, relative=True) == "worse"
    assert verdict(None, 1.0, higher_is_better=True, tolerance=0.1) == "n/a"


def test_cli_json_and_markdown(pair):
    md = pair["tmp"] / "cmp.md"
    result = run(
        "compare",
        pair["pre"],
        pair["post"],
        "--data",
        pair["test"],
        "--attack",
        pair["attack"],
        "--markdown",
        md,
        "--force",
        "--json",
        *FAST_CLI,
    )
    assert result.exit_code == 0, result.output
    rep = json.loads(result.output)
    assert {
        "pre",
        "post",
        "agreement",
        "max_abs_logit_diff",
        "verdicts",
        "latency_ratio",
        "node_type_diff",
        "provider",
    } <= set(rep)
    assert {"accuracy", "asr", "ra", "max_margin", "latency_b1", "latency_b64", "size"} <= set(
        rep["verdicts"]
    )
    assert set(rep["verdicts"].values()) <= {"better", "same", "worse", "n/a"}
    text = md.read_text()
    assert "| ASR |" in text and "| class |" in text


def test_cli_plain_output_ends_with_verdict_lines(pair):
    result = run("compare", pair["pre"], pair["post"], "--data", pair["test"], *ORT_CLI)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.split()[0] == "size" and last.split()[1] in ("better", "same", "worse")


def test_existing_markdown_needs_force(pair):
    md = pair["tmp"] / "exists.md"
    md.write_text("keep me")
    result = run(
        "compare", pair["pre"], pair["post"], "--data", pair["test"], "--markdown", md, *ORT_CLI
    )
    assert_one_line_error(result, str(md), "--force")
    assert md.read_text() == "keep me"


def test_attack_file_without_y_true_is_a_one_line_error(pair):
    result = run(
        "compare",
        pair["pre"],
        pair["post"],
        "--data",
        pair["test"],
        "--attack",
        pair["no_y_true"],
        *ORT_CLI,
    )
    assert_one_line_error(result, str(pair["no_y_true"]), "y_true")


def test_models_with_different_classes_are_refused(pair):
    other = pair["tmp"] / "four.onnx"
    onnx.save(tiny_cnn(seed=3, classes=4), other)
    result = run("compare", pair["pre"], other, "--data", pair["test"], *ORT_CLI)
    assert_one_line_error(result, str(other), "classes")


@pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="matplotlib not installed"
)
def test_plot_writes_a_png(pair):
    png = pair["tmp"] / "cmp.png"
    result = run(
        "compare",
        pair["pre"],
        pair["post"],
        "--data",
        pair["test"],
        "--plot",
        png,
        "--force",
        *FAST_CLI,
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_what_to_install(pair, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = run(
        "compare",
        pair["pre"],
        pair["post"],
        "--data",
        pair["test"],
        "--plot",
        pair["tmp"] / "never.png",
        *ORT_CLI,
    )
    assert_one_line_error(result, "mmexport[plot]")
    assert not (pair["tmp"] / "never.png").exists()


def test_onnxruntime_parts_do_not_import_torch():
    code = "import sys, mmexport.comparison; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_sample_models_badnet_against_a_bounded_copy(tmp_path):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "sample_models" / "digits-cnn-badnet"
    pre = mmexport.load_model(folder / "model.onnx")
    bounds = Bounds({s.name: np.float32(1.0) for s in pre.sites})
    post = apply_bounds(pre.proto, bounds)
    test = mmexport.load_npz(folder / "test.npz")
    attack = mmexport.load_npz(folder / "attack.npz", attack=True)
    rep = mmexport.compare(
        folder / "model.onnx",
        post,
        Dataset(test.x[:100], test.y[:100]),
        attack=attack.subset(slice(0, 100)),
        **FAST,
    )
    assert rep.pre.validation["asr"] > 0.9  # the card's backdoor, under onnxruntime
    assert rep.post.bounded_sites == len(pre.sites)
    assert rep.verdicts["max_margin"] == "better"


def test_an_mmdf_model_is_compared_on_its_logits_output(pair):
    # Its graph has four outputs (logits, flag, two scores): no --output needed.
    test = mmexport.load_npz(pair["test"])
    mmdf = mmexport.detect(pair["pre"], test, augment=False)
    onnx.save(mmdf.model, pair["tmp"] / "pre.mmdf.onnx")
    r = run("compare", pair["pre"], pair["tmp"] / "pre.mmdf.onnx", "--data", pair["test"], "--json",
            *ORT_CLI)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["n"] == len(test)
