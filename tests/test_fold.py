"""Folded bounds: per-channel bounds moved into the weights give the outputs of the Min form."""

from __future__ import annotations

import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import IR_OLD, conv_net, make_model
from onnx import TensorProto, helper, numpy_helper

from mmexport.core.bounds import Bounds
from mmexport.core.errors import MmexportError
from mmexport.core.model import find_sites, from_proto
from mmexport.engine.executor import Engine
from mmexport.graph.edit import value_types
from mmexport.graph.fold import fold_bounds
from mmexport.graph.fold.report import METADATA_KEY, read_fold_metadata
from mmexport.graph.rewrite import apply_bounds, count_bounded_sites, extract_bounds

SAMPLES = sorted((Path(__file__).resolve().parents[1] / "sample_models").glob("*/model.onnx"))
RNG_SEED = 0


# --------------------------------------------------------------------------- helpers


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def channel_max(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel max activation of every site on `x` (its channel axis), via extra outputs."""
    shapes, _ = value_types(model)
    sites = [s for s in find_sites(model, shapes) if s.rank is None or s.rank >= 2]
    names, axes = [s.name for s in sites], {s.name: s.axis for s in sites}
    tapped = onnx.ModelProto()
    tapped.CopyFrom(model)
    have = {o.name for o in tapped.graph.output}
    tapped.graph.output.extend(
        helper.make_empty_tensor_value_info(n) for n in names if n not in have
    )
    sess = ort.InferenceSession(tapped.SerializeToString(), providers=["CPUExecutionProvider"])
    values = sess.run(names, {sess.get_inputs()[0].name: x})
    return {
        n: v.max(axis=tuple(i for i in range(v.ndim) if i != axes[n] % v.ndim))
        for n, v in zip(names, values, strict=True)
    }


def random_bounds(model, x, *, seed=RNG_SEED, lo=0.3, hi=1.0) -> Bounds:
    """Each channel bounded at a random fraction in [lo, hi] of its max activation on x."""
    rng = np.random.default_rng(seed)
    maxima = channel_max(model, x)
    return Bounds(
        {k: np.maximum(v, 1e-3) * rng.uniform(lo, hi, v.shape) for k, v in maxima.items()}
    )


def fold_and_compare(model, bounds, x):
    """Fold, check the model, compare with the Min form; returns (folded, report)."""
    folded, report = apply_bounds(model, bounds, form="fold", report=True)
    onnx.checker.check_model(folded)
    reference = run(apply_bounds(model, bounds, form="min"), x)
    scale = max(float(np.abs(reference).max()), 1e-6)
    np.testing.assert_allclose(run(folded, x), reference, rtol=0, atol=1e-4 * scale)
    return folded, report


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def inits(model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


# --------------------------------------------------------------------------- sample models


@pytest.mark.parametrize("path", SAMPLES, ids=[p.parent.name for p in SAMPLES])
def test_sample_model_folded_matches_min_form(path):
    model = onnx.load(str(path))
    x = np.load(path.parent / "clean.npz")["x"].astype(np.float32)
    bounds = random_bounds(model, x)
    folded, report = fold_and_compare(model, bounds, x)
    assert len(report.sites) == len(bounds)
    assert ops(folded).count("Min") == report.count("min")
    if any(s.foldable for s in find_sites(model, value_types(model)[0])):
        assert report.count("fold") >= 1
    else:  # SiLU, GELU: no exact folding, every bound is a Min
        assert report.count("fold") == 0 and report.count("min") == len(bounds)


def sample(name):
    path = next(p for p in SAMPLES if p.parent.name == name)
    return onnx.load(str(path)), np.load(path.parent / "clean.npz")["x"].astype(np.float32)


def test_sample_cnn_folds_every_site_into_a_unit_clip_after_its_pool():
    model, x = sample("digits-cnn-badnet")
    folded, report = fold_and_compare(model, random_bounds(model, x), x)
    assert report.counts == {"fold": 3, "clip": 0, "min": 0}
    # Conv sites keep the Relu (fused inside the conv kernel) and clip the pooled tensor.
    assert ops(folded) == [
        "Conv", "Relu", "MaxPool", "HardSigmoid", "Conv", "Relu", "MaxPool", "HardSigmoid",
        "Flatten", "Gemm", "HardSigmoid", "Gemm",
    ]  # fmt: skip
    assert [bool(s.at) for s in report.sites] == [True, True, False]
    for node in folded.graph.node:
        if node.op_type == "HardSigmoid":
            assert {a.name: a.f for a in node.attribute} == {"alpha": 1.0, "beta": 0.0}
    counted = count_bounded_sites(folded)
    assert counted["fold"] == 3 and counted["sites"] == [s.site for s in report.sites]
    back = extract_bounds(folded)
    assert set(back) == {s.site for s in report.sites}


def optimized_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    """The node types onnxruntime runs after its (hardware-independent) fusions."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return ops(onnx.load(str(tmp_path / "optimized.onnx")))


@pytest.mark.parametrize("name", ["digits-cnn-badnet", "digits-mlp-badnet"])
def test_onnxruntime_fuses_every_folded_bound_not_moved_past_a_pool(name, tmp_path):
    # A Clip after a Gemm stays a node of its own in onnxruntime; the unit clip fuses.
    model, x = sample(name)
    folded, report = fold_and_compare(model, random_bounds(model, x), x)
    before, after = optimized_ops(model, tmp_path), optimized_ops(folded, tmp_path)
    moved = sum(bool(s.at) for s in report.sites)
    assert len(after) == len(before) + moved
    assert after.count("HardSigmoid") == moved
    assert not {"Clip", "Min", "Relu"} & set(after)


def test_a_folded_model_can_be_hardened_again(tmp_path):
    # Its unit clips are sites (ReLUs bounded at 1): bounds below 1 go onto them.
    model, x = sample("digits-cnn-badnet")
    folded, _ = fold_and_compare(model, random_bounds(model, x), x)
    sites = find_sites(folded, value_types(folded)[0])
    assert [s.op for s in sites] == ["Relu", "HardSigmoid"] * 2 + ["HardSigmoid"]
    engine = Engine(from_proto(folded))
    got = engine(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, run(folded, x), rtol=0, atol=1e-4)
    units = [s for s in sites if s.op == "HardSigmoid"]
    names = {s.name for s in units}
    again = Bounds({k: v for k, v in random_bounds(folded, x, lo=0.5, hi=0.9).items() if k in names})
    refolded, report = fold_and_compare(folded, again, x)
    assert report.count("min") == 0
    scalar = Bounds({s.name: np.float32(0.5) for s in units})
    clipped = apply_bounds(folded, scalar, form="min")
    assert ops(clipped).count("Clip") == 3 and "HardSigmoid" not in ops(clipped)
    assert np.abs(run(clipped, x) - run(folded, x)).max() > 0


# --------------------------------------------------------------------------- classic graphs


torch = pytest.importorskip("torch")
nn = torch.nn


def export(module, shape=(1, 3, 16, 16), *, fold_constants=True) -> onnx.ModelProto:
    module.eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, torch.zeros(shape), buf, dynamo=False, opset_version=13,
            input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
            do_constant_folding=fold_constants,
        )
    model = onnx.load_from_string(buf.getvalue())
    model.ir_version = min(model.ir_version, 8)
    return model


