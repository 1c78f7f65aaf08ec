"""MMDF's screen: without a focus class, the margin test judges only the inputs whose
activations pass their clean range furthest, and the gate runs the bounded branch on them alone.

The screen in the graph must compute the exceedance the calibration computed; the gated graph
must give the ungated graph's logits and flags on every input, and NaN margin scores exactly on
the rows neither the screen nor the feature test marks.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import ort_run, run_cli
from onnx.reference import ReferenceEvaluator
from variants import SAMPLES, with_fixed_batch

from mmexport.core.bounds import Bounds
from mmexport.core.errors import ParameterError
from mmexport.core.model import as_model
from mmexport.core.provenance import get_metadata
from mmexport.defences.mmdf.bounds import exceedance, screen_scales, site_maxima
from mmexport.defences.mmdf.config import MmdfConfig
from mmexport.defences.mmdf.detector import detect
from mmexport.defences.mmdf.gate import SCREENED, gate_mmdf_graph
from mmexport.defences.mmdf.graph import DETECTED, FEATURE_SCORE, SCORE, build_mmdf_graph, is_gated

OURS = [DETECTED, SCORE, FEATURE_SCORE]
FOLDER = SAMPLES / "digits-cnn-badnet"


@pytest.fixture(scope="module")
def screened():
    """The ungated MMDF graph of a backdoored sample with no class avoided (so no focus)."""
    res = detect(FOLDER / "model.onnx", FOLDER / "clean.npz", avoid=None, gate=False, provider="cpu")
    x = np.concatenate([np.load(FOLDER / f)["x"][:200] for f in ("test.npz", "attack.npz")])
    return onnx.load(FOLDER / "model.onnx"), res, x.astype(np.float32)


def test_exceedance_is_zero_inside_the_bounds_and_scaled_outside():
    z = np.array([2.0, 0.0, 4.0], np.float32)  # mean 2: the dead channel is scaled by 2
    np.testing.assert_allclose(screen_scales(z), [2.0, 2.0, 4.0])
    maxima = {"a": np.array([[1.0, 0.0, 4.0], [3.0, 1.0, 6.0]]), "b": np.array([[0.5], [2.0]])}
    bounds = Bounds({"a": z, "b": np.array(1.0, np.float32)}, {})
    got = exceedance(maxima, bounds)
    np.testing.assert_allclose(got, [0.0, 1 / 2 + 1 / 2 + 2 / 4 + 1.0 / 1.0])
    np.testing.assert_allclose(exceedance(maxima, bounds, [1]), got[1:])


def test_the_graph_screens_what_the_calibration_computes(screened):
    source, res, x = screened
    t = res.report.screen["threshold"]
    probe = onnx.ModelProto()
    probe.CopyFrom(res.model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(SCREENED, onnx.TensorProto.BOOL, None))
    got = ort_run(probe, x)[SCREENED].reshape(-1)
    m = as_model(FOLDER / "model.onnx")
    e = exceedance(site_maxima(m.proto, m.sites, x, input_name=m.input_name), res.bounds)
    close = np.abs(e - t) < 1e-4 * max(1.0, t)  # float32 in the graph, float64 here
    np.testing.assert_array_equal(got[~close], (e > t)[~close])
    assert 0 < got.sum() < len(x)


def test_the_screen_is_set_on_d_and_keeps_the_triggered_inputs(screened):
    source, res, x = screened
    rep = res.report
    assert rep.focus["class"] is None
    assert set(rep.screen) >= {"threshold", "share", "margin_flags_kept"}
    assert 0 < rep.screen["share"] <= 0.2 + 1e-9  # passed strictly: at most the share asked
    assert get_metadata(res.model)["mmexport.mmdf.screen"] == repr(rep.screen["threshold"])
    out = ort_run(res.model, x)
    over = out[SCORE] > 0  # the margin test's verdict on every input
    attack = np.arange(len(x)) >= 200
    probe = onnx.ModelProto()
    probe.CopyFrom(res.model)
    probe.graph.output.append(onnx.helper.make_tensor_value_info(SCREENED, onnx.TensorProto.BOOL, None))
    passed = ort_run(probe, x)[SCREENED].reshape(-1)
    # The trigger drives channels far past their clean range: every triggered input the
    # margin test would flag passes the screen.
    assert over[attack].mean() > 0.5
    assert passed[over & attack].all()
    # Flags: the margin test past the screen, or the feature test.
    far = out[FEATURE_SCORE] > 0
    np.testing.assert_array_equal(out[DETECTED], (over & passed) | far)


def test_screen_one_tests_every_input_and_writes_no_gate():
    res = detect(FOLDER / "model.onnx", FOLDER / "clean.npz", avoid=None, screen=1.0, provider="cpu")
    assert "threshold" not in res.report.screen and "every input" in res.report.screen["reason"]
    assert not is_gated(res.model) and get_metadata(res.model)["mmexport.mmdf.screen"] == ""


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5])
def test_screen_outside_zero_one_is_refused(value):
    with pytest.raises(ParameterError, match="screen"):
        MmdfConfig(screen=value)


@pytest.mark.parametrize("size", [1, 9, 64])
def test_screened_gate_gives_the_ungated_logits_and_flags(screened, size):
    source, res, x = screened
    full = res.model
    gated = gate_mmdf_graph(full, source, logits_name="logits", focus=None, outputs=OURS)
    onnx.checker.check_model(gated)
    assert is_gated(gated)
    gate = next(n for n in gated.graph.node if n.op_type == "If")
    assert all(len(a.g.initializer) == 0 for a in gate.attribute)  # no recompute: the weights stay outside
    tested_rows = 0
    for i in range(0, len(x) - size + 1, size):
        xb = x[i:i + size]
        want, got = ort_run(full, xb), ort_run(gated, xb)
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(got[DETECTED], want[DETECTED])
        # the feature test runs on every row, before the gate
        np.testing.assert_allclose(got[FEATURE_SCORE], want[FEATURE_SCORE], atol=1e-4, rtol=1e-4)
        tested = ~np.isnan(got[SCORE])
        np.testing.assert_allclose(got[SCORE][tested], want[SCORE][tested], atol=1e-4, rtol=1e-4)
        assert not (want[DETECTED] & ~tested).any()  # every flagged row was tested
        tested_rows += tested.sum()
    assert 0 < tested_rows < len(x) - len(x) % size


def test_screened_gate_is_standard_onnx_the_reference_runtime_agrees(screened):
    source, res, x = screened
    gated = gate_mmdf_graph(res.model, source, logits_name="logits", focus=None, outputs=OURS)
    xb = np.concatenate([x[:3], x[-3:]])  # clean rows (mostly unscreened) and triggered ones
    got = ReferenceEvaluator(gated).run(None, {"input": xb})
    want = ort_run(gated, xb)
    for name, value in zip([o.name for o in gated.graph.output], got, strict=True):
        np.testing.assert_allclose(np.asarray(value, dtype=want[name].dtype), want[name], atol=1e-4, rtol=1e-4)


def test_detect_gates_on_the_screen_and_a_fixed_batch_tests_the_whole_batch(screened):
    source, res, x = screened
    t = res.report.screen["threshold"]
    fixed = with_fixed_batch(source, 4)
    full = build_mmdf_graph(fixed, res.bounds, 0.5, screen=t, gate=False)
    gated = build_mmdf_graph(fixed, res.bounds, 0.5, screen=t)
    assert is_gated(gated) and not is_gated(full)
    for i in range(0, 40, 4):
        want, got = ort_run(full, x[i:i + 4]), ort_run(gated, x[i:i + 4])
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(got[DETECTED], want[DETECTED])
    # without a focus class or a screen there is nothing to gate on
    assert not is_gated(build_mmdf_graph(source, res.bounds, 0.5))


def test_cli_detect_says_where_the_screen_lies(tmp_path):
    folder = SAMPLES / "digits-cnn-clean"
    out = tmp_path / "m.mmdf.onnx"
    r = run_cli("detect", folder / "model.onnx", "--data", folder / "clean.npz", "-o", out, "--avoid", "none")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "screen: the margin test judges inputs whose activations pass their clean range" in text
    assert "gate: the bounded branch runs on those and on what the feature test flags" in text
    assert is_gated(onnx.load(out))
    r = run_cli("detect", folder / "model.onnx", "--data", folder / "clean.npz", "-o", out, "--avoid", "none",
                "--screen", "1", "--force", "--json", "-q")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["screen"] == {"reason": "screen 1: every input"} and not rep["gated"]
