"""The peer defences (mmexport.defences.baselines) on tiny models: what each writes, and that it runs in onnxruntime."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from builders import labelled_set, ort_run, tiny_cnn
from onnx import helper, numpy_helper

from mmexport.core.model import from_proto, replace_initializers
from mmexport.defences.baselines import common as baseline_common
from mmexport.defences.baselines import peers
from mmexport.engine.executor import ChannelScale, Engine
from mmexport.graph.rewrite import extract_bounds

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"



def ort_accuracy(proto: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return float((ort_run(proto, x)["logits"].argmax(1) == y).mean())


def inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def test_registry_names_every_peer():
    assert set(peers.PEERS) == {"activation-clipping", "fine-pruning", "clp", "fine-tuning", "anp",
                                "adversarial-unlearning"}


# --- CLP --------------------------------------------------------------------------------------


def test_channel_lipschitz_is_the_spectral_norm_of_each_kernel():
    w = np.random.default_rng(0).normal(size=(5, 3, 3, 3)).astype(np.float32)
    want = [np.linalg.norm(w[k].reshape(3, 9), 2) for k in range(5)]
    np.testing.assert_allclose(peers.channel_lipschitz(w), want, rtol=1e-5)


def test_clp_zeroes_exactly_the_planted_outlier_channel():
    proto = tiny_cnn(0)
    w = inits(proto)["w1"].copy()
    w[2] *= 100.0  # one channel far more input-sensitive than its layer
    proto = replace_initializers(proto, {"w1": w})
    # 4 channels: the largest z-score possible is sqrt(3), so u = 3 could never fire here.
    out, info = peers.clp(proto, None, None, u=1.5)
    new, old = inits(out), inits(proto)
    assert info["pruned_channels"] == {"conv1": [2]}
    assert not new["w1"][2].any() and new["b1"][2] == 0
    np.testing.assert_array_equal(np.delete(new["w1"], 2, 0), np.delete(old["w1"], 2, 0))
    np.testing.assert_array_equal(np.delete(new["b1"], 2), np.delete(old["b1"], 2))
    for name in ("w2", "b2", "w3", "b3"):
        np.testing.assert_array_equal(new[name], old[name])
    x = np.random.default_rng(1).uniform(0, 1, (8, 1, 6, 6)).astype(np.float32)
    r1 = ort_run(out, x, ("r1",))["r1"]
    assert not r1[:, 2].any()


def test_clp_leaves_a_layer_without_outliers_alone():
    proto = tiny_cnn(0)
    out, info = peers.clp(proto, None, None)
    assert info["pruned"] == 0 and info["conv_layers"] == 1
    for name, value in inits(proto).items():
        np.testing.assert_array_equal(inits(out)[name], value)


# --- fine-pruning -----------------------------------------------------------------------------


def test_last_conv_site_per_architecture():
    assert peers.last_conv_site(from_proto(tiny_cnn(0))) == "r1"
    resnet = from_proto(onnx.load(str(SAMPLES / "digits-resnet-badnet" / "model.onnx")))
    assert peers.last_conv_site(resnet) == "/4/Relu_1_output_0"  # after the last residual Add
    mlp = from_proto(onnx.load(str(SAMPLES / "digits-mlp-badnet" / "model.onnx")))
    assert peers.last_conv_site(mlp) == mlp.sites[-1].name


def test_fine_pruning_zeroes_its_pruned_channels_in_onnxruntime():
    proto = tiny_cnn(0)
    x, y = labelled_set(proto, 10)
    out, info = peers.fine_pruning(proto, x, y, max_drop=0.5, epochs=3)
    onnx.checker.check_model(out)
    assert info["site"] == "r1" and info["pruned"] >= 1
    assert info["accuracy_D_pruned"] >= info["accuracy_D_before"] - 0.5
    run = ort_run(out, x, ("r1",))
    logits, r1 = run["logits"], run["r1"]
    assert not r1[:, info["pruned_channels"]].any()
    kept = [c for c in range(4) if c not in info["pruned_channels"]]
    assert r1[:, kept].any()
    # ORT agrees with the engine run of the pruned, fine-tuned weights.
    np.testing.assert_allclose(logits, Engine(from_proto(out))(torch.from_numpy(x)).numpy(), atol=1e-4)


def test_fine_pruning_stops_before_the_accuracy_drop():
    proto = tiny_cnn(0)
    x, y = labelled_set(proto, 10)
    _, strict = peers.fine_pruning(proto, x, y, max_drop=0.0, epochs=1)
    assert strict["accuracy_D_pruned"] == strict["accuracy_D_before"]
    _, loose = peers.fine_pruning(proto, x, y, max_drop=1.0, epochs=1)
    assert loose["pruned"] == 4  # any drop allowed: every channel goes


# --- fine-tuning ------------------------------------------------------------------------------


def test_fine_tuning_changes_weights_and_raises_accuracy_on_d():
    teacher, student = tiny_cnn(0), tiny_cnn(1)
    x, y = labelled_set(teacher, 10)  # labels the student gets partly wrong
    before = ort_accuracy(student, x, y)
    out, info = peers.fine_tuning(student, x, y, epochs=15)
    assert info["tensors"] == 6
    assert any(not np.array_equal(inits(out)[k], v) for k, v in inits(student).items())
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in student.graph.node]
    assert ort_accuracy(out, x, y) > before
    again, _ = peers.fine_tuning(student, x, y, epochs=15)
    for name, value in inits(out).items():
        np.testing.assert_array_equal(inits(again)[name], value)  # deterministic given the seed


def test_fine_tuning_leaves_the_input_model_untouched():
    proto = tiny_cnn(0)
    snapshot = proto.SerializeToString()
    x, y = labelled_set(proto, 5)
    peers.fine_tuning(proto, x, y, epochs=1)
    assert proto.SerializeToString() == snapshot


def test_adversarial_unlearning_trains_against_a_bounded_perturbation_and_repeats():
    teacher, student = tiny_cnn(0), tiny_cnn(1)
    x, y = labelled_set(teacher, 10)
    snapshot = student.SerializeToString()
    before = ort_accuracy(student, x, y)
    out, info = peers.adversarial_unlearning(student, x, y, epochs=10, eps=0.5)
    assert student.SerializeToString() == snapshot  # the input model is left as it was
    assert [n.op_type for n in out.graph.node] == [n.op_type for n in student.graph.node]
    assert 0 < info["perturbation_norm_mean"] <= 0.5 + 1e-4  # the ascent reached the L2 ball, not past it
    assert info["lr"] in baseline_common.FT_LRS and info["accuracy_D_after"] > before
    again, _ = peers.adversarial_unlearning(student, x, y, epochs=10, eps=0.5)
    for name, value in inits(out).items():
        np.testing.assert_array_equal(inits(again)[name], value)  # deterministic given the seed
    default = peers.AU_EPS_PER_DIM * np.sqrt(np.prod(x.shape[1:]))
    assert peers.adversarial_unlearning(student, x, y, epochs=1)[1]["eps"] == pytest.approx(default, abs=1e-4)


# --- activation clipping ----------------------------------------------------------------------


def test_activation_clipping_writes_bounds_and_keeps_d():
    proto = tiny_cnn(0)
    x, y = labelled_set(proto, 10)
    out, info = peers.activation_clipping(proto, x, y, max_epochs=30)
    bounds = extract_bounds(out)
    assert set(bounds) == {"r1", "r2"}
    assert info["mean_relative_bound"] < 1.0  # the bounds shrank below D's maxima
    engine = Engine(from_proto(proto))
    _, acts = engine.run(torch.from_numpy(x), record=["r1", "r2"], outputs=["logits"])
    for site, z in bounds.items():
        a = acts[site].detach()
        z0 = (a.transpose(0, 1).reshape(a.shape[1], -1).max(1).values if a.dim() > 2 else a.max(0).values).numpy()
        assert (z <= z0 + 1e-5).all()
    assert ort_accuracy(out, x, y) >= 0.98  # labelled_set: every sample of D starts correct


def test_activation_clipping_falls_back_to_the_data_maxima_when_nothing_is_feasible():
    proto = tiny_cnn(0)
    x, y = labelled_set(proto, 5)
    out, info = peers.activation_clipping(proto, x, y, max_epochs=2, lambda0=1e6, lr=0.5)
    assert info["backoffs"] == 1 and info["mean_relative_bound"] == 1.0
    np.testing.assert_allclose(ort_run(out, x)["logits"], ort_run(proto, x)["logits"], atol=1e-5)


def test_peers_return_models_with_the_original_io():
    proto = tiny_cnn(0)
    x, y = labelled_set(proto, 3)
    for name, fn in peers.PEERS.items():
        kwargs = {"max_epochs": 2} if name == "activation-clipping" else {}
        kwargs.update({"epochs": 1} if name in ("fine-pruning", "fine-tuning", "adversarial-unlearning") else {})
        kwargs.update({"iterations": 2, "batch_size": 4} if name == "anp" else {})
        out, info = fn(proto, x, y, seed=0, **kwargs)
        assert isinstance(out, onnx.ModelProto) and isinstance(info, dict), name
        assert [i.name for i in out.graph.input] == ["input"] and [o.name for o in out.graph.output] == ["logits"]
        assert ort_run(out, x)["logits"].shape == (len(x), 3), name


# --- pruning and ANP --------------------------------------------------------------------------


def silu_tiny() -> onnx.ModelProto:
    """tiny_cnn with its first Relu as x * Sigmoid(x): a site that a bound 0 cannot zero."""
    proto = tiny_cnn(0)
    nodes = list(proto.graph.node)
    i = next(k for k, n in enumerate(nodes) if n.name == "relu1")
    silu = [
        helper.make_node("Sigmoid", ["c1"], ["s1"], name="sig1"),
        helper.make_node("Mul", ["c1", "s1"], ["r1"], name="silu1"),
    ]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes[:i] + silu + nodes[i + 1 :])
    onnx.checker.check_model(proto)
    return proto


def test_largest_prefix_matches_the_one_at_a_time_scan_on_a_monotone_accuracy():
    for n in (0, 1, 7, 100):
        for cut in range(n + 2):
            acc = lambda k, cut=cut: 1.0 if k < cut else 0.5  # noqa: E731
            k, value = peers.largest_prefix(acc, n, 0.9)
            assert k == min(cut - 1, n) if cut else k == 0
            assert value == acc(k)


def test_channel_scale_multiplies_a_site_per_channel_in_the_engine():
    proto = tiny_cnn(0)
    x, _ = labelled_set(proto, 4)
    engine = Engine(from_proto(proto))
    s = torch.tensor([1.0, 0.0, 0.5, 2.0])
    _, plain = engine.run(torch.from_numpy(x), record=["r1"], outputs=["logits"])
    _, scaled = engine.run(torch.from_numpy(x), {"r1": ChannelScale(s)}, record=["r1"], outputs=["logits"])
    torch.testing.assert_close(scaled["r1"], plain["r1"] * s.view(1, 4, 1, 1))


def test_prune_channels_zeroes_relu_and_silu_channels_exactly_in_onnxruntime():
    x = np.random.default_rng(2).uniform(0, 1, (16, 1, 6, 6)).astype(np.float32)
    for proto in (tiny_cnn(0), silu_tiny()):
        model = from_proto(proto)
        kind = next(s.kind for s in model.sites if s.name == "r1")
        gone = np.array([False, True, False, True])
        out, info = peers.prune_channels(proto, model, {"r1": gone})
        onnx.checker.check_model(out)
        assert info == {}, kind  # exact on both kinds
        r1 = ort_run(out, x, ("r1",))["r1"]
        assert not r1[:, [1, 3]].any(), kind
        np.testing.assert_allclose(r1[:, [0, 2]], ort_run(proto, x, ("r1",))["r1"][:, [0, 2]], atol=1e-6)


def test_anp_prunes_within_the_drop_runs_in_onnxruntime_and_repeats_given_the_seed():
    proto = tiny_cnn(0)
    x, y = labelled_set(proto, 10)
    out, info = peers.anp(proto, x, y, iterations=30, batch_size=16, eps=0.4, threshold=0.9, max_drop=0.1)
    onnx.checker.check_model(out)
    assert info["iterations"] == 30 and info["channels"] == 12  # r1: 4, r2: 8
    assert info["pruned"] <= info["under_threshold"]
    assert info["accuracy_D_after"] >= info["accuracy_D_before"] - 0.1 - 1e-9
    assert abs(ort_accuracy(out, x, y) - info["accuracy_D_after"]) < 1e-9
    again, info2 = peers.anp(proto, x, y, iterations=30, batch_size=16, eps=0.4, threshold=0.9, max_drop=0.1)
    assert info2["pruned"] == info["pruned"] and info2["mask_mean"] == info["mask_mean"]
    for name, value in inits(out).items():
        np.testing.assert_array_equal(inits(again)[name], value)
    none, _ = peers.anp(proto, x, y, iterations=5, batch_size=16, max_drop=0.0, threshold=0.9)
    assert ort_accuracy(none, x, y) >= ort_accuracy(proto, x, y)


def test_anp_stops_at_its_time_limit():
    proto = tiny_cnn(0)
    x, y = labelled_set(proto, 3)
    _, info = peers.anp(proto, x, y, iterations=10_000, batch_size=4, max_seconds=0.0)
    assert info["iterations"] == 1 and info["iterations_planned"] == 10_000


def test_fine_tuning_trains_around_a_batchnorm_and_keeps_its_statistics():
    proto = tiny_cnn(0)
    nodes = list(proto.graph.node)
    i = next(k for k, n in enumerate(nodes) if n.name == "relu1")
    nodes[i - 1].output[0] = "c0"
    bn = helper.make_node("BatchNormalization", ["c0", "g", "be", "mu", "var"], ["c1"], name="bn1")
    del proto.graph.node[:]
    proto.graph.node.extend(nodes[:i] + [bn] + nodes[i:])
    rng = np.random.default_rng(4)
    for name, value in (("g", rng.uniform(0.5, 1.5, 4)), ("be", rng.normal(0, 0.1, 4)),
                        ("mu", rng.normal(0, 0.1, 4)), ("var", rng.uniform(0.5, 1.5, 4))):
        proto.graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), name))
    onnx.checker.check_model(proto)
    x, y = labelled_set(tiny_cnn(1), 5)
    out, info = peers.fine_tuning(proto, x, y, epochs=2)
    new, old = inits(out), inits(proto)
    np.testing.assert_array_equal(new["mu"], old["mu"])
    np.testing.assert_array_equal(new["var"], old["var"])
    assert not np.array_equal(new["g"], old["g"])  # the BatchNorm's scale is a weight and trains
    assert info["tensors"] == 8


def test_fine_tuning_lowers_its_learning_rate_when_d_loss_ends_above_its_start(monkeypatch):
    teacher, student = tiny_cnn(0), tiny_cnn(1)
    x, y = labelled_set(teacher, 10)
    _, plain = peers.fine_tuning(student, x, y, epochs=5)
    assert plain["lr"] == 1e-3 and len(plain["lr_tried"]) == 1
    monkeypatch.setattr(baseline_common, "FT_LRS", (1e3, 1e-3))  # Adam at 1000: D's loss blows up
    out, info = peers.fine_tuning(student, x, y, epochs=5)
    assert [t["lr"] for t in info["lr_tried"]] == [1e3, 1e-3]
    assert info["lr_tried"][0]["loss_D_after"] > info["loss_D_before"] > info["lr_tried"][1]["loss_D_after"]
    monkeypatch.undo()
    same, _ = peers.fine_tuning(student, x, y, epochs=5)
    for name, value in inits(same).items():  # the retry starts from the original weights
        np.testing.assert_array_equal(inits(out)[name], value)
