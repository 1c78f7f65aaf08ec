"""Searches sized for real models: chunked passes, measured costs, schedules that fit a limit."""

import copy
from dataclasses import replace

import pytest
import torch
from builders import labelled_set, tiny_cnn, write_tiny

import mmexport
from mmexport.core.model import from_proto
from mmexport.defences.common.cost import RowCost, chunk_rows, measure, memory_budget, saved_bytes_per_row
from mmexport.defences.common.margins import MaskedMaximisers, Maximisers, UniversalMaximisers, input_box
from mmexport.defences.common.schedule import (
    MMAC_KNOBS,
    Knob,
    Work,
    fit_schedule,
    mmac_work,
    scaled,
    with_rows,
)
from mmexport.defences.common.search import (
    fit_backward,
    fit_bounds,
    initial_bounds,
    objective_backward,
    objective_value,
    reduce_margins,
)
from mmexport.defences.mmac.config import MmacConfig
from mmexport.engine.executor import Engine

FAST = dict(restarts=3, warmup_steps=4, steps=2, max_epochs=6, check_every=2)


@pytest.fixture(scope="module")
def setup():
    proto = tiny_cnn(seed=3, classes=3)
    x, y = labelled_set(proto, 8, seed=1)
    engine = Engine(from_proto(proto))
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    return engine, x, y, input_box(x)


def _sets(engine, x, y, box):
    gen = torch.Generator().manual_seed(0)
    return [
        Maximisers(box, 3, 4, generator=gen, clean_x=x),
        UniversalMaximisers(box, x, y, 3, generator=gen, batch=5),
        MaskedMaximisers(box, x, y, 3, generator=gen, batch=5),
    ]


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_chunked_ascent_follows_the_same_path_as_one_batch(setup, kind):
    engine, x, y, box = setup
    whole = _sets(engine, x, y, box)[kind]
    parts = copy.deepcopy(whole)
    parts.chunk = 4  # 12 or 15 rows: several chunks, the last one short
    m_whole = whole.ascend(engine, None, 5)
    m_parts = parts.ascend(engine, None, 5)
    assert torch.allclose(m_whole, m_parts, atol=1e-4)
    assert torch.allclose(whole.x, parts.x, atol=1e-5)


@pytest.mark.parametrize("how", ["max", "mean", "excess", "softmax"])
def test_two_pass_objective_gradient_equals_autograd_of_the_objective(setup, how):
    engine, x, y, box = setup
    sets = _sets(engine, x, y, box)[1:]
    for ms in sets:
        ms.ascend(engine, None, 3)
    z0 = initial_bounds(engine, x, "channel")
    rel = {k: torch.full_like(v, 0.8, requires_grad=True) for k, v in z0.items()}

    def current():
        return {k: z0[k] * rel[k] for k in z0}

    from mmexport.defences.common.margins import margins

    direct = sum(reduce_margins(ms.per_class(margins(engine(ms.x, current()), ms.classes), "mean"), how)
                 for ms in sets)
    expected = torch.autograd.grad(2.5 * direct, list(rel.values()))
    value = objective_backward(engine, sets, current, how, weight=2.5, chunk=3)
    got = [v.grad for v in rel.values()]
    assert value == pytest.approx(float(direct.detach()), rel=1e-5)
    assert value == pytest.approx(objective_value(engine, sets, current(), how, chunk=4), rel=1e-5)
    for a, b in zip(expected, got, strict=True):
        assert torch.allclose(a, b, atol=1e-5), (a, b)


def test_chunked_logit_term_gradient_equals_the_whole_batch(setup):
    engine, x, y, _ = setup
    z0 = initial_bounds(engine, x, "channel")
    rel = {k: torch.full_like(v, 0.7, requires_grad=True) for k, v in z0.items()}

    def current():
        return {k: z0[k] * rel[k] for k in z0}

    ref = engine(x).detach() + 0.1
    loss = ((engine(x, current()) - ref) ** 2).sum(dim=1).mean() * 3.0
    expected = torch.autograd.grad(loss, list(rel.values()))
    value = fit_backward(engine, x, ref, current, weight=3.0, chunk=5)
    assert value * 3.0 == pytest.approx(float(loss.detach()), rel=1e-5)
    for a, v in zip(expected, rel.values(), strict=True):
        assert torch.allclose(a, v.grad, atol=1e-5)


def test_search_in_chunks_finds_the_bounds_of_the_whole_batch(setup):
    engine, x, y, box = setup
    cfg = MmacConfig(**FAST)
    whole = fit_bounds(engine, x, y, box, 3, cfg)
    parts = fit_bounds(engine, x, y, box, 3, cfg, chunk=5)
    for name in whole.bounds:
        assert torch.allclose(torch.from_numpy(whole.bounds[name]), torch.from_numpy(parts.bounds[name]),
                              rtol=1e-3, atol=1e-4)


