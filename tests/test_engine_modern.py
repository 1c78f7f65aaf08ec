"""Transformer and modern CNN classifiers exported from torch: the engine equals onnxruntime.

Each model is exported with a dynamic batch and with a fixed batch of 1 (run one image at a
time, in onnxruntime and in the engine alike).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from builders_modern import MODELS, MaskedAttention, build, export

from mmexport.core.model import from_proto
from mmexport.engine.executor import Engine, unsupported_ops

VARIANTS = [(name, dynamic) for name in MODELS for dynamic in (True, False)]
IDS = [f"{name}-{'dynamic' if dynamic else 'batch1'}" for name, dynamic in VARIANTS]

# What each export must contain, so that the test checks what it claims to.
EXPECTED_OPS = {
    "vit": {"LayerNormalization", "Softmax", "MatMul", "Erf", "Conv", "Concat", "Expand"},
    "convnext": {"LayerNormalization", "InstanceNormalization", "Erf", "Transpose", "ReduceMean"},
    "mobilenet": {"Clip", "Sigmoid", "Mul", "GlobalAveragePool", "HardSwish"},
    "nhwc": {"Transpose", "Resize", "PRelu", "InstanceNormalization", "HardSigmoid", "Elu"},
}


@pytest.fixture(scope="module")
def exported() -> dict:
    protos = {}
    for name, dynamic in VARIANTS:
        _, shape, opset = MODELS[name]
        protos[name, dynamic] = export(build(name), shape, opset=opset, dynamic=dynamic)
    return protos


@pytest.mark.parametrize("name, dynamic", VARIANTS, ids=IDS)
def test_export_runs_in_the_engine_as_in_onnxruntime(exported, name, dynamic):
    proto = exported[name, dynamic]
    ops = {node.op_type for node in proto.graph.node}
    assert EXPECTED_OPS[name] <= ops, EXPECTED_OPS[name] - ops
    assert unsupported_ops(proto) == {}

    model = from_proto(proto)
    assert (model.input_name, model.output_name) == ("image", "logits")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    engine = Engine(model)
    shape = MODELS[name][1]
    x = np.random.default_rng(11).standard_normal((5, *shape)).astype(np.float32)

    step = 5 if dynamic else 1
    for start in range(0, len(x), step):
        chunk = x[start : start + step]
        want = session.run(["logits"], {"image": chunk})[0]
        got = engine(torch.from_numpy(chunk)).detach().numpy()
        assert got.shape == want.shape == (len(chunk), 10)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_decomposed_layer_norm_export_runs_in_the_engine():
    """Below opset 17 torch writes LayerNorm as ReduceMean/Sub/Pow/Sqrt/Div."""
    proto = export(build("vit", seed=1), (3, 32, 32), opset=16, dynamic=True)
    ops = {node.op_type for node in proto.graph.node}
    assert {"ReduceMean", "Pow", "Sqrt", "Div"} <= ops and "LayerNormalization" not in ops
    assert unsupported_ops(proto) == {}
    x = np.random.default_rng(12).standard_normal((3, 3, 32, 32)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(["logits"], {"image": x})[0]
    got = Engine(from_proto(proto))(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_engine_is_differentiable_through_attention(exported):
    """float64 engine on the ViT: input gradients equal central differences."""
    engine = Engine(from_proto(exported["vit", True]), dtype=torch.float64)
    x = torch.from_numpy(np.random.default_rng(13).standard_normal((2, 3, 32, 32)))
    w = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64)

    def loss(t):
        return (engine(t) * w).sum()

    xg = x.clone().requires_grad_(True)
    loss(xg).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    with torch.no_grad():
        for index in [(0, 0, 0, 0), (1, 2, 17, 9), (0, 1, 31, 31)]:
            up, down = x.clone(), x.clone()
            up[index] += 1e-6
            down[index] -= 1e-6
            fd = (loss(up) - loss(down)) / 2e-6
            torch.testing.assert_close(xg.grad[index], fd, rtol=1e-5, atol=1e-8)


def test_bounds_reach_every_site_of_the_mobilenet(exported):
    """The MBConv's ReLU6, SiLU and the head's Hardswish are sites; bounding them changes the
    logits and gets gradients (the squeeze-and-excite gate x * sigmoid(.) is none)."""
    model = from_proto(exported["mobilenet", True])
    assert [s.kind for s in model.sites] == (
        ["silu"] + ["relu6", "silu", "silu"] * 3 + ["hard_swish"]
    )
    engine = Engine(model)
    x = torch.from_numpy(
        np.random.default_rng(14).standard_normal((4, 3, 32, 32)).astype(np.float32)
    )
    _, acts = engine.run(x, record=[s.name for s in model.sites])
    bounds = {k: (0.5 * a.max()).detach().requires_grad_() for k, a in acts.items()}
    out = engine(x, bounds)
    assert not torch.allclose(out, engine(x))
    out.sum().backward()
    assert all(b.grad is not None and b.grad != 0 for b in bounds.values())


def test_fixed_batch_export_has_batch_one(exported):
    dims = exported["vit", False].graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 32, 32]


def test_masked_and_causal_attention_export():
    """SDPA with is_causal, a boolean and a float mask: Trilu, IsNaN, Where in the graph."""
    torch.manual_seed(2)
    proto = export(MaskedAttention().eval(), (2, 6, 4), opset=17, dynamic=True)
    ops = {node.op_type for node in proto.graph.node}
    assert {"Trilu", "IsNaN", "Where", "Softmax", "MatMul"} <= ops
    assert unsupported_ops(proto) == {}
    x = np.random.default_rng(15).standard_normal((3, 2, 6, 4)).astype(np.float32)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    want = session.run(["logits"], {"image": x})[0]
    got = Engine(from_proto(proto))(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_batch_one_export_runs_a_whole_batch_at_once_in_the_engine(exported, name):
    # the engine takes any batch of a batch-1 export without going one image at a time:
    # scaled shapes, or (nn.MultiheadAttention folds the batch into its heads) vmap over images
    proto = exported[name, False]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    engine = Engine(from_proto(proto))
    x = np.random.default_rng(12).standard_normal((6, *MODELS[name][1])).astype(np.float32)
    want = np.concatenate([session.run(["logits"], {"image": x[i : i + 1]})[0] for i in range(len(x))])
    got = engine(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    # the ViT's nn.MultiheadAttention reshapes to [L, 1 x heads, E / heads]: no scaling reaches it
    assert engine.batching == ("vmapped" if name == "vit" else "scaled")
