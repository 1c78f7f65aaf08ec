"""Sites beyond ReLU: every activation unbounded above is found, bounded and written back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from builders import assert_one_line_error, identity_classifier, make_model, ort_run
from builders import run_cli as run
from builders_modern import export
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import mmexport
from mmexport.core.bounds import Bounds
from mmexport.core.errors import MmexportError
from mmexport.core.model import from_proto
from mmexport.core.sites import FOLDABLE, NO_SITES
from mmexport.defences.common.checks import with_site_shapes
from mmexport.defences.common.search import initial_bounds
from mmexport.defences.mmdf.graph import DETECTED, SCORE, build_mmdf_graph
from mmexport.defences.mmdf.null import margin_gap
from mmexport.engine.executor import Engine
from mmexport.graph.rewrite import apply_bounds, count_bounded_sites, extract_bounds

torch.set_num_threads(1)
N = helper.make_node
SQRT2 = math.sqrt(2.0)


# --------------------------------------------------------------------------- graphs by hand


def _activation_model(nodes, inits=None, *, opset=13, out="act"):
    """x [N, 4] -> MatMul -> Add (bias) -> `nodes` (reading "a", writing `out`) -> MatMul."""
    rng = np.random.default_rng(0)
    values = {"w": rng.standard_normal((4, 4)), "b": rng.standard_normal(4),
              "v": rng.standard_normal((4, 3))}
    values.update(inits or {})
    init = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in values.items()]
    graph_nodes = [N("MatMul", ["x", "w"], ["mm"]), N("Add", ["mm", "b"], ["a"]), *nodes,
                   N("MatMul", [out, "v"], ["logits"])]
    return make_model(graph_nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
                      init, opset=opset)


def _kinds(proto) -> list[tuple[str, str, str]]:
    return [(s.kind, s.name, s.input) for s in from_proto(proto).sites]


def _constant(name, value):
    return N("Constant", [], [name], value=numpy_helper.from_array(np.array(value, np.float32)))


HAND_WRITTEN = {
    "silu x*sigmoid": ("silu", [N("Sigmoid", ["a"], ["s"]), N("Mul", ["a", "s"], ["act"])], {}),
    "silu sigmoid*x": ("silu", [N("Sigmoid", ["a"], ["s"]), N("Mul", ["s", "a"], ["act"])], {}),
    "swish beta 1.702": ("swish", [N("Mul", ["k", "a"], ["ka"]), N("Sigmoid", ["ka"], ["s"]),
                                   N("Mul", ["s", "a"], ["act"])], {"k": 1.702}),
    "gelu erf, torch order": ("gelu", [
        N("Div", ["a", "sqrt2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["p"]),
        N("Mul", ["a", "p"], ["m"]), N("Mul", ["m", "half"], ["act"]),
    ], {"sqrt2": SQRT2, "one": 1.0, "half": 0.5}),
    "gelu erf, half first, Mul by 1/sqrt2, Constant nodes": ("gelu", [
        _constant("c1", 1 / SQRT2), _constant("c2", 1.0), _constant("c3", 0.5),
        N("Mul", ["c1", "a"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["c2", "e"], ["p"]),
        N("Mul", ["c3", "a"], ["h"]), N("Mul", ["p", "h"], ["act"]),
    ], {}),
    "gelu erf, expanded 0.5x + 0.5x*erf": ("gelu", [
        N("Mul", ["a", "isqrt2"], ["d"]), N("Erf", ["d"], ["e"]), N("Mul", ["a", "half"], ["h"]),
        N("Mul", ["h", "e"], ["he"]), N("Add", ["he", "h"], ["act"]),
    ], {"isqrt2": 1 / SQRT2, "half": 0.5}),
    "gelu tanh, Pow (tf2onnx)": ("gelu", [
        N("Pow", ["a", "three"], ["c"]), N("Mul", ["k3", "c"], ["kc"]), N("Add", ["a", "kc"], ["s"]),
        N("Mul", ["k1", "s"], ["u"]), N("Tanh", ["u"], ["t"]), N("Add", ["one", "t"], ["p"]),
        N("Mul", ["half", "a"], ["h"]), N("Mul", ["h", "p"], ["act"]),
    ], {"three": 3.0, "k3": 0.044715, "k1": math.sqrt(2 / math.pi), "one": 1.0, "half": 0.5}),
    "gelu tanh, x*x*x distributed": ("gelu", [
        N("Mul", ["a", "a"], ["sq"]), N("Mul", ["sq", "a"], ["c"]), N("Mul", ["c", "k3"], ["kc"]),
        N("Mul", ["a", "k1"], ["ka"]), N("Add", ["kc", "ka"], ["u"]), N("Tanh", ["u"], ["t"]),
        N("Add", ["t", "one"], ["p"]), N("Mul", ["p", "a"], ["m"]), N("Div", ["m", "two"], ["act"]),
    ], {"k3": 0.044715 * math.sqrt(2 / math.pi), "k1": math.sqrt(2 / math.pi), "one": 1.0,
        "two": 2.0}),
    "hard_swish x*hardsigmoid": ("hard_swish", [
        N("HardSigmoid", ["a"], ["hs"], alpha=1 / 6, beta=0.5), N("Mul", ["a", "hs"], ["act"]),
    ], {}),
    "hard_swish x*relu6(x+3)/6": ("hard_swish", [
        N("Add", ["a", "three"], ["s"]), N("Clip", ["s", "zero", "six"], ["r"]),
        N("Mul", ["a", "r"], ["m"]), N("Div", ["m", "six"], ["act"]),
    ], {"three": 3.0, "zero": 0.0, "six": 6.0}),
    "mish": ("mish", [N("Softplus", ["a"], ["sp"]), N("Tanh", ["sp"], ["t"]),
                      N("Mul", ["t", "a"], ["act"])], {}),
    "mish, softplus as log(1+exp)": ("mish", [
        N("Exp", ["a"], ["ex"]), N("Add", ["one", "ex"], ["p"]), N("Log", ["p"], ["sp"]),
        N("Tanh", ["sp"], ["t"]), N("Mul", ["a", "t"], ["act"])], {"one": 1.0}),
}


@pytest.mark.parametrize("case", list(HAND_WRITTEN))
def test_a_decomposed_activation_is_one_site_at_its_last_node_whatever_the_order(case):
    kind, nodes, inits = HAND_WRITTEN[case]
    assert _kinds(_activation_model(nodes, inits)) == [(kind, "act", "a")]


def test_a_decomposed_site_runs_as_onnxruntime_and_its_bound_clips_it():
    kind, nodes, inits = HAND_WRITTEN["gelu tanh, Pow (tf2onnx)"]
    proto = _activation_model(nodes, inits)
    x = np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32)
    ref = ort_run(proto, x, extra=("act", "a"))
    a = torch.from_numpy(ref["a"]).double()
    gelu = torch.nn.functional.gelu(a, approximate="tanh").numpy()
    np.testing.assert_allclose(ref["act"], gelu, atol=1e-5)
    engine = Engine(from_proto(proto))
    _, rec = engine.run(torch.from_numpy(x), {"act": torch.tensor(0.3)}, record=["act"])
    np.testing.assert_allclose(rec["act"].numpy(), np.minimum(gelu, 0.3), atol=1e-5)


@pytest.mark.parametrize("nodes, inits", [
    # a gate: x * sigmoid(y), y another tensor (squeeze-and-excite)
    ([N("MatMul", ["a", "w"], ["g"]), N("Sigmoid", ["g"], ["s"]), N("Mul", ["a", "s"], ["act"])], {}),
    # x * tanh(x) and x * erf(x / 2): not an activation of the list
    ([N("Tanh", ["a"], ["t"]), N("Mul", ["a", "t"], ["act"])], {}),
    ([N("Div", ["a", "two"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["p"]),
      N("Mul", ["a", "p"], ["m"]), N("Mul", ["m", "half"], ["act"])], {"two": 2.0, "one": 1.0,
                                                                      "half": 0.5}),
    # bounded activations
    ([N("Sigmoid", ["a"], ["act"])], {}),
    ([N("Tanh", ["a"], ["act"])], {}),
    ([N("Clip", ["a", "lo", "hi"], ["act"])], {"lo": -1.0, "hi": 1.0}),
], ids=["gate", "x*tanh(x)", "erf(x/2)", "sigmoid", "tanh", "hardtanh"])
def test_lookalikes_and_bounded_activations_are_no_sites(nodes, inits):
    assert _kinds(_activation_model(nodes, inits)) == []


def test_the_inner_nodes_of_a_pattern_are_no_sites_of_their_own():
    """The Softplus of a Mish and the Clip of x * relu6(x + 3) / 6 are inside an activation."""
    for case in ("mish", "hard_swish x*relu6(x+3)/6"):
        _, nodes, inits = HAND_WRITTEN[case]
        assert [k for k, _, _ in _kinds(_activation_model(nodes, inits))] == [HAND_WRITTEN[case][0]]


def test_single_op_activations_are_sites_with_their_kind():
    ops = [("LeakyRelu", {"alpha": 0.1}, "leaky_relu"), ("Elu", {}, "elu"), ("Celu", {}, "celu"),
           ("Selu", {}, "selu"), ("Softplus", {}, "softplus"), ("ThresholdedRelu", {}, "thresholded_relu"),
           ("HardSwish", {}, "hard_swish"), ("Mish", {}, "mish"), ("Relu", {}, "relu")]
    nodes, t = [], "a"
    for i, (op, attrs, _) in enumerate(ops):
        nodes.append(N(op, [t], [f"y{i}"], **attrs))
        t = f"y{i}"
    nodes.append(N("Identity", [t], ["act"]))
    proto = _activation_model(nodes, opset=18)
    assert [k for k, _, _ in _kinds(proto)] == [kind for _, _, kind in ops]


SINGLE_OPS = {
    "celu": ("Celu", {"alpha": 0.7}, 13), "thresholded_relu": ("ThresholdedRelu", {"alpha": 0.3}, 13),
    "hard_swish": ("HardSwish", {}, 14), "mish": ("Mish", {}, 18), "gelu": ("Gelu", {}, 20),
    "elu": ("Elu", {}, 13), "selu": ("Selu", {}, 13), "softplus": ("Softplus", {}, 13),
}  # fmt: skip


def _hand_models():
    for case, (_, nodes, inits) in HAND_WRITTEN.items():
        yield case, _activation_model(nodes, inits)
    for kind, (op, attrs, opset) in SINGLE_OPS.items():
        yield kind, _activation_model([N(op, ["a"], ["act"], **attrs)], opset=opset)


@pytest.mark.parametrize("form", ["min", "auto"])
@pytest.mark.parametrize("case", [c for c, _ in _hand_models()])
def test_every_kind_bounded_in_the_engine_runs_so_in_onnxruntime(case, form):
    proto = dict(_hand_models())[case]
    model = from_proto(proto)
    x = np.random.default_rng(2).standard_normal((32, 4)).astype(np.float32)
    for bounds in (_half_bounds(model, x), _half_bounds(model, x, "layer")):
        with torch.no_grad():
            want = Engine(model)(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in bounds.items()})
        out = apply_bounds(proto, bounds, form=form)
        np.testing.assert_allclose(ort_run(out, x)["logits"], want.numpy(), atol=1e-5, rtol=1e-4)
        assert np.abs(want.numpy() - ort_run(proto, x)["logits"]).max() > 1e-4  # they act


def test_graphs_onnxruntime_optimised_keep_their_sites(tmp_path):
    """onnxruntime's basic optimisation folds constants into initializers and drops Identity
    nodes: the decomposed activations are still found, at their last node."""
    import onnxruntime as ort

    torch.manual_seed(0)
    net = _Net(nn.GELU(approximate="tanh"), nn.Mish()).eval()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "basic.onnx")
    proto = export(net, (1, 6, 6), opset=13, dynamic=True)
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(str(tmp_path / "basic.onnx"))
    assert not any(n.op_type == "Constant" for n in optimised.graph.node)
    assert [s.kind for s in from_proto(optimised).sites] == ["gelu", "mish"]


# --------------------------------------------------------------------------- torch exports


class _Net(nn.Module):
    """conv 3x3 (1 -> 4) -> act -> conv 1x1 (4 -> 4) -> act2 -> flatten -> fc (64 -> 3)."""

    def __init__(self, act: nn.Module, act2: nn.Module | None = None):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = act
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.act2 = act2 if act2 is not None else nn.Identity()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act(self.conv(x)))).flatten(1))


TORCH_ACTS = {
    "silu": (nn.SiLU, "silu"),
    "gelu": (nn.GELU, "gelu"),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), "gelu"),
    "mish": (nn.Mish, "mish"),
    "hardswish": (nn.Hardswish, "hard_swish"),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), "leaky_relu"),
    "prelu": (lambda: nn.PReLU(4, init=0.2), "prelu"),
    "elu": (nn.ELU, "elu"),
    "selu": (nn.SELU, "selu"),
    "softplus": (nn.Softplus, "softplus"),
}


def _exported(name: str, opset: int = 13, seed: int = 0) -> onnx.ModelProto:
    factory, _ = TORCH_ACTS[name]
    torch.manual_seed(seed)
    net = _Net(factory(), factory()).eval()
    return export(net, (1, 6, 6), opset=opset, dynamic=True)


def _inputs(n=24, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 1, (n, 1, 6, 6)).astype(np.float32)


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("name", list(TORCH_ACTS))
def test_torch_exports_have_one_site_per_activation(name, opset):
    sites = from_proto(_exported(name, opset)).sites
    assert [s.kind for s in sites] == [TORCH_ACTS[name][1]] * 2
    assert [s.channels for s in sites] == [4, 4]


def test_the_opset_20_gelu_op_is_a_site():
    sites = from_proto(export(_Net(nn.GELU()).eval(), (1, 6, 6), opset=20, dynamic=True)).sites
    assert [(s.kind, s.op) for s in sites] == [("gelu", "Gelu")]


def _half_bounds(model, x, granularity="channel") -> Bounds:
    z0 = initial_bounds(Engine(model), torch.from_numpy(x), granularity)
    return Bounds({k: 0.5 * v.numpy() for k, v in z0.items()})


@pytest.mark.parametrize("form", ["min", "auto"])
@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("name", list(TORCH_ACTS))
def test_engine_with_bounds_equals_onnxruntime_on_the_rewritten_graph(name, granularity, form):
    model = from_proto(_exported(name))
    x = _inputs()
    bounds = _half_bounds(model, x, granularity)
    with torch.no_grad():
        want = Engine(model)(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in bounds.items()})
    out, report = apply_bounds(model.proto, bounds, form=form, report=True)
    got = ort_run(out, x)["logits"]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-4)
    assert np.abs(got - ort_run(model.proto, x)["logits"]).max() > 1e-3  # the bounds act
    back = extract_bounds(out)
    assert set(back) == set(bounds)
    for k, v in bounds.items():
        np.testing.assert_allclose(back[k], v, rtol=1e-6)
    assert count_bounded_sites(out)["total"] == 2


@pytest.mark.parametrize("name", list(TORCH_ACTS))
def test_bounds_fold_exactly_where_the_activation_is_positively_homogeneous(name):
    model = from_proto(_exported(name))
    kind = TORCH_ACTS[name][1]
    bounds = _half_bounds(model, _inputs())  # no channel at 0 (see the test below)
    bounds = Bounds({k: np.maximum(v, 0.05) for k, v in bounds.items()})
    out, report = apply_bounds(model.proto, bounds, report=True)
    x = _inputs()
    with torch.no_grad():
        want = Engine(model)(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in bounds.items()})
    np.testing.assert_allclose(ort_run(out, x)["logits"], want.numpy(), atol=1e-5, rtol=1e-4)
    if kind in FOLDABLE:
        assert [s.form for s in report.sites] == ["fold", "fold"]
        assert count_bounded_sites(out)["fold"] == 2
    else:
        assert [s.form for s in report.sites] == ["min", "min"]
        assert all(f"a {kind} site" in s.reason for s in report.sites)
        assert count_bounded_sites(out)["min"] == 2


def test_a_leaky_relu_channel_bounded_at_zero_keeps_its_min():
    """min(leaky(a), 0) passes the negative part: no zeroed weight gives it."""
    model = from_proto(_exported("leaky_relu"))
    x = _inputs()
    bounds = _half_bounds(model, x)
    first = model.sites[0].name
    bounds = Bounds({**bounds.values, first: np.array([0.0, *bounds[first][1:]], np.float32)})
    out, report = apply_bounds(model.proto, bounds, report=True)
    assert report[first].form == "min" and "bounded at 0" in report[first].reason
    with torch.no_grad():
        want = Engine(model)(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in bounds.items()})
    np.testing.assert_allclose(ort_run(out, x)["logits"], want.numpy(), atol=1e-5, rtol=1e-4)


def test_bounds_of_a_dead_gelu_channel_start_at_zero_not_below_its_values():
    model = from_proto(_exported("gelu"))
    engine = Engine(model)
    x = torch.from_numpy(_inputs())
    _, acts = engine.run(x, record=[s.name for s in model.sites])
    z0 = initial_bounds(engine, x, "channel")
    for name, a in acts.items():
        top = a.transpose(0, 1).reshape(a.shape[1], -1).max(dim=1).values
        assert torch.equal(z0[name], top.clamp_min(0))
    # a channel whose clean values all lie below 0 keeps them under its bound of 0
    with torch.no_grad():
        engine.constants()["conv.bias"][0] = -50.0
    z0 = initial_bounds(engine, x, "channel")
    assert z0[model.sites[0].name][0] == 0.0
    _, rec = engine.run(x, {k: v for k, v in z0.items()}, record=[model.sites[0].name])
    _, raw = engine.run(x, record=[model.sites[0].name])
    assert torch.equal(rec[model.sites[0].name][:, 0], raw[model.sites[0].name][:, 0])


# --------------------------------------------------------------------------- MMDF, errors, inspect


def test_mmdf_graph_on_silu_and_gelu_sites_runs_under_onnxruntime():
    torch.manual_seed(0)
    proto = export(_Net(nn.SiLU(), nn.GELU()).eval(), (1, 6, 6), opset=13, dynamic=True)
    model = from_proto(proto)
    x = _inputs(32)
    bounds = _half_bounds(model, x)
    out = ort_run(build_mmdf_graph(proto, bounds, threshold=0.0), x)
    engine = Engine(model)
    with torch.no_grad():
        logits = engine(torch.from_numpy(x)).numpy()
        bounded = engine(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in bounds.items()})
    # the score is the margin gap d: the original class's margin lost to the bounds
    np.testing.assert_allclose(out[SCORE], margin_gap(logits, bounded.numpy()), atol=1e-4)
    assert out[DETECTED].any()


def test_harden_and_detect_refuse_a_model_without_sites_in_one_line(tmp_path):
    x = np.eye(3, dtype=np.float32).repeat(4, axis=0)
    with pytest.raises(MmexportError, match="no clipping sites: no activation unbounded above") as err:
        mmexport.harden(identity_classifier(), (x, x.argmax(1)))
    assert "\n" not in str(err.value) and "LeakyRelu" in str(err.value)
    with pytest.raises(MmexportError, match="no clipping sites"):
        mmexport.detect(identity_classifier(), (x, x.argmax(1)))


def test_inspect_lists_each_sites_kind_and_says_when_there_is_none(tmp_path):
    import json

    path = tmp_path / "silu.onnx"
    onnx.save(_exported("silu"), path)
    res = run("inspect", path, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert [s["kind"] for s in info["sites"]] == ["silu", "silu"]
    assert "no_sites" not in info
    text = run("inspect", path)
    assert "2 clipping sites (2 silu)" in text.output
    empty = tmp_path / "none.onnx"
    onnx.save(identity_classifier(), empty)
    text = run("inspect", empty)
    assert text.exit_code == 0 and NO_SITES.split(" (")[0] in text.output
    assert_one_line_error(run("harden", empty, "--data", _npz(tmp_path), "-q"), "no clipping sites")


def _npz(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.eye(3, dtype=np.float32), y=np.arange(3))
    return path


class _Tokens(nn.Module):
    """Patches as tokens [N, 9, 8], a GELU MLP on each token, mean over tokens, a head; with
    `channels_first` the GELU runs on the patch embedding as [N, 8, 9] instead. torch writes
    the patch flattening as a Reshape whose shape is computed at run time."""

    def __init__(self, channels_first: bool = False):
        super().__init__()
        self.channels_first = channels_first
        self.embed = nn.Conv2d(1, 8, 2, stride=2)
        self.fc = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        seq = self.embed(x).flatten(2)
        if self.channels_first:
            return self.head(self.fc(self.act(seq).mean(2)))
        return self.head(self.act(self.fc(seq.transpose(1, 2))).mean(1))


def _tokens(channels_first: bool = False) -> onnx.ModelProto:
    torch.manual_seed(0)
    return export(_Tokens(channels_first).eval(), (1, 6, 6), opset=13, dynamic=True)


def test_a_transformer_mlp_site_has_its_channels_on_the_last_axis():
    """Token features [N, T, C] read from a MatMul: one bound per feature, shared by every
    token, as a conv channel's is by every position (not one per token)."""
    proto = _tokens()
    x = _inputs(8)
    model = with_site_shapes(from_proto(proto), x)
    assert [(s.kind, s.axis, s.rank, s.channels) for s in model.sites] == [("gelu", -1, 3, 16)]
    bounds = _half_bounds(model, x)
    assert bounds[model.sites[0].name].shape == (16,)
    engine = Engine(model)
    with torch.no_grad():
        want = engine(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in bounds.items()})
        _, acts = engine.run(torch.from_numpy(x), record=[model.sites[0].name])
    top = acts[model.sites[0].name].amax(dim=(0, 1)).numpy()
    np.testing.assert_allclose(bounds[model.sites[0].name], 0.5 * np.maximum(top, 0), rtol=1e-6)
    for form in ("auto", "min"):
        out, report = apply_bounds(proto, bounds, sites=model.sites, form=form, report=True)
        np.testing.assert_allclose(ort_run(out, x)["logits"], want.numpy(), atol=1e-5, rtol=1e-4)
        assert report.sites[0].form == "min"
    mmdf = build_mmdf_graph(proto, bounds, threshold=0.0, sites=model.sites)
    np.testing.assert_allclose(ort_run(mmdf, x)[SCORE],
                               margin_gap(ort_run(proto, x)["logits"], want.numpy()), atol=1e-4)


