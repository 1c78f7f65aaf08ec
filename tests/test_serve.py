"""MMDF backing a hardened model: unflagged inputs get the hardened model's logits."""

import json

import numpy as np
import onnx
import pytest
from builders import labelled_set, tiny_cnn
from builders import run_cli as run
from onnx import numpy_helper

from mmexport.core.bounds import Bounds
from mmexport.core.errors import MmexportError
from mmexport.core.provenance import get_metadata, set_metadata, sha256_bytes
from mmexport.defences.mmdf.detector import detect
from mmexport.defences.mmdf.graph import DETECTED, SUPPRESSED
from mmexport.graph.rewrite import apply_bounds
from mmexport.runtime.sessions import session

FIXED = dict(avoid=None, focus=False, statistic="margin", augment=False)


def ort(proto, x):
    sess, _ = session(proto, provider="cpu")
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))


def expected(alone: dict, served: dict) -> np.ndarray:
    """The served logits, but where MMDF alone flagged a row, the classes its fix suppressed."""
    low = alone["logits"] < SUPPRESSED / 2
    assert (low.sum(1) >= alone[DETECTED]).all()  # a flagged row always loses its predicted class
    return np.where(low & alone[DETECTED][:, None], alone["logits"], served["logits"])


def hardened_from(proto, bounds, *, shift: float = 0.0, method: str = "mmac-ft"):
    """A model as harden writes it: the bounds folded in, the source's hash and method in its
    metadata; `shift` moves the last bias, standing in for fine-tuned weights."""
    out = apply_bounds(proto, bounds)
    for i, t in enumerate(out.graph.initializer):
        if t.name == "b3":
            b = numpy_helper.to_array(t) + np.float32(shift) * np.arange(len(numpy_helper.to_array(t)))
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(b.astype(np.float32), "b3"))
    set_metadata(out, {"mmexport.source_sha256": sha256_bytes(proto.SerializeToString()),
                       "mmexport.method": method})
    return out


@pytest.fixture(scope="module")
def tiny():
    proto = tiny_cnn(seed=3)
    x, y = labelled_set(proto, 10, seed=1)
    bounds = Bounds({"r1": [0.3, 0.2, 0.4, 0.1], "r2": 0.5})
    rng = np.random.default_rng(5)  # inputs like D's, and larger ones that the bounds cut
    probe = np.concatenate([rng.uniform(0, 1, (200, 1, 6, 6)), rng.uniform(0, 3, (100, 1, 6, 6))]).astype(np.float32)
    return proto, x, y, bounds, probe


def test_rows_get_the_served_logits_less_what_mmdf_suppressed_in_flagged_rows(tiny):
    proto, x, y, bounds, probe = tiny
    served = hardened_from(proto, bounds, shift=0.7)
    alone = detect(proto, (x, y), bounds=bounds, **FIXED)
    stacked = detect(proto, (x, y), bounds=bounds, serve=served, **FIXED)
    a, s, h = ort(alone.model, probe), ort(stacked.model, probe), ort(served, probe)
    flagged = a[DETECTED]
    assert 0 < flagged.sum() < len(probe)  # both kinds of rows are checked
    np.testing.assert_array_equal(s[DETECTED], flagged)
    np.testing.assert_allclose(s["logits"], expected(a, h), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s["logits"][~flagged], h["logits"][~flagged], rtol=1e-6, atol=1e-6)
    # A flagged row never gets the original's prediction; otherwise the served model's ranking.
    original = ort(proto, probe)["logits"].argmax(1)
    assert (s["logits"][flagged].argmax(1) != original[flagged]).all()
    assert not np.allclose(h["logits"], a["logits"], atol=1e-3)  # the served model really differs
    assert stacked.threshold == alone.threshold


def test_the_stacked_graph_keeps_the_models_interface_and_says_what_it_serves(tiny):
    proto, x, y, bounds, _ = tiny
    served = hardened_from(proto, bounds)
    res = detect(proto, (x, y), bounds=bounds, serve=served, **FIXED)
    out = res.model
    onnx.checker.check_model(out)
    assert [i.name for i in out.graph.input] == [i.name for i in proto.graph.input]
    assert [o.name for o in out.graph.output][:2] == ["logits", DETECTED]
    assert out.ir_version == proto.ir_version and out.opset_import[0].version == proto.opset_import[0].version
    info = json.loads(get_metadata(out)["mmexport.mmdf.served"])
    assert info == res.report.served
    assert info["method"] == "mmac-ft" and info["sha256"] == sha256_bytes(served.SerializeToString())
    assert get_metadata(detect(proto, (x, y), bounds=bounds, **FIXED).model)["mmexport.mmdf.served"] == ""


