"""Sites: bounds clip ReLU outputs to min(relu(a), z), and `record` returns what was bounded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import make_onnx_model, ort_run
from onnx import helper

from mmexport.core.errors import MmexportError
from mmexport.core.model import from_proto
from mmexport.engine.executor import Engine

N = helper.make_node
C = 4


def _weights():
    rng = np.random.default_rng(3)
    return {
        "w": rng.standard_normal((C, 3, 1, 1)).astype(np.float32),
        "b": rng.standard_normal(C).astype(np.float32),
        "six": np.float32(6.0),
        "zero": np.float32(0.0),
        "fw": rng.standard_normal((5, C * 16)).astype(np.float32) * 0.3,
        "fb": rng.standard_normal(5).astype(np.float32),
        "gw": rng.standard_normal((3, 5)).astype(np.float32),
    }


def _nodes():
    """1x1 Conv -> Relu (site r1) -> Clip 0..6 (ReLU6 site r6) -> Gemm -> Relu (r2) -> Gemm."""
    return [
        N("Conv", ["x", "w", "b"], ["conv"], name="conv"),
        N("Relu", ["conv"], ["r1"], name="relu1"),
        N("Clip", ["r1", "zero", "six"], ["r6"], name="relu6"),
        N("Flatten", ["r6"], ["flat"]),
        N("Gemm", ["flat", "fw", "fb"], ["fc"], transB=1),
        N("Relu", ["fc"], ["r2"], name="relu2"),
        N("Gemm", ["r2", "gw"], ["logits"], transB=1),
    ]


@pytest.fixture(scope="module")
def proto():
    return make_onnx_model(_nodes(), (None, 3, 4, 4), outputs=("logits",), inits=_weights())


@pytest.fixture(scope="module")
def engine(proto):
    return Engine(from_proto(proto))


@pytest.fixture(scope="module")
def x():
    return torch.from_numpy(np.random.default_rng(4).random((6, 3, 4, 4)).astype(np.float32))


def _relu_conv(x):
    w = _weights()
    a = np.einsum("nchw,mc->nmhw", x.numpy(), w["w"][:, :, 0, 0]) + w["b"][None, :, None, None]
    return np.maximum(a, 0.0)


def test_sites_are_the_relu_and_relu6_outputs(engine):
    assert [s.name for s in engine.sites] == ["r1", "r6", "r2"]


def test_no_bounds_equals_onnxruntime(engine, proto, x):
    want = ort_run(proto, x.numpy())["logits"]
    np.testing.assert_allclose(engine(x).numpy(), want, atol=1e-5)
    np.testing.assert_allclose(engine(x, {}).numpy(), want, atol=1e-5)


def test_per_channel_bound_gives_min_of_relu_and_z(engine, x):
    z = torch.tensor([0.1, 0.5, 1.0, 100.0])
    _, rec = engine.run(x, {"r1": z}, record=["r1"])
    want = np.minimum(_relu_conv(x), z.numpy()[None, :, None, None])
    np.testing.assert_allclose(rec["r1"].numpy(), want, atol=1e-6)


def test_scalar_bound_gives_min_of_relu_and_z(engine, x):
    _, rec = engine.run(x, {"r1": torch.tensor(0.3)}, record=["r1"])
    np.testing.assert_allclose(rec["r1"].numpy(), np.minimum(_relu_conv(x), 0.3), atol=1e-6)


def test_relu6_site_is_bounded(engine, x):
    _, rec = engine.run(x, {"r6": torch.tensor(0.2)}, record=["r1", "r6"])
    np.testing.assert_allclose(rec["r1"].numpy(), _relu_conv(x), atol=1e-6)
    np.testing.assert_allclose(
        rec["r6"].numpy(), np.minimum(np.minimum(_relu_conv(x), 6), 0.2), atol=1e-6
    )


def test_rank2_site_takes_a_per_channel_bound(engine, x):
    z = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4])
    _, plain = engine.run(x, record=["r2"])
    _, rec = engine.run(x, {"r2": z}, record=["r2"])
    torch.testing.assert_close(rec["r2"], torch.minimum(plain["r2"], z))


def test_bounded_logits_equal_onnxruntime_with_min_nodes(engine, x):
    # What the rewrite will ship: a Min node after each bounded site.
    z1 = np.array([0.1, 0.5, 1.0, 2.0], np.float32)
    nodes = _nodes()
    nodes[2].input[0] = "r1_min"
    nodes.insert(2, N("Min", ["r1", "z1"], ["r1_min"]))
    nodes[-1].input[0] = "r2_min"
    nodes.insert(-1, N("Min", ["r2", "z2"], ["r2_min"]))
    inits = {**_weights(), "z1": z1.reshape(C, 1, 1), "z2": np.float32(0.4)}
    hardened = make_onnx_model(nodes, (None, 3, 4, 4), outputs=("logits",), inits=inits)

    got = engine(x, {"r1": torch.from_numpy(z1), "r2": torch.tensor(0.4)})
    np.testing.assert_allclose(got.numpy(), ort_run(hardened, x.numpy())["logits"], atol=1e-5)


def test_record_returns_activations_and_outputs_selects_tensors(engine, x):
    outs, rec = engine.run(x, outputs=["logits", "fc"], record=["r1", "r2"])
    assert list(outs) == ["logits", "fc"] and list(rec) == ["r1", "r2"]
    torch.testing.assert_close(rec["r2"], torch.relu(outs["fc"]))
    torch.testing.assert_close(outs["logits"], engine(x))


def test_record_without_outputs_runs_only_what_it_needs(engine, x):
    outs, rec = engine.run(x, outputs=[], record=["r1"])
    assert outs == {}
    np.testing.assert_allclose(rec["r1"].numpy(), _relu_conv(x), atol=1e-6)


def test_bounds_of_another_float_dtype_keep_the_engine_dtype(engine, x):
    z = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    out = engine(x, {"r1": z})
    assert out.dtype == torch.float32
    out.sum().backward()
    assert z.grad is not None and z.grad.dtype == torch.float64


def test_unknown_site_in_bounds_is_an_error(engine, x):
    with pytest.raises(MmexportError, match="unknown sites: conv"):
        engine(x, {"conv": torch.tensor(1.0)})


def test_unknown_recorded_tensor_is_an_error(engine, x):
    with pytest.raises(MmexportError, match="no tensor named 'nope'"):
        engine.run(x, record=["nope"])


def test_relu_with_a_min_node_after_it_is_still_a_site():
    # Hardened models clip with Min after the Relu: the Relu stays a site, Min is plain.
    proto = make_onnx_model(
        [N("Relu", ["x"], ["r"]), N("Min", ["r", "z"], ["y"])],
        (2, 3),
        inits={"z": np.float32(0.5)},
    )
    engine = Engine(from_proto(proto))
    x = torch.tensor([[-1.0, 0.3, 2.0], [0.7, 0.1, 9.0]])
    assert [s.name for s in engine.sites] == ["r"]
    torch.testing.assert_close(engine(x, {"r": torch.tensor(0.2)}), x.clamp(0, 0.2))


def test_graph_output_that_is_a_site_is_returned_bounded():
    proto = make_onnx_model([N("Relu", ["x"], ["y"])], (2, 3))
    engine = Engine(from_proto(proto))
    x = torch.tensor([[-1.0, 0.3, 2.0], [0.7, 0.1, 9.0]])
    torch.testing.assert_close(
        engine(x, {"y": torch.tensor([1.0, 0.2, 5.0])}),
        torch.tensor([[0.0, 0.2, 2.0], [0.7, 0.1, 5.0]]),
    )


def test_model_proto_is_not_modified(proto):
    before = proto.SerializeToString()
    Engine(from_proto(proto))(torch.zeros(1, 3, 4, 4), {"r1": torch.tensor(0.1)})
    assert proto.SerializeToString() == before
