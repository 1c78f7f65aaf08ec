"""apply_bounds: bounds written into the ONNX graph, the model otherwise kept as it was."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import IR_OLD, conv_net, make_model, mlp, relu6_net
from onnx import TensorProto, helper, numpy_helper

from mmexport.core.bounds import Bounds
from mmexport.core.errors import MmexportError
from mmexport.graph.rewrite import apply_bounds, count_bounded_sites, extract_bounds

RNG = np.random.default_rng(0)
X_CONV = RNG.normal(size=(8, 2, 6, 6)).astype(np.float32) * 2
X_MLP = RNG.normal(size=(16, 4)).astype(np.float32) * 2

PER_CHANNEL = {
    "r1": [0.5, 0.3, 1.0, 0.2],
    "r2": [0.4, 0.1, 0.6],
    "r3": [0.3, 0.5, 0.2, 0.4, 0.1],
}
PER_LAYER = {"r1": 0.4, "r2": 0.3, "r3": 0.2}


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def inits(model) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def node_making(model, tensor: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if tensor in n.output)


@pytest.mark.parametrize("opset, ir", [(13, 8), (9, IR_OLD)])
@pytest.mark.parametrize("caps", [PER_CHANNEL, PER_LAYER], ids=["per_channel", "per_layer"])
def test_bounded_conv_net_matches_hand_built_reference(opset, ir, caps):
    model = conv_net(opset=opset, ir=ir)
    bounded = apply_bounds(model, Bounds(caps))
    onnx.checker.check_model(bounded)
    expected = run(conv_net(opset=opset, ir=ir, caps=caps), X_CONV)
    np.testing.assert_allclose(run(bounded, X_CONV), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(run(model, X_CONV), expected, atol=1e-3)  # the bounds bite


def test_bounded_mlp_matches_numpy():
    model, w = mlp()
    z = np.array([0.5, 0.1, 1.0, 0.0, 2.0, 0.3], np.float32)
    bounded = apply_bounds(model, Bounds({"h": z}))
    h = np.minimum(np.maximum(X_MLP @ w["W1"] + w["b1"], 0), z)
    np.testing.assert_allclose(run(bounded, X_MLP), h @ w["W2"] + w["b2"], rtol=1e-5, atol=1e-5)


def test_per_channel_bound_is_a_min_after_the_renamed_site():
    bounded = apply_bounds(conv_net(), Bounds(PER_CHANNEL), form="min")
    mins = [n for n in bounded.graph.node if n.op_type == "Min"]
    assert {(n.input[0], n.input[1], n.output[0]) for n in mins} == {
        (f"{t}/unbounded", f"mmexport/bound/{t}", t) for t in PER_CHANNEL
    }
    assert node_making(bounded, "r1/unbounded").op_type == "Relu"
    z = inits(bounded)
    assert z["mmexport/bound/r1"].shape == (4, 1, 1)  # rank-4 activation
    assert z["mmexport/bound/r3"].shape == (5,)  # rank-2 activation
    np.testing.assert_array_equal(z["mmexport/bound/r2"].ravel(), np.float32(PER_CHANNEL["r2"]))


@pytest.mark.parametrize("opset", [13, 9])
def test_scalar_bound_turns_relu_into_clip_with_the_same_output(opset):
    ir = 8 if opset >= 11 else IR_OLD
    bounded = apply_bounds(conv_net(opset=opset, ir=ir), Bounds({"r2": 0.25}))
    clip = node_making(bounded, "r2")
    assert clip.op_type == "Clip"
    assert clip.name == "mmexport/bound/r2"
    if opset >= 11:
        values = inits(bounded)
        assert [float(values[i]) for i in clip.input[1:]] == [0.0, 0.25]
    else:
        attrs = {a.name: a.f for a in clip.attribute}
        assert attrs == {"min": 0.0, "max": 0.25}
    assert [n.op_type for n in bounded.graph.node].count("Relu") == 2


def test_model_fields_are_kept():
    model = conv_net(producer_name="maker", producer_version="1.2", doc_string="a net")
    model.graph.doc_string = "graph doc"
    helper.set_model_props(model, {"author": "me", "license": "MIT"})
    bounded = apply_bounds(model, Bounds(PER_CHANNEL), form="min")
    assert bounded.ir_version == model.ir_version
    assert list(bounded.opset_import) == list(model.opset_import)
    assert (bounded.producer_name, bounded.producer_version) == ("maker", "1.2")
    assert bounded.doc_string == "a net"
    assert bounded.graph.doc_string == "graph doc"
    assert {p.key: p.value for p in bounded.metadata_props} == {"author": "me", "license": "MIT"}
    assert list(bounded.graph.input) == list(model.graph.input)
    assert list(bounded.graph.output) == list(model.graph.output)


def test_ir3_model_lists_new_initializers_as_inputs():
    model = conv_net(opset=9, ir=IR_OLD)
    bounded = apply_bounds(model, Bounds({"r1": PER_CHANNEL["r1"], "r3": 0.2}), form="min")
    assert bounded.ir_version == IR_OLD
    assert [p.version for p in bounded.opset_import] == [9]
    inputs = [vi.name for vi in bounded.graph.input]
    assert inputs[: len(model.graph.input)] == [vi.name for vi in model.graph.input]
    assert set(inits(bounded)) <= set(inputs)
    assert "mmexport/bound/r1" in inputs
    onnx.checker.check_model(bounded)
    sess = ort.InferenceSession(bounded.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]


def test_input_model_is_not_mutated():
    model = conv_net()
    before = model.SerializeToString()
    apply_bounds(model, Bounds(PER_CHANNEL))
    apply_bounds(model, Bounds(PER_LAYER))
    assert model.SerializeToString() == before


def test_empty_bounds_give_an_equivalent_model():
    model = conv_net()
    same = apply_bounds(model, Bounds({}))
    np.testing.assert_array_equal(run(same, X_CONV), run(model, X_CONV))
    assert count_bounded_sites(same)["total"] == 0


@pytest.mark.parametrize("opset", [13, 9])
@pytest.mark.parametrize("z, new_max", [(2.5, 2.5), (9.0, 6.0)])
def test_scalar_bound_on_relu6_lowers_its_max_only(opset, z, new_max):
    ir = 8 if opset >= 11 else IR_OLD
    bounded = apply_bounds(relu6_net(opset=opset, ir=ir), Bounds({"r6": z}))
    onnx.checker.check_model(bounded)
    assert [n.op_type for n in bounded.graph.node] == ["Clip", "MatMul"]
    x = np.array([[-1.0, 3.0, 7.0]], np.float32)
    np.testing.assert_allclose(run(bounded, x), [[0.0, min(3.0, new_max), new_max]])
    assert float(extract_bounds(bounded)["r6"]) == new_max


def test_relu6_max_shared_with_another_clip_is_not_changed():
    model = relu6_net()
    model.graph.node.append(helper.make_node("Clip", ["x", "lo", "hi"], ["other"]))
    model.graph.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, ["N", 3]))
    bounded = apply_bounds(model, Bounds({"r6": 1.0}))
    sess = ort.InferenceSession(bounded.SerializeToString(), providers=["CPUExecutionProvider"])
    y, other = sess.run(None, {"x": np.full((1, 3), 5.0, np.float32)})
    np.testing.assert_allclose(y, 1.0)
    np.testing.assert_allclose(other, 5.0)


@pytest.mark.parametrize("opset", [13, 9])
def test_per_channel_bound_on_relu6_adds_a_min(opset):
    ir = 8 if opset >= 11 else IR_OLD
    bounded = apply_bounds(relu6_net(opset=opset, ir=ir), Bounds({"r6": [1.0, 8.0, 0.5]}))
    assert [n.op_type for n in bounded.graph.node] == ["Clip", "Min", "MatMul"]
    x = np.array([[7.0, 7.0, 7.0], [-1.0, 0.25, 0.75]], np.float32)
    np.testing.assert_allclose(run(bounded, x), [[1.0, 6.0, 0.5], [0.0, 0.25, 0.5]])


@pytest.mark.parametrize("bound", [[0.5, 1.0, 0.0], 0.5], ids=["per_channel", "per_layer"])
def test_graph_output_that_is_a_site_keeps_its_name(bound):
    nodes = [helper.make_node("Relu", ["x"], ["out"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 3])
    bounded = apply_bounds(make_model(nodes, [x], [out], []), Bounds({"out": bound}))
    onnx.checker.check_model(bounded)
    assert [o.name for o in bounded.graph.output] == ["out"]
    got = run(bounded, np.array([[2.0, 2.0, 2.0]], np.float32))
    np.testing.assert_allclose(got, np.minimum(2.0, np.broadcast_to(bound, (1, 3))))


def test_site_consumed_by_several_nodes_is_bounded_for_all():
    model, w = mlp()
    model.graph.node.append(helper.make_node("Identity", ["h"], ["h_copy"]))
    model.graph.output.append(helper.make_tensor_value_info("h_copy", TensorProto.FLOAT, ["N", 6]))
    bounded = apply_bounds(model, Bounds({"h": np.full(6, 0.1)}))
    sess = ort.InferenceSession(bounded.SerializeToString(), providers=["CPUExecutionProvider"])
    y, h_copy = sess.run(None, {"x": X_MLP})
    h = np.minimum(np.maximum(X_MLP @ w["W1"] + w["b1"], 0), 0.1)
    np.testing.assert_allclose(h_copy, h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y, h @ w["W2"] + w["b2"], rtol=1e-5, atol=1e-5)


def test_unknown_site_key_is_an_error():
    with pytest.raises(MmexportError, match="'fc1' is not a site"):
        apply_bounds(conv_net(), Bounds({"fc1": 1.0}))


def test_wrong_channel_count_is_an_error():
    with pytest.raises(MmexportError, match="'r1' has 4 channels but 3 bounds"):
        apply_bounds(conv_net(), Bounds({"r1": [1.0, 1.0, 1.0]}))


def test_count_and_extract_bounds_read_back_what_was_written():
    caps = {"r1": PER_CHANNEL["r1"], "r2": 0.3, "r3": PER_CHANNEL["r3"]}
    bounded = apply_bounds(conv_net(), Bounds(caps), form="min")
    counts = count_bounded_sites(bounded)
    assert (counts["total"], counts["min"], counts["clip"]) == (3, 2, 1)
    assert sorted(counts["sites"]) == ["r1", "r2", "r3"]
    back = extract_bounds(bounded)
    assert sorted(back) == ["r1", "r2", "r3"]
    for k, v in caps.items():
        np.testing.assert_allclose(back[k], np.float32(v))
    assert count_bounded_sites(conv_net())["total"] == 0