def test_a_gated_graph_serves_too(tiny):
    proto, x, y, bounds, probe = tiny
    served = hardened_from(proto, bounds, shift=0.7)
    large = np.bincount(ort(proto, probe[200:])["logits"].argmax(1)).argmax()  # where the cut inputs go
    gated = dict(FIXED, avoid=int(large), focus=True)
    alone = detect(proto, (x, y), bounds=bounds, **gated)
    stacked = detect(proto, (x, y), bounds=bounds, serve=served, **gated)
    assert stacked.report.gated
    a, s, h = ort(alone.model, probe), ort(stacked.model, probe), ort(served, probe)
    assert 0 < a[DETECTED].sum() < len(probe)
    np.testing.assert_allclose(s["logits"], expected(a, h), rtol=1e-6, atol=1e-6)
    assert (s["logits"][a[DETECTED]].argmax(1) != gated["avoid"]).all()


def test_serve_refuses_what_harden_did_not_write_from_this_model(tiny):
    proto, x, y, bounds, _ = tiny
    other = hardened_from(tiny_cnn(seed=4), bounds)
    plain = apply_bounds(proto, bounds)
    mmdf = detect(proto, (x, y), bounds=bounds, **FIXED).model
    for served, match in ((other, "hardened from another model"), (plain, "not written by mmexport harden"),
                          (mmdf, "an MMDF model")):
        with pytest.raises(MmexportError, match=match) as err:
            detect(proto, (x, y), bounds=bounds, serve=served, **FIXED)
        assert "\n" not in str(err.value)
    renamed = hardened_from(proto, bounds)
    renamed.graph.output[0].name = "scores"
    with pytest.raises(MmexportError, match="no output 'logits'"):
        detect(proto, (x, y), bounds=bounds, serve=renamed, **FIXED)


def test_cli_detect_serve(tmp_path, tiny):
    proto, x, y, bounds, probe = tiny
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    served = hardened_from(proto, bounds, shift=0.7)
    set_metadata(served, {"mmexport.source_sha256": sha256_bytes((tmp_path / "m.onnx").read_bytes())})
    onnx.save(served, tmp_path / "h.onnx")
    (tmp_path / "b.json").write_text(bounds.dumps())
    base = ("detect", tmp_path / "m.onnx", "--data", tmp_path / "clean.npz", "--bounds", tmp_path / "b.json",
            "--avoid", "none", "--statistic", "margin", "--no-augment")
    args = (*base, "--serve", tmp_path / "h.onnx")
    r = run(*args, "--json", "-q")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["served"]["file"] == str(tmp_path / "h.onnx") and rep["served"]["method"] == "mmac-ft"
    s = ort(onnx.load(tmp_path / "m.mmdf.onnx"), probe)
    keep = ~s[DETECTED]
    np.testing.assert_allclose(s["logits"][keep], ort(served, probe)["logits"][keep], rtol=1e-6, atol=1e-6)
    r = run(*args, "-q")
    assert r.exit_code != 0 and "--force" in r.output
    r = run(*base, "--serve", tmp_path / "m.onnx", "-o", tmp_path / "x.onnx")
    assert r.exit_code != 0 and "not written by mmexport harden" in r.output
    assert not (tmp_path / "x.onnx").exists()


def test_a_probabilities_model_serves_its_probabilities_and_mmdfs_in_flagged_rows(tiny):
    from variants import with_softmax

    proto, x, y, bounds, probe = tiny
    probs = with_softmax(proto)
    served = hardened_from(probs, bounds, shift=0.7)
    alone = detect(probs, (x, y), bounds=bounds, **FIXED)
    stacked = detect(probs, (x, y), bounds=bounds, serve=served, **FIXED)
    out = probs.graph.output[0].name
    a, s, h = ort(alone.model, probe), ort(stacked.model, probe), ort(served, probe)
    flagged = a[DETECTED]
    assert 0 < flagged.sum() < len(probe)
    np.testing.assert_allclose(s[out], np.where(flagged[:, None], a[out], h[out]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s[out].sum(1), 1.0, rtol=1e-5)