def test_sites_that_shape_inference_misses_get_their_rank_from_one_run():
    """Bounds on axis 1 need the site's rank to be written; a harden or detect run reads what
    ONNX shape inference could not tell from one onnxruntime pass."""
    proto = _tokens(channels_first=True)
    model = from_proto(proto)
    assert [(s.kind, s.axis, s.rank) for s in model.sites] == [("gelu", 1, None)]
    x = _inputs(8)
    shaped = with_site_shapes(model, x)
    assert [(s.rank, s.channels) for s in shaped.sites] == [(3, 8)]
    bounds = _half_bounds(shaped, x)
    with pytest.raises(MmexportError, match="rank unknown"):
        apply_bounds(proto, bounds)
    with torch.no_grad():
        want = Engine(shaped)(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in bounds.items()})
    for form in ("auto", "min"):
        out = apply_bounds(proto, bounds, sites=shaped.sites, form=form)
        np.testing.assert_allclose(ort_run(out, x)["logits"], want.numpy(), atol=1e-5, rtol=1e-4)


def test_apply_writes_per_channel_bounds_on_sites_of_unknown_rank(tmp_path):
    proto = _tokens(channels_first=True)
    path, bounds_path, out = tmp_path / "seq.onnx", tmp_path / "b.bounds.json", tmp_path / "o.onnx"
    onnx.save(proto, path)
    site = from_proto(proto).sites[0].name
    bounds_path.write_text(Bounds({site: np.full(8, 0.05, np.float32)}).dumps())
    res = run("apply", path, bounds_path, "-o", out)
    assert res.exit_code == 0, res.output
    assert "min" in res.output and "a gelu site" in res.output
    np.testing.assert_allclose(extract_bounds(onnx.load(out))[site], np.full(8, 0.05))


