"""Last-layer refit and the long-tail methods (MMOM, MMOM + refit)."""

import numpy as np
import onnx
import pytest
import torch
from builders import assert_one_line_error, labelled_set, make_model, ort_run, run_cli, tiny_cnn
from onnx import TensorProto, helper, numpy_helper

import mmexport
from mmexport.core.model import from_proto
from mmexport.defences.common.stats import balanced_accuracy, stratified_folds
from mmexport.defences.mmom.refit import features, find_classifier, refit, write_classifier
from mmexport.engine.executor import Engine

FAST = dict(restarts=2, warmup_steps=5, steps=2, max_epochs=4, check_every=2)


def ort_logits(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort_run(proto, x)["logits"]


def biased(proto: onnx.ModelProto, shift: float) -> onnx.ModelProto:
    """tiny_cnn with class 0's bias raised: a classifier skewed toward one class."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        if init.name == "b3":
            b = numpy_helper.to_array(init).copy()
            b[0] += shift
            init.CopyFrom(numpy_helper.from_array(b, "b3"))
    return out


def matmul_head() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (5, 6)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 1, (6, 3)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["m"]),
        helper.make_node("Add", ["m", "b2"], ["a"]),
        helper.make_node("Identity", ["a"], ["logits"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        inits,
    )


def test_find_classifier_reads_gemm_and_matmul_heads():
    clf = find_classifier(from_proto(tiny_cnn()))
    assert (clf.features, clf.weight, clf.bias, clf.transposed) == ("r2", "w3", "b3", True)
    clf = find_classifier(from_proto(matmul_head()))
    assert (clf.features, clf.weight, clf.bias, clf.transposed) == ("r", "w2", "b2", False)


def test_find_classifier_names_the_output_when_there_is_no_linear_head():
    proto = tiny_cnn()
    proto.graph.node.append(helper.make_node("Relu", ["logits"], ["out"], name="last_relu"))
    proto.graph.output[0].name = "out"
    with pytest.raises(mmexport.MmexportError, match="'out'.*last_relu"):
        find_classifier(from_proto(proto))


@pytest.mark.parametrize("builder", [tiny_cnn, matmul_head])
def test_write_classifier_puts_the_new_layer_where_onnxruntime_runs_it(builder):
    proto = builder()
    m = from_proto(proto)
    clf = find_classifier(m)
    rng = np.random.default_rng(1)
    f_dim = 8 if builder is tiny_cnn else 6
    w, b = rng.normal(size=(3, f_dim)), rng.normal(size=3)
    out = write_classifier(m, w, b)
    shape = (16, 1, 6, 6) if builder is tiny_cnn else (16, 5)
    x = rng.uniform(0, 1, shape).astype(np.float32)
    f = features(Engine(m), torch.from_numpy(x), clf).numpy()
    assert np.abs(ort_logits(out, x) - (f @ w.T + b)).max() < 1e-4


def test_refit_repairs_a_skewed_last_layer_and_keeps_a_good_one():
    good = tiny_cnn(seed=2)
    x, y = labelled_set(good, 20, seed=0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    # The model labelled the data itself: no refit can beat it, so its layer is kept exactly.
    m = from_proto(good)
    w, b, table = refit(Engine(m), xt, yt, 3)
    w0 = numpy_helper.to_array(next(i for i in good.graph.initializer if i.name == "w3"))
    assert np.array_equal(w, w0.astype(np.float64)) and table[-1]["penalty"] is None

    skewed = from_proto(biased(good, 5.0))
    before = balanced_accuracy(Engine(skewed)(xt).argmax(1), yt, 3)
    w, b, table = refit(Engine(skewed), xt, yt, 3)
    pred = (features(Engine(skewed), xt, find_classifier(skewed)) @ torch.from_numpy(w).T + torch.from_numpy(b))
    after = balanced_accuracy(pred.argmax(1), yt, 3)
    assert before < 0.6 and after > before + 0.2


def test_stratified_folds_split_every_class_evenly():
    y = np.repeat(np.arange(3), [4, 6, 5])
    parts = stratified_folds(y, 2, seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))
    for c, n in zip(range(3), (4, 6, 5), strict=True):
        counts = [int((y[p] == c).sum()) for p in parts]
        assert sum(counts) == n and max(counts) - min(counts) <= 1


def test_mmom_refit_writes_bounds_and_the_refitted_layer():
    proto = biased(tiny_cnn(seed=2), 5.0)
    x, y = labelled_set(tiny_cnn(seed=2), 12, seed=0)
    res = mmexport.harden(proto, (x, y), method="mmom-refit", seed=1, **FAST)
    assert res.report.method == "mmom-refit" and res.report.refit[-1]["penalty"] is None
    assert res.report.sites == 2
    yt = torch.from_numpy(y)
    before = balanced_accuracy(torch.from_numpy(ort_logits(proto, x).argmax(1)), yt, 3)
    after = balanced_accuracy(torch.from_numpy(ort_logits(res.model, x).argmax(1)), yt, 3)
    assert after > before + 0.2


def test_mmom_refit_without_a_linear_head_fails_before_searching(tmp_path):
    proto = tiny_cnn()
    proto.graph.node.append(helper.make_node("Relu", ["logits"], ["out"], name="last_relu"))
    proto.graph.output[0].name = "out"
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    x, y = labelled_set(tiny_cnn(), 4)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    r = run_cli("harden", path, "--data", tmp_path / "d.npz", "--method", "mmom-refit", "-q")
    assert_one_line_error(r, "'out'", "Gemm")
    assert not (tmp_path / "m.mmom-refit.onnx").exists()


def test_mmom_searches_universal_perturbations_unless_told_otherwise():
    proto = tiny_cnn(seed=2)
    x, y = labelled_set(proto, 6, seed=0)
    res = mmexport.harden(proto, (x, y), method="mmom", **FAST)
    assert res.report.settings["maximisers"] == "universal"
    assert res.report.settings["method"] == "mmom"
    res = mmexport.harden(proto, (x, y), method="mmom", maximisers="masked", **FAST)
    assert res.report.settings["maximisers"] == "masked"
    assert mmexport.harden(proto, (x, y), **FAST).report.settings["maximisers"] == "universal+masked"


def test_mmom_has_no_unlearning_stage_and_refuses_an_unlearn_setting():
    proto = tiny_cnn(seed=2)
    x, y = labelled_set(proto, 6, seed=0)
    res = mmexport.harden(proto, (x, y), method="mmom", **FAST)
    assert "unlearn" not in res.report.settings and res.report.stamp is None
    with pytest.raises(mmexport.MmexportError, match="unlearn: not a parameter of MMOM"):
        mmexport.harden(proto, (x, y), method="mmom", unlearn="auto", **FAST)
