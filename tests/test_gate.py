"""The focus gate of MMDF graphs: the tests run on the inputs sent to the focus class alone.

The gated graph must give the ungated graph's logits and flags on every input, flagged or
not, whatever the batch, and its tested rows' scores; the others' scores are NaN.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import ort_run
from onnx import numpy_helper
from onnx.reference import ReferenceEvaluator
from variants import SAMPLES, with_fixed_batch

from mmexport.defences.mmdf.detector import detect
from mmexport.defences.mmdf.gate import GATE_PREFIX, gate_mmdf_graph
from mmexport.defences.mmdf.graph import DETECTED, FEATURE_SCORE, SCORE, build_mmdf_graph, is_gated
from mmexport.graph.rewrite import extract_bounds

OURS = [DETECTED, SCORE, FEATURE_SCORE]


def _target(folder):
    return int(json.loads((folder / "card.json").read_text())["attack"]["target"])


@pytest.fixture(scope="module", params=["digits-cnn-badnet", "digits-resnet-badnet"])
def sample(request):
    """The ungated MMDF graph of a sample (focus on its backdoor target), and its data."""
    folder = SAMPLES / request.param
    target = _target(folder)
    res = detect(folder / "model.onnx", folder / "clean.npz", avoid=target, gate=False, provider="cpu")
    assert not is_gated(res.model) and not res.report.gated
    x = np.concatenate([np.load(folder / f)["x"][:160] for f in ("test.npz", "attack.npz")])
    return onnx.load(folder / "model.onnx"), res.model, target, x.astype(np.float32), res.bounds


def _gated(source, full, focus, **kw):
    return gate_mmdf_graph(full, source, logits_name="logits", focus=focus, outputs=OURS, **kw)


def _batches(x, size):
    return [x[i:i + size] for i in range(0, len(x) - size + 1, size)]


@pytest.mark.parametrize("size", [1, 7, 64])
def test_gated_graph_gives_the_ungated_logits_flags_and_tested_scores(sample, size):
    source, full, focus, x, _ = sample
    gated = _gated(source, full, focus)
    onnx.checker.check_model(gated)
    flagged = tested = 0
    for xb in _batches(x, size):
        want, got = ort_run(full, xb), ort_run(gated, xb)
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(got[DETECTED], want[DETECTED])
        sent = ort_run(source, xb)["logits"].argmax(1) == focus  # the original's prediction
        for name in (SCORE, FEATURE_SCORE):
            assert (np.isnan(got[name]) == ~sent).all()
            np.testing.assert_allclose(got[name][sent], want[name][sent], atol=1e-4, rtol=1e-4)
        flagged += want[DETECTED].sum()
        tested += sent.sum()
    # both kinds of rows were met: flagged (triggered) inputs and clean ones sent elsewhere
    assert 0 < flagged < tested < len(x) - len(x) % size


def test_gated_graph_is_standard_onnx_the_reference_runtime_agrees(sample):
    source, full, focus, x, _ = sample
    gated = _gated(source, full, focus)
    pred = ort_run(source, x)["logits"].argmax(1)
    rows = np.concatenate([np.flatnonzero(pred == focus)[-2:], np.flatnonzero(pred != focus)[:2]])
    xb = x[rows]
    got = ReferenceEvaluator(gated).run(None, {"input": xb})
    want = ort_run(gated, xb)
    names = [o.name for o in gated.graph.output]
    for name, value in zip(names, got, strict=True):
        np.testing.assert_allclose(np.asarray(value, dtype=want[name].dtype), want[name], atol=1e-4, rtol=1e-4)


def test_gated_graph_keeps_its_bounds_readable_and_owns_only_its_conv_weights(sample):
    source, full, focus, _, bounds = sample
    gated = _gated(source, full, focus)
    assert sorted(extract_bounds(gated).values) == sorted(extract_bounds(full).values)
    if_node = next(n for n in gated.graph.node if n.op_type == "If")
    assert if_node.name.startswith(GATE_PREFIX)
    branches = {a.name: a.g for a in if_node.attribute}
    assert len(branches["else_branch"].initializer) == 0
    then = branches["then_branch"]
    owned = {i.name: numpy_helper.to_array(i) for i in then.initializer}
    conv_weights = {i for n in then.node if n.op_type == "Conv" for i in n.input[1:]}
    assert owned and set(owned) == conv_weights  # every conv weight it reads is its own, nothing else
    outer = {i.name: numpy_helper.to_array(i) for i in gated.graph.initializer}
    for name, value in owned.items():  # a copy of an outer weight, under a name of its own
        assert name.startswith(GATE_PREFIX) and name not in outer
        assert any(v.shape == value.shape and np.array_equal(v, value) for v in outer.values())
    grown = sum(v.nbytes for v in owned.values())
    assert gated.ByteSize() < (full.ByteSize() + grown) * 1.05
    shared = _gated(source, full, focus, own_weights=False)
    assert all(len(a.g.initializer) == 0 for a in next(n for n in shared.graph.node if n.op_type == "If").attribute)


def test_a_fixed_batch_runs_the_tests_on_the_whole_batch(sample):
    source, _, focus, x, bounds = sample
    fixed = with_fixed_batch(source, 4)
    full = build_mmdf_graph(fixed, bounds, 0.5, focus=focus, avoid=focus, gate=False)
    gated = build_mmdf_graph(fixed, bounds, 0.5, focus=focus, avoid=focus)
    assert is_gated(gated)
    gate = next(n for n in gated.graph.node if n.op_type == "If")
    then = next(a.g for a in gate.attribute if a.name == "then_branch")
    assert not any(n.op_type == "NonZero" for n in then.node)  # no rows gathered
    for xb in _batches(x, 4):
        want, got = ort_run(full, xb), ort_run(gated, xb)
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(got[DETECTED], want[DETECTED])


def test_no_focus_or_gate_off_writes_the_ungated_graph(sample):
    source, full, focus, _, bounds = sample
    assert not is_gated(build_mmdf_graph(source, bounds, 0.5))  # no focus: every input is tested
    assert not is_gated(build_mmdf_graph(source, bounds, 0.5, focus=focus, gate=False))
    assert is_gated(build_mmdf_graph(source, bounds, 0.5, focus=focus))


def test_own_weights_off_keeps_one_copy_of_every_weight_with_the_same_outputs(sample):
    source, _, focus, x, bounds = sample
    owning = build_mmdf_graph(source, bounds, 0.5, focus=focus, avoid=focus)
    sharing = build_mmdf_graph(source, bounds, 0.5, focus=focus, avoid=focus, own_weights=False)
    owned = [{a.name: len(a.g.initializer) > 0 for n in g.graph.node if n.op_type == "If" for a in n.attribute}
             for g in (owning, sharing)]
    assert owned == [{"then_branch": True, "else_branch": False}, {"then_branch": False, "else_branch": False}]
    assert sharing.ByteSize() < owning.ByteSize()
    want, got = ort_run(owning, x[:64]), ort_run(sharing, x[:64])
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(got[DETECTED], want[DETECTED])
