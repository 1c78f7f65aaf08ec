"""Unlearning a reverse-engineered stamp through the bounds: the gate, the split, the fit."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import labelled_set, tiny_cnn

import mmexport
from mmexport.core.data import load_npz
from mmexport.core.errors import MmexportError
from mmexport.core.model import from_proto, load_model
from mmexport.defences.common.margins import input_box
from mmexport.defences.common.search import initial_bounds
from mmexport.defences.mmac.config import MmacConfig
from mmexport.defences.mmac.unlearn import choose_check, find_stamp, halves, outlier_score, unlearn_bounds
from mmexport.defences.mmbd.scan import ScanConfig
from mmexport.engine.executor import Engine

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def sample(name: str):
    folder = SAMPLES / name
    engine = Engine(load_model(folder / "model.onnx"))
    clean = load_npz(folder / "clean.npz")
    return folder, engine, torch.from_numpy(clean.x), torch.from_numpy(clean.y)


def test_outlier_score_is_the_lead_over_the_runner_up_in_units_of_spread():
    others = [0.0, 1.0, -1.0, 2.0, -2.0]
    assert outlier_score(torch.tensor([10.0, *others])) == pytest.approx(8.0 / 1.0)
    # two classes sharing the lead: nothing stands out, however far both are from the rest
    assert outlier_score(torch.tensor([10.0, 10.0, *others])) == 0.0


def test_outlier_score_takes_midpoint_medians_and_needs_two_other_classes():
    # two other classes: their MAD is half their gap (a lower median made it 0 and every
    # 3-class model's stamp stood out by millions)
    assert outlier_score(torch.tensor([10.0, 6.5, 6.2])) == pytest.approx(3.5 / 0.15)
    assert outlier_score(torch.tensor([10.0, 6.5])) == 0.0  # one other class: no spread to judge by


def test_a_two_class_model_gets_the_max_margin_search_and_says_why():
    from mmexport.cli.progress import stamp_text

    proto = tiny_cnn(seed=3, classes=2)
    x, y = labelled_set(proto, 8, seed=1)
    res = mmexport.harden(proto, (x, y), max_epochs=4, restarts=2, warmup_steps=5, steps=2, device="cpu", seed=0)
    stamp = res.report.stamp
    assert res.report.stage == "max-margin" and not stamp["found"] and stamp["outlier"] == 0.0
    assert stamp["scan"] == {"skipped": "2 classes; the scan's null needs at least 3"}
    assert "2 classes" in stamp_text(stamp) and "max-margin search" in stamp_text(stamp)


def test_the_check_returned_is_the_most_accurate_within_one_standard_error_of_the_best():
    # (held-out fooled, epoch, bounds, accuracy, weight); 100 held-out images: SE at 0.10 is 0.03
    checks = [(0.10, 2, "a", 0.971, 1.0), (0.12, 4, "b", 0.980, 1.0), (0.14, 6, "c", 0.990, 1.0),
              (0.10, 8, "d", 0.975, 1.0)]
    assert choose_check(checks, 100, 1.0)[2] == "b"  # 0.14 > 0.10 + 0.03: too far
    assert choose_check(checks, 100, 2.0)[2] == "c"
    assert choose_check(checks, 100, 0.0)[2] == "d"  # the lowest rate, the more accurate of the tie
    assert choose_check(checks, 10_000, 1.0)[2] == "d"  # many images: 0.12 is told apart
    zero = [(0.0, 2, "a", 0.97, 1.0), (0.01, 4, "b", 0.99, 1.0)]
    assert choose_check(zero, 100, 1.0)[2] == "a"  # nothing is within 0 of a rate of 0
    assert choose_check([], 100, 1.0) is None


def test_halves_split_every_class_evenly_and_disjointly():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    first = halves(y)
    assert [int(first[y == c].sum()) for c in range(3)] == [2, 1, 2]
    assert int((~first).sum()) == 4


def test_stamp_names_the_target_of_a_backdoored_sample_and_not_of_a_clean_one():
    cfg = MmacConfig()
    folder, engine, x, y = sample("digits-cnn-badnet")
    target = json.loads((folder / "card.json").read_text())["attack"]["target"]
    stamp = find_stamp(engine, x, y, input_box(x), 10, cfg)
    assert stamp.found and stamp.target == target
    assert stamp.outlier >= cfg.unlearn_gate
    assert stamp.fooled[target] > 0.9
    assert float(stamp.mask.sum()) <= cfg.mask_area * 16 * 16 + 1e-3

    _, engine, x, y = sample("digits-cnn-clean")
    assert not find_stamp(engine, x, y, input_box(x), 10, cfg).found


def test_unlearning_the_stamp_removes_the_real_trigger_and_keeps_the_floor():
    folder, engine, x, y = sample("digits-cnn-sig")
    cfg = replace(MmacConfig(), unlearn_epochs=100)
    stamp = find_stamp(engine, x, y, input_box(x), 10, cfg)
    res = unlearn_bounds(engine, x, y, stamp, cfg)
    assert res.accuracy >= cfg.unlearn_floor
    assert res.objective_after < 0.2 < res.objective_before  # held-out stamped images let go
    z0 = initial_bounds(engine, x, "channel")
    assert all(np.all(v <= z0[k].numpy() + 1e-6) and np.all(v >= 0) for k, v in res.bounds.items())

    bounds = {k: torch.from_numpy(v) for k, v in res.bounds.items()}
    attack, test = load_npz(folder / "attack.npz", attack=True), load_npz(folder / "test.npz")
    with torch.no_grad():
        asr = float((engine(torch.from_numpy(attack.x), bounds).argmax(1) == torch.from_numpy(attack.y)).float().mean())
        acc = float((engine(torch.from_numpy(test.x), bounds).argmax(1) == torch.from_numpy(test.y)).float().mean())
        acc0 = float((engine(torch.from_numpy(test.x)).argmax(1) == torch.from_numpy(test.y)).float().mean())
    assert asr < 0.1  # the original obeys the trigger on 99.8% of the attack set
    assert acc >= acc0 - 0.03


def test_harden_reports_which_search_ran_and_off_skips_the_stamp():
    proto = tiny_cnn(seed=3)
    x, y = labelled_set(proto, 8, seed=1)
    fast = dict(restarts=2, warmup_steps=5, steps=2, max_epochs=6, check_every=2, unlearn_epochs=6)
    res = mmexport.harden(proto, (x, y), **fast)
    assert res.report.stamp is not None
    assert res.report.stage == ("unlearn" if res.report.stamp["found"] else "max-margin")
    off = mmexport.harden(proto, (x, y), unlearn="off", **fast)
    assert off.report.stamp is None and off.report.stage == "max-margin"
    meta = {p.key: p.value for p in off.model.metadata_props}
    assert meta["mmexport.stage"] == "max-margin"
    assert json.loads(meta["mmexport.settings"])["unlearn"] == "off"
    with pytest.raises(MmexportError, match="unlearn"):
        mmexport.harden(proto, (x, y), unlearn="always", **fast)


def _scan_says(monkeypatch, verdict: str, target):
    """The scan's searches skipped and its decision fixed: what harden does with a verdict."""
    import mmexport.defences.mmbd.scan as scan_module
    import mmexport.defences.mmbd.stats as stats_module

    calls = []
    monkeypatch.setattr(scan_module, "scan_engine", lambda *a, **k: calls.append(a[5]) or {})
    monkeypatch.setattr(stats_module, "decide", lambda tests, alpha, combine: (verdict, target, 0.001, "max_margin"))
    return calls