# --------------------------------------------------------------------------- the samples

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def _sample(name):
    d = SAMPLES / name
    return (d, mmexport.load_npz(d / "test.npz"), mmexport.load_npz(d / "attack.npz", attack=True))


def test_harden_on_the_silu_sample_bounds_its_sites_and_keeps_accuracy():
    d, test, attack = _sample("digits-silu-cnn")
    res = mmexport.harden(d / "model.onnx", d / "clean.npz", device="cpu", unlearn="off",
                          max_epochs=12, restarts=4)
    assert res.report.site_forms["counts"] == {"fold": 0, "clip": 0, "min": 3}
    before = mmexport.validate(str(d / "model.onnx"), test, attack=attack, provider="cpu")
    after = mmexport.validate(res.model, test, attack=attack, provider="cpu")
    z0 = initial_bounds(Engine(mmexport.load_model(d / "model.onnx")),
                        torch.from_numpy(np.load(d / "clean.npz")["x"]), "channel")
    assert any(bool((torch.from_numpy(v) < 0.999 * z0[k]).any()) for k, v in res.bounds.items())
    assert after.asr < before.asr  # the bounds act
    assert before.accuracy - after.accuracy <= 0.02, (before.accuracy, after.accuracy)


def test_scan_on_the_gelu_sample_names_its_target():
    d = SAMPLES / "digits-gelu-cnn"
    res = mmexport.scan(d / "model.onnx", d / "clean.npz", device="cpu")
    assert (res.verdict, res.target_class) == ("backdoor", 0)


def test_detect_on_the_vit_flags_triggered_inputs_and_few_clean_ones():
    d, test, attack = _sample("digits-vit")
    res = mmexport.detect(d / "model.onnx", d / "clean.npz", device="cpu")
    report = mmexport.validate(res.model, test, attack=attack, provider="cpu")
    assert report.false_positive_rate <= 0.01, report.false_positive_rate
    assert report.detection_rate >= 0.8, report.detection_rate
