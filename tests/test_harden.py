"""The pipeline: bounds searched in the engine are the bounds onnxruntime runs."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from builders import labelled_set, tiny_cnn

import mmexport
from mmexport.core.model import from_proto, load_model
from mmexport.core.provenance import get_metadata
from mmexport.defences.common.search import initial_bounds
from mmexport.engine.executor import Engine
from mmexport.graph.rewrite import apply_bounds
from mmexport.runtime.sessions import predict, session

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
FAST = dict(max_epochs=4, restarts=2, warmup_steps=5, steps=2)


def ort_logits(proto, x):
    sess, _ = session(proto, provider="cpu")
    return predict(sess, x)


@pytest.mark.parametrize("granularity", ["channel", "layer"])
@pytest.mark.parametrize("folder", sorted(p.parent.name for p in SAMPLES.glob("*/model.onnx")))
def test_engine_with_bounds_matches_onnxruntime_on_the_rewritten_model(folder, granularity):
    model = load_model(SAMPLES / folder / "model.onnx")
    x = np.load(SAMPLES / folder / "clean.npz")["x"][:64]
    engine = Engine(model)
    z0 = initial_bounds(engine, torch.from_numpy(x), granularity)
    # half of each clean maximum: every site really clips
    bounds = mmexport.Bounds({k: 0.5 * v.numpy() for k, v in z0.items()})
    with torch.no_grad():
        want = engine(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in bounds.items()}).numpy()
    got = ort_logits(apply_bounds(model.proto, bounds), x)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - ort_logits(model.proto, x)).max() > 1e-3  # the bounds do act


def test_harden_api_returns_a_drop_in_model_with_provenance():
    proto = tiny_cnn(seed=2, opset=11, ir_version=6)
    x, y = labelled_set(proto, 8, seed=0)
    res = mmexport.harden(proto, (x, y), seed=3, **FAST)
    out = res.model
    assert out.ir_version == 6 and out.opset_import[0].version == 11
    assert [i.name for i in out.graph.input] == ["input"]
    assert [o.name for o in out.graph.output] == ["logits"]
    onnx.checker.check_model(out)
    meta = get_metadata(out)
    for key in (
        "mmexport.version",
        "mmexport.method",
        "mmexport.settings",
        "mmexport.seed",
        "mmexport.source_sha256",
        "mmexport.data_sha256",
        "mmexport.lambda",
        "mmexport.clean_set_accuracy",
        "mmexport.max_margins_before",
        "mmexport.max_margins_after",
    ):
        assert key in meta
    assert len(res.report.max_margins_before) == 3
    engine = Engine(from_proto(proto))
    with torch.no_grad():
        want = engine(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in res.bounds.items()}).numpy()
    assert np.abs(ort_logits(out, x) - want).max() <= 1e-4


def test_harden_refuses_an_already_hardened_model():
    proto = tiny_cnn(seed=2)
    x, y = labelled_set(proto, 8, seed=0)
    res = mmexport.harden(proto, (x, y), **FAST)
    with pytest.raises(mmexport.MmexportError, match="already hardened"):
        mmexport.harden(res.model, (x, y), **FAST)


def test_unknown_options_are_named():
    proto = tiny_cnn(seed=2)
    x, y = labelled_set(proto, 8, seed=0)
    with pytest.raises(mmexport.MmexportError, match="restart"):
        mmexport.harden(proto, (x, y), restart=3)
    with pytest.raises(mmexport.MmexportError, match="granularity"):
        mmexport.harden(proto, (x, y), granularity="pixel")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_seed_gives_identical_bounds_on_cuda():
    folder = Path(__file__).resolve().parents[1] / "sample_models" / "digits-cnn-wide-badnet"
    flags = (torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())
    runs = [mmexport.harden(folder / "model.onnx", folder / "clean.npz", device="cuda", seed=5, max_epochs=20)
            for _ in range(2)]
    for site, v in runs[0].bounds.items():
        np.testing.assert_array_equal(v, runs[1].bounds[site], err_msg=site)
    assert (torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled()) == flags  # restored