def test_where_no_stamp_stands_out_the_scans_target_is_unlearned_if_its_stamp_moves_most_of_d(monkeypatch):
    from mmexport.defences.mmac.unlearn import scan_stamp

    proto = tiny_cnn(seed=3)
    x, y = labelled_set(proto, 8, seed=1)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    engine = Engine(from_proto(proto))
    cfg = replace(MmacConfig(), restarts=2, warmup_steps=5, steps=2)
    stamp = replace(find_stamp(engine, x, y, input_box(x), 3, cfg), found=False)
    other = (stamp.target + 1) % 3
    calls = _scan_says(monkeypatch, "backdoor", other)

    moved = scan_stamp(replace(stamp, fooled=[0.9 if c == other else 0.1 for c in range(3)]),
                       engine, x, y, input_box(x), 3, cfg)
    assert moved.found and moved.source == "scan" and moved.target == other
    assert torch.equal(moved.mask, stamp.maximisers.mask[other]) and moved.scan["target_class"] == other
    assert moved.to_json()["source"] == "scan"
    # the scan's own defaults: calibrated p-values, as the scan command reports them
    assert calls[0].calibration_draws == ScanConfig().calibration_draws > 0

    weak = scan_stamp(replace(stamp, fooled=[0.4 if c == other else 0.1 for c in range(3)]),
                      engine, x, y, input_box(x), 3, cfg)
    assert not weak.found and weak.source == "stamp" and weak.target == stamp.target
    assert weak.scan["target_class"] == other  # asked, and said so, but not a trigger's stand-in


