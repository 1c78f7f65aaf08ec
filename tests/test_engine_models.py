"""Whole models: the engine's logits equal onnxruntime's; errors name what the engine lacks."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from builders import make_onnx_model, ort_run
from onnx import TensorProto, helper, numpy_helper

from mmexport.core.errors import MmexportError
from mmexport.core.model import from_proto, load_model
from mmexport.engine.executor import Engine, unsupported_ops

N = helper.make_node
SAMPLE_MODELS = sorted((Path(__file__).resolve().parents[1] / "sample_models").glob("*/model.onnx"))
BUILT = "built:residual-cnn"


class _ResidualCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
        )
        self.branch = torch.nn.Sequential(
            torch.nn.Conv2d(8, 8, 3, padding=1, groups=2),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU6(),
            torch.nn.Conv2d(8, 8, 1),
        )
        self.pool = torch.nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        y = self.stem(x)
        y = torch.relu(y + self.branch(y))
        y = torch.nn.functional.max_pool2d(self.pool(y), 2)
        y = y.mean(dim=(2, 3))
        return self.head(y.reshape(y.shape[0], -1))


@pytest.fixture(scope="module")
def residual_cnn() -> onnx.ModelProto:
    torch.manual_seed(0)
    net = _ResidualCNN().eval()
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated, still shipped
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            torch.zeros(1, 3, 12, 12),
            buffer,
            dynamo=False,
            opset_version=13,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}},
        )
    return onnx.load_from_string(buffer.getvalue())


def _load(source: str, residual_cnn: onnx.ModelProto):
    return from_proto(residual_cnn) if source == BUILT else load_model(source)


@pytest.mark.parametrize(
    "source",
    [BUILT] + [str(p) for p in SAMPLE_MODELS],
    ids=[BUILT] + [p.parent.name for p in SAMPLE_MODELS],
)
def test_engine_logits_equal_onnxruntime(source, residual_cnn):
    model = _load(source, residual_cnn)
    session = ort.InferenceSession(
        model.proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    batch, *rest = model.input_shape
    assert rest and all(isinstance(d, int) for d in rest), model.input_shape
    engine = Engine(model)
    x = np.random.default_rng(7).random((16, *rest)).astype(np.float32)

    # A model exported with a fixed batch runs in chunks of that batch.
    step = batch if isinstance(batch, int) and batch > 0 else 16
    for size in (16, 1):
        for start in range(0, size, step):
            chunk = x[start : start + min(step, size)]
            want = session.run([model.output_name], {model.input_name: chunk})[0]
            got = engine(torch.from_numpy(chunk)).detach().numpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _classic_model() -> onnx.ModelProto:
    """Opset 9, IR 3: initializers also listed as graph inputs, LRN, Sum, and a weight made
    by ConstantOfShape, as old exporters (e.g. caffe2 / early pytorch) wrote them."""
    rng = np.random.default_rng(8)
    inits = {
        "w1": rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(6).astype(np.float32) * 0.1,
        "w2_shape": np.array([6, 6, 1, 1], np.int64),
        "w2_scale": rng.standard_normal((6, 1, 1, 1)).astype(np.float32),
        "fc_w": rng.standard_normal((5, 6 * 3 * 3)).astype(np.float32) * 0.2,
        "fc_b": rng.standard_normal(5).astype(np.float32),
    }
    nodes = [
        N("Conv", ["data", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        N("Relu", ["c1"], ["r1"], name="relu1"),
        N("LRN", ["r1"], ["n1"], name="norm1", size=5, alpha=1e-3, beta=0.75, bias=2.0),
        N(
            "ConstantOfShape",
            ["w2_shape"],
            ["ones"],
            name="fill",
            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.25]),
        ),
        N("Mul", ["ones", "w2_scale"], ["w2"], name="w2"),
        N("Conv", ["n1", "w2"], ["c2"], name="conv2"),
        N("Relu", ["c2"], ["r2"], name="relu2"),
        N("Sum", ["n1", "r2", "r1"], ["s"], name="sum"),
        N("MaxPool", ["s"], ["p"], name="pool", kernel_shape=[3, 3], strides=[2, 2]),
        N("Flatten", ["p"], ["f"], name="flatten"),
        N("Gemm", ["f", "fc_w", "fc_b"], ["prob"], name="fc", transB=1),
    ]
    tensors = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph = helper.make_graph(
        nodes,
        "classic",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [1, 3, 7, 7])]
        + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in tensors],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 5])],
        tensors,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)


def test_classic_opset9_ir3_model_equals_onnxruntime():
    proto = _classic_model()
    onnx.checker.check_model(proto)
    model = from_proto(proto)
    assert model.input_name == "data" and [s.name for s in model.sites] == ["r1", "r2"]
    x = np.random.default_rng(9).random((1, 3, 7, 7)).astype(np.float32)

    got = Engine(model)(torch.from_numpy(x)).detach().numpy()

    np.testing.assert_allclose(got, ort_run(proto, x)["prob"], rtol=1e-5, atol=1e-4)


def _graph_with(nodes, opset=13, domains=()):
    proto = make_onnx_model(nodes, (2, 3), outputs=(nodes[-1].output[0],), opset=opset)
    for domain in domains:
        proto.opset_import.append(helper.make_opsetid(domain, 1))
    return proto


def test_unsupported_ops_are_all_named_with_their_first_node():
    proto = _graph_with(
        [
            N("Relu", ["x"], ["a"], name="ok"),
            N("TopK", ["a", "k"], ["v", "i"], name="top1"),
            N("Foo", ["v"], ["f"], name="foo1", domain="com.example"),
            N("TopK", ["f", "k"], ["y", "j"], name="top2"),
        ],
        domains=["com.example"],
    )
    proto.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "k"))

    assert unsupported_ops(proto) == {"TopK": "top1", "com.example.Foo": "foo1"}
    with pytest.raises(MmexportError) as err:
        Engine(from_proto(proto))
    assert str(err.value) == (
        "model: unsupported ops: TopK (node 'top1'), com.example.Foo (node 'foo1')"
    )


def test_exported_model_has_dynamic_batch_shape_math_and_no_unsupported_ops(residual_cnn):
    ops = {n.op_type for n in residual_cnn.graph.node}
    assert {"Shape", "Gather", "Concat", "Reshape", "Clip", "AveragePool"} <= ops
    assert unsupported_ops(residual_cnn) == {}


def test_a_second_input_without_a_value_is_an_error():
    proto = make_onnx_model([N("Add", ["x", "other"], ["y"])], (2, 3))
    proto.graph.input.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [2, 3]))
    with pytest.raises(MmexportError, match="graph input 'other' has no value"):
        Engine(from_proto(proto, input_name="x"))


def test_constant_subgraphs_fold_into_buffers():
    # The ConstantOfShape * scale weight is computed once, at init, and kept as a buffer.
    engine = Engine(from_proto(_classic_model()))
    shapes = {tuple(b.shape): b.dtype for b in engine.buffers()}
    assert shapes[(6, 6, 1, 1)] == torch.float32
    assert (4,) not in shapes  # its int64 shape input was read only by the folded node


def test_float64_engine_and_dtype_conversion(residual_cnn):
    model = from_proto(residual_cnn)
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64)
    engine = Engine(model, dtype=torch.float64)
    assert engine(x).dtype == torch.float64
    single = engine.float()
    assert single.dtype == torch.float32 and single(x).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_engine_equals_cpu(residual_cnn):
    model = from_proto(residual_cnn)
    x = torch.rand(5, 3, 12, 12)
    cpu = Engine(model)
    gpu = Engine(model, device="cuda")
    site = model.sites[0].name
    bounds = {site: torch.full((8,), 0.5, device="cuda", requires_grad=True)}
    out = gpu(x.cuda(), bounds)
    out.sum().backward()
    assert bounds[site].grad is not None
    torch.testing.assert_close(
        out.detach().cpu(), cpu(x, {site: torch.full((8,), 0.5)}), rtol=1e-4, atol=1e-4
    )
