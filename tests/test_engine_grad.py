"""Gradients through the engine: w.r.t. the bounds and the input, against finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import make_onnx_model
from onnx import helper

from mmexport.core.model import from_proto
from mmexport.engine.executor import Engine

N = helper.make_node


@pytest.fixture(scope="module")
def engine():
    """Conv -> Relu (site a) -> Flatten -> Gemm -> Relu (site h) -> Gemm, in float64."""
    rng = np.random.default_rng(5)
    inits = {
        "w": rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32) * 0.1,
        "fw": rng.standard_normal((6, 3 * 4 * 4)).astype(np.float32) * 0.3,
        "fb": np.abs(rng.standard_normal(6)).astype(np.float32) + 0.5,
        "gw": rng.standard_normal((4, 6)).astype(np.float32),
    }
    nodes = [
        N("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        N("Relu", ["c"], ["a"]),
        N("Flatten", ["a"], ["f"]),
        N("Gemm", ["f", "fw", "fb"], ["g"], transB=1),
        N("Relu", ["g"], ["h"]),
        N("Gemm", ["h", "gw"], ["logits"], transB=1),
    ]
    proto = make_onnx_model(nodes, (None, 2, 8, 8), outputs=("logits",), inits=inits)
    return Engine(from_proto(proto), dtype=torch.float64)


@pytest.fixture(scope="module")
def x():
    return torch.from_numpy(np.random.default_rng(6).random((3, 2, 8, 8)))


@pytest.fixture(scope="module")
def bounds(engine, x):
    """Bounds near the activations' medians, so that many units are actually clipped.

    Shifted off the median: a bound equal to an activation sits on the kink of min().
    """
    _, rec = engine.run(x, record=["a"])
    za = rec["a"].transpose(0, 1).reshape(3, -1).median(dim=1).values * 1.01 + 1e-3
    _, rec = engine.run(x, {"a": za}, record=["h"])
    return {"a": za, "h": rec["h"][rec["h"] > 0].quantile(0.75) * 1.01 + 1e-3}


def _loss(engine, x, bounds):
    weights = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    return (engine(x, bounds) * weights).sum() + engine(x, bounds).pow(2).sum() * 0.1


def _central_difference(f, t: torch.Tensor, eps=1e-6) -> torch.Tensor:
    grad = torch.zeros_like(t)
    flat = t.view(-1)
    for i in range(flat.numel()):
        keep = flat[i].item()
        flat[i] = keep + eps
        up = f().item()
        flat[i] = keep - eps
        down = f().item()
        flat[i] = keep
        grad.view(-1)[i] = (up - down) / (2 * eps)
    return grad


def test_bounds_clip_some_units(engine, x, bounds):
    _, rec = engine.run(x, {"a": bounds["a"]}, record=["a", "h"])
    _, plain = engine.run(x, record=["a"])
    assert (plain["a"] > bounds["a"].view(1, -1, 1, 1)).sum() > 10
    assert (rec["h"] > bounds["h"]).sum() > 2


def test_gradient_wrt_bounds_matches_finite_differences(engine, x, bounds):
    z = {name: b.clone().requires_grad_(True) for name, b in bounds.items()}
    _loss(engine, x, z).backward()

    with torch.no_grad():
        for name in z:
            fd = _central_difference(lambda: _loss(engine, x, z), z[name].detach())
            assert fd.abs().max() > 1e-3, f"bound {name} has no effect: pick a smaller one"
            torch.testing.assert_close(z[name].grad, fd, rtol=1e-5, atol=1e-7)


def test_gradient_wrt_input_matches_finite_differences(engine, x, bounds):
    xg = x.clone().requires_grad_(True)
    _loss(engine, xg, bounds).backward()

    sample = x.clone()
    picked = [(0, 0, 0, 0), (1, 1, 3, 4), (2, 0, 7, 7), (2, 1, 5, 2), (0, 1, 2, 6)]
    with torch.no_grad():
        for index in picked:

            def f(index=index):
                return _loss(engine, sample, bounds)

            probe = sample[index].view(1)  # a view: editing it edits `sample`
            fd = _central_difference(f, probe)
            torch.testing.assert_close(xg.grad[index].view(1), fd, rtol=1e-5, atol=1e-7)


def test_gradient_reaches_bounds_given_as_leaves_without_copies(engine, x, bounds):
    z = bounds["a"].clone().requires_grad_(True)
    engine(x, {"a": z}).sum().backward()
    assert z.grad is not None and z.grad.shape == z.shape