def test_the_scans_universal_perturbation_is_a_stand_in_where_it_moves_most_of_d(monkeypatch):
    import mmexport.defences.mmbd.scan as scan_module
    from mmexport.defences.mmac.unlearn import scan_stamp

    proto = tiny_cnn(seed=3)
    x, y = labelled_set(proto, 8, seed=1)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    engine = Engine(from_proto(proto))
    box = input_box(x)
    cfg = replace(MmacConfig(), restarts=2, warmup_steps=5, steps=2)
    stamp = replace(find_stamp(engine, x, y, box, 3, cfg), found=False)
    target = (stamp.target + 1) % 3
    _scan_says(monkeypatch, "backdoor", target)
    delta = torch.full((3, *x.shape[1:]), 0.01)
    delta[target] = 0.3

    def scan_moves(linf: float, l2: float):
        def fake(*a, perturbations=None, **k):
            moved = [[share if c == target else 0.0 for c in range(3)] for share in (linf, l2)]
            perturbations["universal_gain"] = {"delta": delta, "fooled": moved[0]}
            perturbations["universal_gain_l2"] = {"delta": -delta, "fooled": moved[1]}
            return {}
        monkeypatch.setattr(scan_module, "scan_engine", fake)

    weak = replace(stamp, fooled=[0.1] * 3)
    scan_moves(0.8, 0.6)  # the shift alone moves D: it is the one stand-in
    shifted = scan_stamp(weak, engine, x, y, box, 3, cfg)
    assert shifted.found and shifted.target == target and not shifted.use_stamp and shifted.copies == 1
    assert torch.equal(shifted.triggered(x[:4]), box.clamp(x[:4] + delta[target]))
    assert shifted.scan["shift"] == {"statistic": "universal_gain", "fooled": 0.8}
    assert shifted.to_json()["stand_ins"] == ["shift"]
    from mmexport.cli.progress import stamp_text

    assert "universal perturbation 80%: unlearning the perturbation" in stamp_text(shifted.to_json())

    scan_moves(0.2, 0.7)  # the norm that moves more of D is taken
    both = scan_stamp(replace(stamp, fooled=[0.9] * 3), engine, x, y, box, 3, cfg)
    assert both.use_stamp and both.copies == 2 and both.to_json()["stand_ins"] == ["stamp", "shift"]
    assert torch.equal(both.triggered(x[:4])[4:], box.clamp(x[:4] - delta[target]))
    assert torch.equal(both.triggered(x[:4])[:4], both.apply(x[:4]))

    scan_moves(0.3, 0.4)  # neither stand-in moves half of D: nothing to unlearn
    neither = scan_stamp(weak, engine, x, y, box, 3, cfg)
    assert not neither.found and neither.shift is None and neither.scan["shift"]["fooled"] == 0.4
    assert neither.to_json()["stand_ins"] == []  # nothing is unlearned
    assert "(its universal perturbation 40%): max-margin search" in stamp_text(neither.to_json())

    scan_moves(0.8, 0.6)  # shift off: the stamp alone, as before the shift
    assert scan_stamp(weak, engine, x, y, box, 3, replace(cfg, shift="off")).shift is None

    # shift always: a stamp that stood out gets the scan's shift where the scan names its class
    from mmexport.defences.mmac.unlearn import shift_stamp

    standing = replace(stamp, target=target, found=True)
    joined = shift_stamp(standing, engine, x, y, box, 3, cfg)
    assert joined.copies == 2 and joined.source == "stamp" and torch.equal(joined.shift, delta[target])
    assert "and the scan's universal perturbation toward it (80%)" in stamp_text(joined.to_json())
    _scan_says(monkeypatch, "backdoor", (target + 1) % 3)
    scan_moves(0.8, 0.6)
    apart = shift_stamp(standing, engine, x, y, box, 3, cfg)  # the scan names another class
    assert apart.copies == 1 and apart.shift is None and apart.found
    assert f"alone (the scan names {(target + 1) % 3})" in stamp_text(apart.to_json())


def test_harden_asks_the_scan_only_where_no_stamp_stands_out_and_unlearn_is_auto(monkeypatch):
    proto = tiny_cnn(seed=3)
    x, y = labelled_set(proto, 8, seed=1)
    fast = dict(restarts=2, warmup_steps=5, steps=2, max_epochs=6, check_every=2, unlearn_epochs=6,
                unlearn_gate=1e9)  # no stamp stands out
    calls = _scan_says(monkeypatch, "backdoor", 1)
    res = mmexport.harden(proto, (x, y), scan_fooled=0.0, **fast)
    assert calls and res.report.stage == "unlearn"
    assert res.report.stamp["source"] == "scan" and res.report.stamp["target"] == 1
    meta = {p.key: p.value for p in res.model.metadata_props}
    assert meta["mmexport.stage"] == "unlearn"

    calls.clear()
    stamp_only = mmexport.harden(proto, (x, y), unlearn="stamp", **fast)
    assert not calls and stamp_only.report.stage == "max-margin" and stamp_only.report.stamp["scan"] is None

    _scan_says(monkeypatch, "clean", None)
    clean = mmexport.harden(proto, (x, y), **fast)
    assert clean.report.stage == "max-margin" and clean.report.stamp["scan"]["verdict"] == "clean"

    standing = dict(fast, unlearn_gate=0.0)  # every stamp stands out: the scan is asked only for its shift
    calls = _scan_says(monkeypatch, "clean", None)
    found = mmexport.harden(proto, (x, y), **standing)
    assert not calls and found.report.stage == "unlearn" and found.report.stamp["scan"] is None
    always = mmexport.harden(proto, (x, y), shift="always", **standing)
    assert calls and always.report.stage == "unlearn" and always.report.stamp["source"] == "stamp"
    assert always.report.stamp["scan"]["verdict"] == "clean" and always.report.stamp["stand_ins"] == ["stamp"]
    assert json.loads({p.key: p.value for p in always.model.metadata_props}["mmexport.settings"])["shift"] == "always"
    with pytest.raises(MmexportError, match="shift"):
        mmexport.harden(proto, (x, y), shift="sometimes", **fast)
