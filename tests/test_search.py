"""The bound search: margins, ascent, bound initialisation and the MMAC loop."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import labelled_set, tiny_cnn

from mmexport.core.data import load_npz
from mmexport.core.model import from_proto, load_model
from mmexport.defences.common.config import SearchConfig
from mmexport.defences.common.margins import (
    MaskedMaximisers,
    Maximisers,
    UniversalMaximisers,
    input_box,
    margins,
    max_margins,
    project_capped_simplex,
)
from mmexport.defences.common.search import fit_bounds, initial_bounds, reduce_margins
from mmexport.engine.executor import Engine

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"

FAST = dict(restarts=2, warmup_steps=5, steps=2, max_epochs=6, check_every=2)


@pytest.fixture(scope="module")
def setup():
    proto = tiny_cnn(seed=3)
    x, y = labelled_set(proto, 8, seed=1)
    engine = Engine(from_proto(proto))
    return engine, torch.from_numpy(x), torch.from_numpy(y)


def test_margin_is_own_logit_minus_best_other():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    m = margins(logits, torch.tensor([0, 2]))
    assert m.tolist() == [1.0, -6.0]


def test_input_box_is_per_channel_min_max_of_the_clean_set():
    x = torch.zeros(4, 2, 3, 3)
    x[:, 0] = torch.linspace(0.1, 0.4, 4).view(4, 1, 1)
    x[:, 1] = torch.linspace(-1, 2, 4).view(4, 1, 1)
    box = input_box(x)
    assert box.lo.shape == (2, 3, 3)
    assert torch.allclose(box.lo[0], torch.tensor(0.1)) and torch.allclose(box.hi[1], torch.tensor(2.0))
    fixed = input_box(x, (0.0, 1.0))
    assert float(fixed.lo.min()) == 0.0 and float(fixed.hi.max()) == 1.0


def test_ascent_raises_margins_and_stays_in_the_box(setup):
    engine, x, _ = setup
    box = input_box(x, (0.0, 1.0))
    maxi = Maximisers(box, 3, 4, generator=torch.Generator().manual_seed(0), clean_x=x)
    with torch.no_grad():
        start = margins(engine(maxi.x), maxi.classes)
    end = maxi.ascend(engine, None, 20)
    assert float(end.mean()) > float(start.mean())
    assert float(maxi.x.min()) >= 0.0 and float(maxi.x.max()) <= 1.0


def test_universal_perturbations_stay_within_their_budget(setup):
    engine, x, y = setup
    box = input_box(x, (0.0, 1.0))
    uni = UniversalMaximisers(box, x, y, 3, generator=torch.Generator().manual_seed(0), budget=0.1, batch=4)
    uni.ascend(engine, None, 10)
    norms = uni.delta.flatten(1).norm(dim=1)
    assert float(norms.max()) <= uni.radius * (1 + 1e-5)
    assert float(norms.min()) > 0


def test_masked_maximisers_stamp_within_the_area_and_raise_the_margins(setup):
    engine, x, y = setup
    box = input_box(x)
    mx = MaskedMaximisers(box, x, y, 3, generator=torch.Generator().manual_seed(0), area=0.1, batch=4)
    with torch.no_grad():
        start = margins(engine(mx.x), mx.classes).mean()
    after = mx.ascend(engine, None, 20).mean()
    assert float(after) > float(start)
    assert mx.mask.shape == (3, 1, 6, 6)  # one mask per class, shared over image channels
    assert float(mx.mask.min()) >= 0 and float(mx.mask.max()) <= 1
    assert float(mx.mask.flatten(1).sum(1).max()) <= mx.area * (1 + 1e-5)
    assert mx.area == pytest.approx(0.1 * 36)
    stamped = mx.x
    assert bool((stamped >= box.lo - 1e-6).all() and (stamped <= box.hi + 1e-6).all())


def test_capped_simplex_projection_is_feasible_sparse_and_nearest():
    gen = torch.Generator().manual_seed(0)
    v = 0.3 * torch.rand(5, 1, 8, 8, generator=gen)
    v[:, 0, 6:, 6:] += 1.0  # a 2x2 block that carries most of the gradient
    total = 4.0
    p = project_capped_simplex(v, total)
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert float(p.flatten(1).sum(1).max()) <= total + 1e-4
    assert bool((p[:, 0, 6:, 6:].flatten(1).sum(1) > 0.8 * total).all())  # the block keeps its mass ...
    assert float((p > 0).float().mean()) < 0.3  # ... and most of the rest is zero
    # nearer to v than the old rescaling onto the same set
    clamped = v.clamp(0, 1)
    scaled = clamped * (total / clamped.flatten(1).sum(1)).clamp(max=1).view(-1, 1, 1, 1)
    assert bool(((p - v).flatten(1).norm(dim=1) < (scaled - v).flatten(1).norm(dim=1)).all())
    # under the budget it only clamps to [0, 1]
    small = torch.tensor([[-0.5, 0.2, 1.5]])
    assert torch.equal(project_capped_simplex(small, 2.0), small.clamp(0, 1))


def test_masked_maximiser_finds_the_planted_patch_of_a_backdoored_sample():
    folder = SAMPLES / "digits-cnn-badnet"
    attack = json.loads((folder / "card.json").read_text())["attack"]
    assert "bottom-right" in attack["trigger"]
    engine = Engine(load_model(folder / "model.onnx"))
    clean, test = load_npz(folder / "clean.npz"), load_npz(folder / "test.npz")
    x, y = torch.from_numpy(clean.x), torch.from_numpy(clean.y)
    mx = MaskedMaximisers(input_box(x), x, y, 10, generator=torch.Generator().manual_seed(0), batch=10)
    per_class = mx.per_class(mx.ascend(engine, None, 100), "mean")
    target = attack["target"]
    assert int(per_class.argmax()) == target
    mask = mx.mask[target, 0]
    assert float(mask[10:, 10:].sum()) > 0.6 * float(mask.sum())  # the mass sits in that corner
    tx, ty = torch.from_numpy(test.x), torch.from_numpy(test.y)
    with torch.no_grad():
        pred = engine((1 - mx.mask[target]) * tx + mx.mask[target] * mx.pattern[target]).argmax(1)
    assert float((pred[ty != target] == target).float().mean()) > 0.9  # and it works as a trigger


def test_universal_and_masked_maximisers_run_together(setup):
    engine, x, y = setup
    res = fit_bounds(engine, x, y, input_box(x), 3, SearchConfig(maximisers="universal+masked", **FAST))
    assert set(res.bounds) == {s.name for s in engine.sites}


def test_initial_bounds_are_the_clean_maxima_so_nothing_is_clipped(setup):
    engine, x, _ = setup
    z0 = initial_bounds(engine, x, "channel")
    assert set(z0) == {s.name for s in engine.sites}
    with torch.no_grad():
        assert torch.allclose(engine(x, z0), engine(x), atol=1e-6)
    layer = initial_bounds(engine, x, "layer")
    assert all(v.dim() == 0 for v in layer.values())


def test_reductions_pick_the_classes_they_name():
    m = torch.tensor([1.0, 2.0, 10.0])
    assert float(reduce_margins(m, "mean")) == pytest.approx(13 / 3)
    assert float(reduce_margins(m, "max")) == 10.0
    assert float(reduce_margins(m, "excess")) == 8.0
    with pytest.raises(ValueError):
        reduce_margins(m, "median")


def test_search_keeps_the_accuracy_floor_and_never_raises_bounds(setup):
    engine, x, y = setup
    cfg = SearchConfig(acc_floor=0.9, lambda0=1.0, **FAST)
    res = fit_bounds(engine, x, y, input_box(x, (0.0, 1.0)), 3, cfg)
    z0 = initial_bounds(engine, x, "channel")
    assert res.accuracy >= 0.9
    for k, v in res.bounds.items():
        assert v.shape == tuple(z0[k].shape)
        assert np.all(v <= z0[k].numpy() + 1e-6) and np.all(v >= 0)
    assert res.history and all("lambda" in row for row in res.history)


def test_same_seed_gives_identical_bounds(setup):
    engine, x, y = setup
    box = input_box(x, (0.0, 1.0))
    a = fit_bounds(engine, x, y, box, 3, SearchConfig(seed=5, **FAST))
    b = fit_bounds(engine, x, y, box, 3, SearchConfig(seed=5, **FAST))
    for k in a.bounds:
        np.testing.assert_array_equal(a.bounds[k], b.bounds[k])


def test_margin_term_lowers_the_largest_margin_of_a_backdoored_model():
    from pathlib import Path

    from mmexport.core.data import load_npz
    from mmexport.core.model import load_model

    folder = Path(__file__).resolve().parents[1] / "sample_models" / "digits-cnn-badnet"
    engine = Engine(load_model(folder / "model.onnx"))
    clean = load_npz(folder / "clean.npz")
    x, y = torch.from_numpy(clean.x), torch.from_numpy(clean.y)
    box = input_box(x)
    cfg = SearchConfig(max_epochs=20, restarts=4, warmup_steps=20, steps=3, lambda0=1.0)
    res = fit_bounds(engine, x, y, box, 10, cfg)
    bounds = {k: torch.from_numpy(v) for k, v in res.bounds.items()}
    before = max_margins(engine, box, 10, restarts=4, steps=40, seed=9, clean_x=x)
    after = max_margins(engine, box, 10, bounds=bounds, restarts=4, steps=40, seed=9, clean_x=x)
    assert float(after.max()) < 0.8 * float(before.max())
    assert res.accuracy >= cfg.acc_floor
