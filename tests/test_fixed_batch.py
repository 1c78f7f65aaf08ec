"""Models exported with a fixed batch (1, or any N) work with every command.

onnxruntime runs them N samples at a time (the last run padded, the padding dropped); the
engine batches freely where the shapes that bake N in follow the batch (`Engine.batching`),
vectorises the graph at batch N over groups of N where they do not, and runs N at a time
where neither works.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from builders import labelled_set, make_onnx_model, ort_run, tiny_cnn
from builders import run_cli as run
from onnx import helper
from variants import SAMPLES, with_fixed_batch

import mmexport
from mmexport.core.model import from_proto
from mmexport.engine.executor import Engine

SAMPLE = SAMPLES / "digits-cnn-badnet"
COMPARE_FAST = dict(restarts=2, ascent_steps=5, runs=3, warmup=1, provider="cpu", device="cpu")


@pytest.fixture(scope="module", params=[1, 4], ids=["batch1", "batch4"])
def fixed(request, tmp_path_factory):
    n = request.param
    proto = with_fixed_batch(onnx.load(SAMPLE / "model.onnx"), n)
    path = tmp_path_factory.mktemp(f"fixed{n}") / "model.onnx"
    onnx.save(proto, path)
    return n, path


def test_the_fixed_copy_runs_in_onnxruntime_at_its_batch_only(fixed):
    n, path = fixed
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = mmexport.load_npz(SAMPLE / "test.npz").x
    assert sess.run(None, {"input": x[:n]})[0].shape == (n, 10)
    with pytest.raises(Exception, match="index: 0 Got: 5 Expected"):
        sess.run(None, {"input": x[:5]})
    assert "Reshape" in {node.op_type for node in onnx.load(path).graph.node}


def test_inspect_verify_passes_and_says_how_the_batch_ran(fixed):
    n, path = fixed
    result = run("inspect", path, "--verify", "--samples", 6, "--json", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["fixed_batch"] == n
    assert info["verify"]["passed"]
    assert info["verify"]["engine_batching"] == "scaled"  # the baked Reshape follows the batch


def test_validate_gives_the_numbers_of_the_dynamic_model(fixed):
    _, path = fixed
    test = mmexport.load_npz(SAMPLE / "test.npz")
    attack = mmexport.load_npz(SAMPLE / "attack.npz", attack=True)
    got = mmexport.validate(path, test, attack=attack, provider="cpu")
    want = mmexport.validate(SAMPLE / "model.onnx", test, attack=attack, provider="cpu")
    for key in ("n", "accuracy", "balanced_accuracy", "per_class_accuracy", "asr", "ra", "n_attack"):
        assert getattr(got, key) == getattr(want, key), key


def test_validate_command_runs_on_a_fixed_batch(fixed):
    _, path = fixed
    result = run("validate", path, "--data", SAMPLE / "test.npz", "--provider", "cpu", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["n"] == 497  # not a multiple of 4: the last run is padded


def test_detect_calibrates_as_on_the_dynamic_model(fixed):
    _, path = fixed
    clean = mmexport.load_npz(SAMPLE / "clean.npz")
    kw = dict(avoid=None, provider="cpu", device="cpu")
    got = mmexport.detect(path, clean, **kw)
    want = mmexport.detect(SAMPLE / "model.onnx", clean, **kw)
    assert got.threshold == pytest.approx(want.threshold, rel=1e-5, abs=1e-6)
    test = mmexport.load_npz(SAMPLE / "test.npz")
    rep = mmexport.validate(got.model, test, provider="cpu")  # the MMDF graph keeps the fixed batch
    assert rep.false_positive_rate is not None


def test_compare_times_batches_of_the_fixed_size_and_says_so(fixed):
    n, path = fixed
    test = mmexport.load_npz(SAMPLE / "test.npz")
    small = mmexport.Dataset(test.x[:40], test.y[:40])
    rep = mmexport.compare(path, path, small, **COMPARE_FAST)
    assert set(rep.pre.latency) == {str(n)}
    assert f"fixed at {n}" in rep.latency_note
    assert rep.pre.max_margins == rep.post.max_margins
    assert rep.agreement == 1.0


def test_harden_runs_on_a_fixed_batch_and_finds_the_dynamic_models_bounds():
    dynamic = tiny_cnn(seed=3)
    clean = labelled_set(dynamic, 8, seed=1)
    kw = dict(max_epochs=4, restarts=2, warmup_steps=5, unlearn="off", device="cpu", seed=0)
    got = mmexport.harden(with_fixed_batch(dynamic, 4), clean, **kw)
    want = mmexport.harden(dynamic, clean, **kw)
    for site, value in want.bounds.items():
        np.testing.assert_allclose(got.bounds[site], value, rtol=1e-4, atol=1e-5)


# --- the engine on graphs that bake the batch in ---------------------------------------------


def _batch1(nodes, inits, shape=(1, 4)):
    proto = make_onnx_model(nodes, shape, inits=inits)
    return proto, from_proto(proto)


def _per_sample(proto, x):
    return np.concatenate([ort_run(proto, x[i : i + 1])["y"] for i in range(len(x))])


def test_a_reshape_to_the_fixed_batch_follows_a_larger_batch():
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    proto, model = _batch1(
        [helper.make_node("Reshape", ["x", "shape"], ["flat"]), helper.make_node("MatMul", ["flat", "w"], ["y"])],
        {"shape": np.array([1, -1], np.int64), "w": w}, shape=(1, 2, 2))
    engine = Engine(model)
    x = np.random.default_rng(0).standard_normal((5, 2, 2)).astype(np.float32)
    got = engine(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, _per_sample(proto, x), rtol=1e-5, atol=1e-6)
    assert engine.batching == "scaled"


def test_a_graph_that_mixes_the_batch_runs_vectorised_over_groups_of_the_fixed_batch():
    # mean over every axis, batch included: batched, each sample would see the others
    proto, model = _batch1(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0, 1], keepdims=1),
         helper.make_node("Sub", ["x", "m"], ["y"])], {}, shape=(1, 4))
    proto.opset_import[0].version = 13
    engine = Engine(from_proto(proto))
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    got = engine(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, _per_sample(proto, x), rtol=1e-5, atol=1e-6)
    assert engine.batching == "vmapped"


def test_an_attention_block_that_folds_the_batch_into_its_heads_runs_vectorised():
    # [1, L, E] -> [L, 1 * H, E / H] as nn.MultiheadAttention exports it at batch 1: the
    # constant shape holds the batch in its middle axis, where scaling does not reach
    L, E, H = 3, 4, 2
    proto, model = _batch1(
        [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
         helper.make_node("Reshape", ["t", "heads"], ["h"]),
         helper.make_node("Transpose", ["h"], ["ht"], perm=[1, 0, 2]),
         helper.make_node("MatMul", ["ht", "w"], ["p"]),
         helper.make_node("Relu", ["p"], ["r"]),
         helper.make_node("Reshape", ["r", "flat"], ["y"])],
        {"heads": np.array([L, H, E // H], np.int64), "flat": np.array([1, -1], np.int64),
         "w": np.random.default_rng(3).standard_normal((E // H, 5)).astype(np.float32)},
        shape=(1, L, E))
    engine = Engine(model)
    x = torch.randn(4, L, E, generator=torch.Generator().manual_seed(4), requires_grad=True)
    z = {model.sites[0].name: torch.full((5,), 0.5, requires_grad=True)}
    out = engine(x, z)
    np.testing.assert_allclose(engine(x.detach()).numpy(), _per_sample(proto, x.detach().numpy()), rtol=1e-5,
                               atol=1e-6)
    assert engine.batching == "vmapped"
    (out ** 2).sum().backward()
    gx, gz = x.grad.clone(), z[model.sites[0].name].grad.clone()
    x.grad = None
    z[model.sites[0].name].grad = None
    sum((engine(x[i : i + 1], z) ** 2).sum() for i in range(4)).backward()  # one sample at a time
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gz, z[model.sites[0].name].grad)


def test_a_graph_whose_shapes_depend_on_the_data_runs_one_batch_at_a_time():
    # a Slice whose end is computed from the values (4, whatever they are), after a mean over
    # the batch: neither scaled (the mean) nor vectorised (the end is read off a batched value)
    proto, model = _batch1(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0, 1], keepdims=1),
         helper.make_node("Sub", ["x", "m"], ["d"]),
         helper.make_node("ReduceMax", ["x"], ["top"], keepdims=0),
         helper.make_node("Mul", ["top", "zero"], ["nil"]),
         helper.make_node("Add", ["nil", "four"], ["end_f"]),
         helper.make_node("Cast", ["end_f"], ["end0"], to=7),
         helper.make_node("Unsqueeze", ["end0", "first"], ["end"]),
         helper.make_node("Slice", ["d", "start", "end", "axis"], ["y"])],
        {"zero": np.array(0, np.float32), "four": np.array(4, np.float32), "start": np.array([0], np.int64),
         "first": np.array([0], np.int64), "axis": np.array([1], np.int64)}, shape=(1, 4))
    proto.opset_import[0].version = 13
    engine = Engine(from_proto(proto))
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    got = engine(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, _per_sample(proto, x), rtol=1e-5, atol=1e-6)
    assert engine.batching == "chunks"


def test_gradients_reach_every_sample_through_runs_of_the_fixed_batch():
    proto, model = _batch1(
        [helper.make_node("ReduceMean", ["x"], ["m"], axes=[0, 1], keepdims=1),
         helper.make_node("Mul", ["x", "m"], ["y"])], {}, shape=(1, 4))
    engine = Engine(model)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), requires_grad=True)
    engine(x).sum().backward()
    for i in range(3):  # d/dx_i sum(x_i * mean(x_i)) = mean(x_i) + sum(x_i) / 4
        want = x[i].detach().mean() + x[i].detach().sum() / 4
        torch.testing.assert_close(x.grad[i], want.expand(4))


def test_fewer_samples_than_the_fixed_batch_run_once_padded():
    w = np.eye(4, dtype=np.float32)
    proto = make_onnx_model([helper.make_node("MatMul", ["x", "w"], ["y"])], (4, 4), inits={"w": w})
    engine = Engine(from_proto(proto))
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    torch.testing.assert_close(engine(x), x)
    assert engine.batching == "fixed"  # no larger batch was run


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in SAMPLES.glob("*/model.onnx")))
def test_inspect_verify_passes_on_a_batch_one_copy_of_every_sample(folder, tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(with_fixed_batch(onnx.load(SAMPLES / folder / "model.onnx"), 1), path)
    result = run("inspect", path, "--verify", "--samples", 3, "--json", "--provider", "cpu")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["fixed_batch"] == 1 and info["verify"]["passed"]
