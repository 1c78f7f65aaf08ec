"""Models that output probabilities (a final Softmax or LogSoftmax): margins, bounds and MMDF
use the logits behind them, and the model keeps its output."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from builders import labelled_set, tiny_cnn
from builders import run_cli as run
from onnx import helper
from variants import with_softmax

import mmexport
from mmexport.core.conventions import logits_of
from mmexport.core.model import from_proto
from mmexport.defences.mmom.refit import find_classifier
from mmexport.engine.executor import Engine

FAST = dict(max_epochs=4, restarts=2, warmup_steps=5, device="cpu", seed=0)


@pytest.fixture(scope="module")
def pair():
    logits = tiny_cnn(seed=3)
    return logits, with_softmax(logits), labelled_set(logits, 8, seed=1)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_the_logits_behind_a_final_softmax_are_found(op):
    model = from_proto(with_softmax(tiny_cnn(seed=3), op=op))
    assert logits_of(model) == mmexport.core.conventions.Logits("logits", "probabilities", op)


def test_an_output_that_is_already_logits_is_its_own_logits():
    model = from_proto(tiny_cnn(seed=3))
    assert logits_of(model).name == "logits" and logits_of(model).via is None


def test_a_softmax_over_the_batch_axis_is_not_looked_through():
    proto = tiny_cnn(seed=3)
    proto.graph.node.append(helper.make_node("Softmax", ["logits"], ["p"], axis=0))
    proto.graph.output[0].name = "p"
    assert logits_of(from_proto(proto)).via is None


def test_the_engine_computes_the_logits_of_a_softmax_model(pair):
    logits, probs, (x, _) = pair
    want = Engine(from_proto(logits))(torch.from_numpy(x))
    torch.testing.assert_close(Engine(from_proto(probs))(torch.from_numpy(x)), want)


def test_harden_finds_the_bounds_of_the_logits_model(pair):
    logits, probs, clean = pair
    got, want = mmexport.harden(probs, clean, **FAST), mmexport.harden(logits, clean, **FAST)
    assert list(got.bounds) == list(want.bounds)
    for site, value in want.bounds.items():
        np.testing.assert_array_equal(got.bounds[site], value)
    assert got.report.max_margins_after == want.report.max_margins_after
    assert [o.name for o in got.model.graph.output] == ["probabilities"]


def test_mmdf_takes_d_on_the_logits_and_switches_them_before_the_softmax(pair):
    logits, probs, (x, y) = pair
    got = mmexport.detect(probs, (x, y), avoid=None, provider="cpu")
    want = mmexport.detect(logits, (x, y), avoid=None, provider="cpu")
    assert got.threshold == want.threshold
    names = ["probabilities", "mmdf_detected"]
    p, flag_p = ort.InferenceSession(got.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        names, {"input": x})
    z, flag_z = ort.InferenceSession(want.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits", "mmdf_detected"], {"input": x})
    np.testing.assert_array_equal(flag_p, flag_z)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(p, torch.softmax(torch.from_numpy(z), 1).numpy(), rtol=1e-4, atol=1e-6)


def test_scan_and_refit_look_through_the_softmax(pair):
    logits, probs, clean = pair
    kw = dict(restarts=2, ascent_steps=5, universal_steps=5, device="cpu")
    assert mmexport.scan(probs, clean, **kw).max_margins == mmexport.scan(logits, clean, **kw).max_margins
    assert find_classifier(from_proto(probs)).weight == "w3"


def test_inspect_names_the_logits_and_verifies_them(pair, tmp_path):
    path = tmp_path / "probs.onnx"
    onnx.save(pair[1], path)
    info = json.loads(run("inspect", path, "--verify", "--json", "--provider", "cpu").output)
    assert info["logits"] == {"tensor": "logits", "via": "Softmax"}
    checked = {o["name"]: o for o in info["verify"]["outputs"]}
    assert set(checked) == {"probabilities", "logits"} and checked["logits"]["logits_of"] == "probabilities"
    plain = " ".join(run("inspect", path).output.split())
    assert "probabilities is its Softmax): margins, bounds and MMDF use the logits" in plain


def test_the_focus_gate_keeps_the_softmax_after_the_switch(pair):
    _, probs, (x, y) = pair
    from mmexport.defences.mmdf.graph import is_gated

    gated = mmexport.detect(probs, (x, y), avoid=1, provider="cpu")
    plain = mmexport.detect(probs, (x, y), avoid=1, gate=False, provider="cpu")
    assert is_gated(gated.model) and not is_gated(plain.model)
    names = ["probabilities", "mmdf_detected"]
    got = ort.InferenceSession(gated.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        names, {"input": x})
    want = ort.InferenceSession(plain.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        names, {"input": x})
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[0].sum(1), 1.0, rtol=1e-5)