def test_costs_are_measured_and_saved_bytes_grow_with_the_rows(setup):
    engine, x, _, _ = setup
    cost = measure(engine, x, None, rows=4, repeat=1)
    assert cost.backward_seconds > 0 and cost.forward_seconds > 0
    # tiny_cnn saves at least its input and two activations per row, 4 bytes each.
    assert cost.saved_bytes >= 4 * x[0].numel()
    assert saved_bytes_per_row(engine, x, None) == cost.saved_bytes
    assert chunk_rows(cost, 10 * cost.saved_bytes) == 10
    assert chunk_rows(cost, 1) == 1  # never fewer than one row
    assert memory_budget(1.5, torch.device("cpu")) == int(1.5 * 1024**3)
    assert 0 < memory_budget(0, torch.device("cpu")) <= 2 * 1024**3


def test_a_schedule_that_fits_is_left_alone_and_one_that_does_not_shrinks_to_the_limit():
    cfg = with_rows(MmacConfig(), 200)
    assert cfg.fit_rows == 200 and cfg.floor_rows == 1000
    cost = RowCost(backward_seconds=0.05, forward_seconds=0.015, saved_bytes=30 << 20)
    default = mmac_work(cfg, 200, 10).seconds(cost)
    same = fit_schedule(cfg, MMAC_KNOBS, lambda c: mmac_work(c, 200, 10), cost, time_limit=10 * default)
    assert same.config == cfg and same.scale == 1.0 and same.changed == {}

    plan = fit_schedule(cfg, MMAC_KNOBS, lambda c: mmac_work(c, 200, 10), cost, time_limit=480)
    assert default > 480 >= plan.planned_seconds
    assert plan.scale < 1.0 and plan.changed
    for knob in MMAC_KNOBS:  # shrunk together, never below a floor, never raised
        assert knob.floor <= getattr(plan.config, knob.field) <= getattr(cfg, knob.field) or (
            getattr(cfg, knob.field) < knob.floor
        )
    assert plan.config.restarts < cfg.restarts and plan.config.max_epochs < cfg.max_epochs
    # The factor sits on the grid 2^(-j/2): jitter in the costs rarely moves it.
    j = round(-2 * torch.log2(torch.tensor(plan.scale)).item())
    assert plan.scale == pytest.approx(2 ** (-j / 2))
    # A limit no schedule meets: the floors are the schedule.
    floor = fit_schedule(cfg, MMAC_KNOBS, lambda c: mmac_work(c, 200, 10), cost, time_limit=1e-3)
    assert floor.config.restarts == 2 and floor.planned_seconds > 1e-3


def test_scaled_respects_floors_and_exponents():
    cfg = MmacConfig()
    knobs = [Knob("restarts", 4), Knob("max_epochs", 10, exponent=1.0)]
    out = scaled(cfg, knobs, 0.25)
    assert out.restarts == 5 and out.max_epochs == 38
    assert scaled(cfg, knobs, 0.0).restarts == 4
    assert Work(2, 4) + Work(1, 1) * 2 == Work(4, 6)


def test_harden_reports_the_schedule_and_shrinks_it_under_a_tight_limit(tmp_path):
    proto = tiny_cnn(seed=3, classes=3)
    x, y = labelled_set(proto, 8, seed=1)
    free = mmexport.harden(proto, (x, y), unlearn="off", **FAST)
    assert free.report.schedule["scale"] == 1.0 and free.report.schedule["changed"] == {}
    spent = free.report.schedule["stage_seconds"]
    assert list(spent) == ["planning", "max-margin search", "margin check"] and all(v >= 0 for v in spent.values())
    tight = mmexport.harden(proto, (x, y), unlearn="off", time_limit=1e-6, **FAST)
    sched = tight.report.schedule
    assert sched["scale"] < 1.0 and sched["planned_seconds"] <= sched["default_seconds"]
    assert tight.report.settings["restarts"] == 2 == sched["changed"]["restarts"][1]
    # Replaying the knobs as run with no limit gives the same bounds: the report is enough.
    knobs = {k: tight.report.settings[k] for k in ("restarts", "warmup_steps", "steps", "max_epochs",
                                                   "probe_steps", "fit_rows", "floor_rows")}
    again = mmexport.harden(proto, (x, y), unlearn="off", time_limit=0,
                            **(FAST | knobs))
    for name, v in tight.bounds.items():
        assert (again.bounds[name] == v).all()