def randomise_bn(module, seed=0):
    """Eval-mode BatchNorm with non-trivial statistics, so folding BN into Conv matters."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.2, 0.2, generator=gen)
    return module


def conv_bn(cin, cout, k=3, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.a, self.b = conv_bn(cin, cout, stride=stride), conv_bn(cout, cout)
        self.skip = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))) + self.skip(x))


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 8), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 16, stride=2))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        y = nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1)
        return self.fc(torch.flatten(y, 1))


class DenseNetish(nn.Module):
    """Each layer reads the channel Concat of everything before it (post-activation)."""

    def __init__(self, growth=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Conv2d(8 + i * growth, growth, 3, padding=1) for i in range(3)
        )
        self.transition = nn.Conv2d(8 + 3 * growth, 8, 1)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        feats = torch.relu(self.stem(x))
        for layer in self.layers:
            feats = torch.cat([feats, torch.relu(layer(feats))], 1)
        y = nn.functional.avg_pool2d(torch.relu(self.transition(feats)), 2)
        return self.fc(torch.flatten(y, 1))


class Inceptionish(nn.Module):
    """Parallel 1x1, 1x1-3x3 and pool-1x1 branches of one input, concatenated."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1))
        self.b3 = nn.Conv2d(8, 2, 1)
        self.head = nn.Conv2d(12 + 8, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        y = torch.cat([
            torch.relu(self.b1(s)),
            torch.relu(self.b2(s)),
            torch.relu(self.b3(nn.functional.max_pool2d(s, 3, 1, 1))),
            nn.functional.max_pool2d(s, 3, 1, 1),
        ], 1)
        y = torch.relu(self.head(y))
        return self.fc(torch.flatten(nn.functional.adaptive_max_pool2d(y, 1), 1))


class TwoReaders(nn.Module):
    """A ReLU read by two convolutions, and a Conv output read by a ReLU and a Sigmoid."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(6, 4, 1), nn.Conv2d(6, 4, 3, padding=1)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        r = torch.relu(self.c0(x))
        a = self.c1(r) + self.c2(r)
        g = self.c3(a)
        y = torch.cat([torch.relu(g).mean((2, 3)), torch.sigmoid(g).mean((2, 3))], 1)
        return self.fc(y)


def inputs(shape=(12, 3, 16, 16), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, shape).astype(np.float32)


def test_resnet_blocks_fold_except_a_residual_site_with_unrelated_bounds():
    model, x = export(randomise_bn(ResNetish())), inputs()
    assert "BatchNormalization" not in ops(model)  # constant folding put BN into the convs
    _, report = fold_and_compare(model, random_bounds(model, x), x)
    # stem ReLU and the first block's output ReLU are tied by the identity skip
    assert report.count("min") == 1
    (fallback,) = report.fallbacks
    assert "residual Add" in fallback.reason
    assert report.count("fold") == len(report.sites) - 1


def test_residual_sites_with_proportional_bounds_all_fold():
    model, x = export(randomise_bn(ResNetish())), inputs()
    bounds = random_bounds(model, x)
    _, report = apply_bounds(model, bounds, report=True)
    (fallback,) = report.fallbacks
    tied = re.search(r"site '([^']+)'", fallback.reason).group(1)
    values = dict(bounds.values)
    values[fallback.site] = 2.5 * values[tied]
    folded, report = fold_and_compare(model, Bounds(values), x)
    assert report.counts["min"] == 0
    assert "Min" not in ops(folded)


def test_batchnorm_kept_by_the_exporter_absorbs_the_scale():
    class ConvBnNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(conv_bn(3, 8), nn.ReLU(), conv_bn(8, 8), nn.ReLU())
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    model, x = export(randomise_bn(ConvBnNet()), fold_constants=False), inputs()
    assert "BatchNormalization" in ops(model)
    _, report = fold_and_compare(model, random_bounds(model, x), x)
    assert report.counts == {"fold": 2, "clip": 0, "min": 0}


@pytest.mark.parametrize("net", [DenseNetish, Inceptionish], ids=["densenet", "inception"])
def test_channel_concat_graphs_fold_every_site(net):
    model, x = export(net()), inputs()
    assert "Concat" in ops(model)
    folded, report = fold_and_compare(model, random_bounds(model, x), x)
    assert report.count("min") == 0 and report.count("fold") == len(report.sites)
    assert "Min" not in ops(folded)


def test_relu_read_by_two_convs_folds_and_a_conv_read_by_sigmoid_does_not():
    model, x = export(TwoReaders()), inputs()
    _, report = fold_and_compare(model, random_bounds(model, x), x)
    (fallback,) = report.fallbacks
    assert "Sigmoid" in fallback.reason
    assert report.count("fold") == 1  # the ReLU read by two convolutions


def test_relu6_bound_folds_with_its_own_max():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU6(), nn.Conv2d(8, 4, 1), nn.ReLU6(),
                        nn.Flatten(), nn.Linear(4 * 16 * 16, 5))
    with torch.no_grad():
        net[0].weight.mul_(8.0)  # so that the ReLU6 max bites
    model, x = export(net), inputs()
    bounds = random_bounds(model, x, lo=0.5, hi=1.5)  # some bounds above 6: the max stays
    folded, report = fold_and_compare(model, bounds, x)
    assert report.count("fold") == 2


# --------------------------------------------------------------------------- graphs built by hand


def _init(name, arr):
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def pad_reshape_matmul_net(seed=0):
    """Conv -> Relu r1 -> Pad(0) -> MaxPool -> Mul(0.5) -> Reshape -> MatMul + Add(b) -> Relu r2
    -> MatMul: a scale carried through Pad, Reshape and a constant Mul, into a MatMul."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Pad", ["r1", "pads"], ["p1"], mode="constant"),
        helper.make_node("MaxPool", ["p1"], ["m1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Mul", ["half", "m1"], ["h1"]),
        helper.make_node("Reshape", ["h1", "shape"], ["f1"]),
        helper.make_node("MatMul", ["f1", "W2"], ["a2"]),
        helper.make_node("Add", ["a2", "b2"], ["s2"]),
        helper.make_node("Relu", ["s2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "W3"], ["y"]),
    ]
    init = [
        _init("W1", rng.normal(size=(4, 2, 3, 3))), _init("b1", rng.normal(size=4)),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        _init("half", 0.5), numpy_helper.from_array(np.array([0, -1], np.int64), "shape"),
        _init("W2", rng.normal(size=(4 * 4 * 4, 6))), _init("b2", rng.normal(size=6)),
        _init("W3", rng.normal(size=(6, 3))),
    ]
    return make_model(nodes, [_vi("x", ["N", 2, 6, 6])], [_vi("y", ["N", 3])], init)


def residual_add_net(*, skip_reads_site=False, seed=0):
    """Two convs summed, Relu r (the site, produced by an Add), then a Conv; with
    skip_reads_site the site is also added back after that conv (an identity skip)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "Wa", "ba"], ["ca"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "Wb", "bb"], ["cb"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["ca", "cb"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("Conv", ["r", "Wc", "bc"], ["cc"], pads=[1, 1, 1, 1]),
    ]
    last = "cc"
    if skip_reads_site:
        nodes.append(helper.make_node("Add", ["cc", "r"], ["res"]))
        last = "res"
    nodes += [
        helper.make_node("GlobalAveragePool", [last], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "Wd", "bd"], ["y"], transB=1),
    ]
    init = [
        _init("Wa", rng.normal(size=(4, 2, 3, 3))), _init("ba", rng.normal(size=4)),
        _init("Wb", rng.normal(size=(4, 2, 3, 3))), _init("bb", rng.normal(size=4)),
        _init("Wc", rng.normal(size=(4, 4, 3, 3))), _init("bc", rng.normal(size=4)),
        _init("Wd", rng.normal(size=(3, 4))), _init("bd", rng.normal(size=3)),
    ]
    return make_model(nodes, [_vi("x", ["N", 2, 6, 6])], [_vi("y", ["N", 3])], init)


X6 = np.random.default_rng(2).normal(size=(10, 2, 6, 6)).astype(np.float32) * 2


def test_scale_rides_through_pad_reshape_and_constant_mul_into_matmul():
    model = pad_reshape_matmul_net()
    bounds = Bounds({"r1": [0.5, 1.5, 0.2, 3.0], "r2": np.linspace(0.5, 3.0, 6)})
    folded, report = fold_and_compare(model, bounds, X6)
    assert report.counts == {"fold": 2, "clip": 0, "min": 0}
    assert inits(folded)["half"] == np.float32(0.5)  # a constant factor needs no change


def test_dead_channel_zeroes_the_producer_row():
    bounds = Bounds({"r1": [0.5, 0.0, 1.0, 0.2]})
    folded, report = fold_and_compare(conv_net(), bounds, X6)
    assert report["r1"].form == "fold" and report["r1"].dead == 1
    w1 = inits(folded)["W1"]
    assert np.all(w1[1] == 0) and np.all(inits(folded)["b1"][1] == 0)


def test_dead_channel_of_an_add_site_zeroes_the_consumer_columns():
    bounds = Bounds({"r": [0.8, 0.0, 1.3, 0.4]})
    folded, report = fold_and_compare(residual_add_net(), bounds, X6)
    assert report["r"].form == "fold" and report["r"].dead == 1
    assert np.all(inits(folded)["Wc"][:, 1] == 0)


def test_dead_channel_reaching_a_conv_by_two_concat_paths_is_zeroed_on_both():
    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "Wa", "ba"], ["ca"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "Wb", "bb"], ["cb"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["ca", "cb"], ["s"]),
        helper.make_node("Relu", ["s"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["r", "p"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "Wc"], ["y"]),
    ]
    init = [
        _init("Wa", rng.normal(size=(3, 2, 3, 3))), _init("ba", rng.normal(size=3)),
        _init("Wb", rng.normal(size=(3, 2, 3, 3))), _init("bb", rng.normal(size=3)),
        _init("Wc", rng.normal(size=(2, 6, 1, 1))),
    ]
    model = make_model(nodes, [_vi("x", ["N", 2, 6, 6])], [_vi("y", ["N", 2, 6, 6])], init)
    folded, report = fold_and_compare(model, Bounds({"r": [0.0, 1.5, 0.5]}), X6)
    assert report["r"].form == "fold" and report["r"].dead == 1
    assert np.all(inits(folded)["Wc"][:, [0, 3]] == 0)


def test_dead_channel_that_flows_into_a_residual_add_falls_back_to_min():
    bounds = Bounds({"r": [0.8, 0.0, 1.3, 0.4]})
    _, report = fold_and_compare(residual_add_net(skip_reads_site=True), bounds, X6)
    assert report["r"].form == "min"
    assert "dead channel" in report["r"].reason and "Add" in report["r"].reason


def test_all_zero_bounds_fold_to_a_clip_of_zero_width():
    bounds = Bounds({"r1": np.zeros(4), "r3": np.zeros(5)})
    folded, report = fold_and_compare(conv_net(), bounds, X6)
    assert report.count("min") == 0 and report["r1"].dead == 4
    np.testing.assert_array_equal(run(folded, X6), run(conv_net(caps=bounds.values), X6))


def test_per_channel_bound_on_a_graph_output_stays_a_min():
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c"]),
        helper.make_node("Relu", ["c"], ["r"]),
    ]
    init = [_init("W", np.ones((3, 2, 1, 1))), _init("b", [0.0, 0.5, 1.0])]
    model = make_model(nodes, [_vi("x", ["N", 2, 4, 4])], [_vi("r", ["N", 3, 4, 4])], init)
    _, report = fold_and_compare(model, Bounds({"r": [0.5, 1.0, 2.0]}), X6[:, :, :4, :4])
    assert report["r"].form == "min" and "graph output 'r'" in report["r"].reason


def test_scalar_bounds_are_the_same_clips_in_every_form():
    caps = Bounds({"r1": 0.4, "r2": 0.3, "r3": 0.2})
    folded, report = fold_and_compare(conv_net(), caps, X6)
    assert report.counts == {"fold": 0, "clip": 3, "min": 0}
    assert ops(folded) == ops(apply_bounds(conv_net(), caps, form="min"))
    assert METADATA_KEY not in {p.key for p in folded.metadata_props}


def test_weights_shared_by_two_convs_are_copied_not_changed():
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["x", "W", "b"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["r1", "c2"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["y"]),
    ]
    init = [_init("W", rng.normal(size=(2, 2, 3, 3))), _init("b", rng.normal(size=2))]
    model = make_model(nodes, [_vi("x", ["N", 2, 6, 6])], [_vi("y", ["N", 2, 1, 1])], init)
    folded, _ = fold_and_compare(model, Bounds({"r1": [0.5, 2.0]}), X6)
    np.testing.assert_array_equal(inits(folded)["W"], inits(model)["W"])


def test_opset9_ir3_model_folds_and_lists_its_initializers_as_inputs():
    model = conv_net(opset=9, ir=IR_OLD)
    bounds = Bounds({"r1": [0.5, 0.3, 1.0, 0.2], "r3": [0.3, 0.5, 0.2, 0.4, 0.1]})
    folded, report = fold_and_compare(model, bounds, X6)
    assert report.count("fold") == 2 and folded.ir_version == IR_OLD
    assert {i.name for i in folded.graph.initializer} <= {i.name for i in folded.graph.input}


# --------------------------------------------------------------------------- API and read-back


def test_folded_model_records_its_bounds_forms_and_scales():
    bounds = Bounds({"r1": [0.5, 0.3, 1.0, 0.2], "r2": 0.3, "r3": [0.3, 0.5, 0.2, 0.4, 0.1]})
    folded = apply_bounds(conv_net(), bounds)
    meta = read_fold_metadata(folded)
    assert meta["forms"] == {"r1": "fold", "r2": "clip", "r3": "fold"}
    np.testing.assert_allclose(meta["scales"]["r1"], bounds["r1"])
    assert json.loads(next(p.value for p in folded.metadata_props if p.key == METADATA_KEY))
    back = extract_bounds(folded)
    for k, v in bounds.items():
        np.testing.assert_allclose(back[k], v)
    counts = count_bounded_sites(folded)
    assert (counts["total"], counts["fold"], counts["clip"], counts["min"]) == (3, 2, 1, 0)


def test_fold_bounds_returns_the_report_and_leaves_the_input_alone():
    model = conv_net()
    before = model.SerializeToString()
    folded, report = fold_bounds(model, Bounds({"r1": [0.5, 0.3, 1.0, 0.2]}))
    assert model.SerializeToString() == before
    assert [s.site for s in report.sites] == ["r1"]
    assert report.lines() == ["fold  r1"]


def test_min_form_report_names_every_site():
    _, report = apply_bounds(conv_net(), Bounds({"r1": [0.5, 0.3, 1.0, 0.2], "r2": 0.3}),
                             form="min", report=True)
    assert [(s.site, s.form) for s in report.sites] == [("r1", "min"), ("r2", "clip")]


def test_unknown_form_is_an_error():
    with pytest.raises(MmexportError, match="form 'fast'"):
        apply_bounds(conv_net(), Bounds({}), form="fast")


def test_unknown_site_is_an_error_in_the_folded_form_too():
    with pytest.raises(MmexportError, match="'c1' is not a site"):
        apply_bounds(conv_net(), Bounds({"c1": 1.0}), form="fold")