def test_engine_channels_last_gives_the_same_logits(setup):
    engine, x, _, _ = setup
    fast = Engine(engine.model, memory_format="channels_last")
    assert fast._channels_last and not engine._channels_last
    assert torch.allclose(engine(x), fast(x), atol=1e-5)
    # "auto": channels last for conv nets on 32x32 images and up, not the small samples.
    assert not Engine(engine.model, memory_format="auto")._channels_last
    big = tiny_cnn(seed=3, classes=3)
    big.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 32
    big.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 32
    assert Engine(from_proto(big), memory_format="auto")._channels_last
    with pytest.raises(ValueError, match="memory_format"):
        Engine(engine.model, memory_format="nhwc")


def test_time_limit_and_memory_are_checked():
    with pytest.raises(mmexport.ParameterError, match="time_limit"):
        replace(MmacConfig(), time_limit=-1)


def test_plan_prints_the_schedule_and_writes_nothing(tmp_path):
    import json

    from builders import run_cli

    _, model, data, _, _ = write_tiny(tmp_path)
    result = run_cli("harden", model, "--data", data, "--plan", "--json",
                     "--time-limit", "0.000001", "--restarts", 4)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["changed"]["restarts"] == [4, 2] and plan["settings"]["restarts"] == 2
    assert plan["backward_ms_per_row"] > 0 and plan["chunk_rows"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.npz", "tiny.onnx"]
    assert "measured_seconds" not in plan  # a limit in seconds: the costs were timed already
    text = run_cli("harden", model, "--data", data, "--plan")
    assert text.exit_code == 0 and "predicted search time" in text.output
    # the auto limit counts work at reference rates; the plan also prices it at costs timed here
    auto = json.loads(run_cli("harden", model, "--data", data, "--plan", "--json").output)
    assert auto["costs"] == "reference" and auto["measured_seconds"] > 0
    assert "timed now" in text.output


def test_the_second_stage_is_fitted_to_the_time_left_and_moves_only_its_knobs():
    from mmexport.defences.common.schedule import merge, second_stage

    cfg = with_rows(MmacConfig(), 200)
    cost = RowCost(backward_seconds=0.05, forward_seconds=0.015, saved_bytes=30 << 20)
    first = fit_schedule(cfg, MMAC_KNOBS, lambda c: mmac_work(c, 200, 10), cost, time_limit=600)
    unlearn = second_stage(first.config, "unlearn", 200, 10, cost, 150.0, None)
    assert unlearn.planned_seconds <= 150 < unlearn.default_seconds
    assert set(unlearn.changed) <= {"unlearn_epochs", "fit_rows", "floor_rows", "probe_steps", "restarts"}
    search = second_stage(first.config, "search", 200, 10, cost, 120.0, None)
    assert "max_epochs" in search.changed and "unlearn_epochs" not in search.changed
    both = merge(first, search)
    assert both.config == search.config
    for field, (was, now) in both.changed.items():  # counted from the defaults
        assert was == getattr(cfg, field) and now == getattr(search.config, field)


def test_the_auto_time_limit_grows_with_the_parameters_and_the_flag_takes_seconds_or_auto(tmp_path):
    from builders import run_cli

    from mmexport.defences.common.config import auto_time_limit

    assert auto_time_limit(0) == 240 and auto_time_limit(5_000_000) == 360 and auto_time_limit(11_200_000) == 480
    assert MmacConfig().time_limit is None
    with pytest.raises(mmexport.ParameterError, match="time_limit"):
        MmacConfig(time_limit=-1.0)
    bad = run_cli("harden", tmp_path / "m.onnx", "--data", tmp_path / "d.npz", "--time-limit", "soon")
    assert bad.exit_code == 2 and "expected seconds (a number >= 0) or auto" in bad.output


def test_a_slow_stamp_search_makes_the_second_stage_smaller():
    from mmexport.defences.common.schedule import after_stamp, stamp_work

    cfg = with_rows(MmacConfig(), 200)
    cost = RowCost(backward_seconds=0.05, forward_seconds=0.015, saved_bytes=30 << 20)
    first = fit_schedule(cfg, MMAC_KNOBS, lambda c: mmac_work(c, 200, 10), cost, time_limit=600)
    predicted = stamp_work(first.config, 200, 10).seconds(cost)
    as_planned, _ = after_stamp(first, "unlearn", 200, 10, 500.0, predicted)
    slower, again = after_stamp(first, "unlearn", 200, 10, 500.0, 3 * predicted)
    assert slower.config.unlearn_epochs < as_planned.config.unlearn_epochs and again.changed


def _convs(groups: int):
    """Input [N, 4, 6, 6] -> Conv 4->4 3x3 (`groups`) -> Relu -> GlobalAveragePool -> Flatten -> Gemm 4->3."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 4 // groups, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.5, (3, 4)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1], group=groups),
             helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("GlobalAveragePool", ["r1"], ["p1"]),
             helper.make_node("Flatten", ["p1"], ["f1"]), helper.make_node("Gemm", ["f1", "w2"], ["logits"], transB=1)]
    io = [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4, 6, 6]),
          helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])]
    graph = helper.make_graph(nodes, "convs", io[:1], io[1:], inits)
    return onnx.helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_reference_costs_count_flops_by_kind_and_read_no_clock(setup, monkeypatch):
    import time

    from mmexport.defences.common.cost import REFERENCE_RATES, count_work, reference_cost

    engine, x, _, _ = setup
    # tiny_cnn per row: Conv 2*4*1*9*36 + Gemm 2*8*4 + Gemm 2*3*8 FLOPs.
    assert count_work(engine, x, None, backward=False).dense_flops == 2592 + 64 + 48
    assert count_work(engine, x, None, backward=True).dense_flops > 2592 + 64 + 48
    xs = torch.rand(3, 4, 6, 6)
    dense = count_work(Engine(from_proto(_convs(1))), xs, None, backward=False)
    depthwise = count_work(Engine(from_proto(_convs(4))), xs, None, backward=False)
    assert (dense.dense_flops, dense.grouped_flops) == (2 * 4 * 4 * 9 * 36 + 2 * 4 * 3, 0)
    assert (depthwise.dense_flops, depthwise.grouped_flops) == (2 * 4 * 3, 2 * 4 * 9 * 36)
    assert depthwise.bytes_written == dense.bytes_written
    # Priced at fixed rates: depthwise FLOPs dearer, and no clock is read.
    assert REFERENCE_RATES["grouped"][0] > 10 * REFERENCE_RATES["dense"][0]
    monkeypatch.setattr(time, "perf_counter", lambda: pytest.fail("the clock was read"))
    cost = reference_cost(engine, x, None)
    assert cost.kind == "reference" and cost.to_json()["costs"] == "reference"
    assert cost == reference_cost(engine, x, None) and cost.backward_seconds > cost.forward_seconds > 0
    assert cost.saved_bytes == saved_bytes_per_row(engine, x, None)


class _Clock:
    """A clock whose every reading is an hour after the last: a machine under any load."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 3600.0
        return self.now


def test_the_auto_schedule_is_the_same_whatever_the_clock_says(monkeypatch):
    import mmexport.defences.harden as harden_module

    proto = tiny_cnn(seed=3, classes=3)
    x, y = labelled_set(proto, 8, seed=1)
    # A limit the tiny model's counted work exceeds, so the auto schedule shrinks and the
    # second stage is refitted after the stamp search.
    monkeypatch.setattr(harden_module, "auto_time_limit", lambda parameters: 1e-3)
    monkeypatch.setattr(harden_module, "measure", lambda *a, **k: pytest.fail("auto timed the model"))
    quiet = mmexport.harden(proto, (x, y), **FAST)
    monkeypatch.setattr(harden_module, "time", _Clock())
    busy = mmexport.harden(proto, (x, y), **FAST)
    assert quiet.report.schedule["costs"] == "reference" and quiet.report.schedule["scale"] < 1.0
    assert quiet.report.settings == busy.report.settings
    for name, v in quiet.bounds.items():
        assert (busy.bounds[name] == v).all()
    # A limit in seconds is timed here and now: the busy clock leaves the second stage no time.
    monkeypatch.undo()
    timed = mmexport.harden(proto, (x, y), time_limit=30.0, **FAST)
    monkeypatch.setattr(harden_module, "time", _Clock())
    rushed = mmexport.harden(proto, (x, y), time_limit=30.0, **FAST)
    assert timed.report.schedule["costs"] == rushed.report.schedule["costs"] == "measured"
    assert timed.report.settings != rushed.report.settings


def test_the_scan_prices_auto_at_reference_costs(monkeypatch):
    from mmexport.defences.mmbd.scan import ScanConfig, schedule_scan

    proto = tiny_cnn(seed=3, classes=3)
    x, _ = labelled_set(proto, 8, seed=1)
    engine = Engine(from_proto(proto))
    x = torch.from_numpy(x)
    assert ScanConfig().time_limit is None
    auto = schedule_scan(engine, x, 3, ScanConfig(), torch.device("cpu"))
    assert auto.cost.kind == "reference" and auto.time_limit == 225.0
    assert schedule_scan(engine, x, 3, ScanConfig(time_limit=10.0), torch.device("cpu")).cost.kind == "measured"
    with pytest.raises(mmexport.ParameterError, match="time_limit"):
        ScanConfig(time_limit=-1.0)
