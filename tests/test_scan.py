"""`scan`: MM-BD backdoor detection, its null law and test, and the command."""

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import assert_one_line_error, labelled_set, tiny_cnn, write_tiny
from builders import run_cli as run

import mmexport
from mmexport.defences.mmbd.stats import StatisticTest, combined_p, decide, fit_gamma, gamma_sf, mmbd_test

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
# Small searches keep the tests fast; the sample backdoors are far beyond these thresholds.
FAST = dict(restarts=2, ascent_steps=40, universal_steps=20, device="cpu")
FAST_CLI = ["--restarts", "2", "--ascent-steps", "10", "--device", "cpu", "-q"]






@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scan")
    _, path, data, _, _ = write_tiny(tmp, per_class=6)
    return path, data, tmp


# --- the null law and the test --------------------------------------------------------------


def test_gamma_tail_matches_closed_forms():
    for x in (0.1, 1.0, 7.5, 40.0):
        assert gamma_sf(x, 1.0, 2.0) == pytest.approx(math.exp(-x / 2), rel=1e-12)  # exponential
        assert gamma_sf(x, 2.0, 1.0) == pytest.approx((1 + x) * math.exp(-x), rel=1e-10)  # Erlang-2
    assert gamma_sf(0.0, 3.0, 1.0) == 1.0


def test_gamma_fit_recovers_shape_and_scale_from_a_large_sample():
    v = np.random.default_rng(0).gamma(shape=6.0, scale=2.5, size=20_000)
    shape, scale = fit_gamma(v)
    assert shape == pytest.approx(6.0, rel=0.05) and scale == pytest.approx(2.5, rel=0.05)


def test_an_outlying_class_gets_a_tiny_p_value_and_is_the_candidate():
    values = [20.0, 22.0, 19.0, 25.0, 21.0, 80.0, 23.0, 18.0, 24.0, 20.5]
    test = mmbd_test(values)
    assert test.candidate == 5 and test.p_value < 1e-6


def test_classes_drawn_from_one_law_are_not_significant():
    values = np.random.default_rng(1).gamma(shape=8.0, scale=3.0, size=10)
    assert mmbd_test(values).p_value > 0.05


def test_calibration_brings_the_level_to_alpha_where_the_plug_in_value_is_far_above_it():
    # ten classes drawn from one gamma law, no outlier: the plug-in null, fitted once the
    # largest value is out, has a thin tail and rejects far more often than alpha says
    rng = np.random.default_rng(5)
    sets = [rng.gamma(shape=4.0, scale=2.0, size=10) for _ in range(150)]
    plugin = np.array([mmbd_test(v).p_value for v in sets])
    calibrated = np.array([mmbd_test(v, draws=200, seed=i).p_value for i, v in enumerate(sets)])
    assert (plugin < 0.05).mean() > 0.15
    assert (calibrated < 0.05).mean() < 0.09
    assert (calibrated >= plugin).all()  # never more significant than the plug-in value
    test = mmbd_test(sets[0], draws=200)
    assert test.plugin_p == pytest.approx(plugin[0]) and test.p_value >= 1 / 201
    # a clear outlier stays significant: the smallest calibrated p-value, 1 / (draws + 1)
    values = [20.0, 22.0, 19.0, 25.0, 21.0, 80.0, 23.0, 18.0, 24.0, 20.5]
    assert mmbd_test(values, draws=200).p_value == pytest.approx(1 / 201)


def test_non_positive_values_widen_the_null_instead_of_breaking_it():
    test = mmbd_test([-1.0, 0.0, 5.0, 6.0, 5.5, 30.0])
    assert test.candidate == 5 and 0.0 <= test.p_value <= 1.0 and math.isfinite(test.null_shape)


def _test(candidate: int, p: float) -> StatisticTest:
    return StatisticTest([1.0] * 3, candidate=candidate, p_value=p, null_shape=1.0, null_scale=1.0)


def test_the_verdict_is_the_harmonic_mean_p_value_and_the_target_the_smallest_tests_candidate():
    weak = _test(0, 0.4)
    p = 3 / (1 / 0.01 + 1 / 0.4 + 1 / 0.4)
    assert decide({"a": _test(2, 0.01), "b": weak, "c": weak}, 0.05) == ("backdoor", 2, pytest.approx(p), "a")
    # one statistic at 0.03 among two weak ones is not enough; two of them at 0.03 are
    assert decide({"a": _test(1, 0.03), "b": weak, "c": weak}, 0.05)[:2] == ("clean", None)
    assert decide({"a": _test(1, 0.03), "b": _test(1, 0.03), "c": weak}, 0.05)[:2] == ("backdoor", 1)


def test_the_harmonic_mean_lies_between_the_smallest_p_value_and_bonferroni():
    rng = np.random.default_rng(0)
    for _ in range(200):
        ps = rng.uniform(1e-6, 1.0, size=3)
        hm = combined_p(ps)
        assert ps.min() - 1e-15 <= hm <= combined_p(ps, "bonferroni") + 1e-15
    assert combined_p([0.0, 0.5, 0.9]) == 0.0 and combined_p([1.0, 1.0]) == 1.0


def test_bonferroni_is_kept_on_request():
    assert decide({"a": _test(2, 0.01), "b": _test(0, 0.4)}, 0.05, "bonferroni") == ("backdoor", 2, 0.02, "a")
    assert decide({"a": _test(1, 0.03), "b": _test(0, 0.4)}, 0.05, "bonferroni") == ("clean", None, 0.06, "a")


def test_the_scan_tests_three_statistics_and_two_without_the_l2_search(tiny):
    path, data, _ = tiny
    three = mmexport.scan(path, data, **FAST, seed=1)
    assert list(three.tests) == ["max_margin", "universal_gain", "universal_gain_l2"]
    assert three.p_value == pytest.approx(combined_p([t.p_value for t in three.tests.values()]))
    two = mmexport.scan(path, data, **FAST, seed=1, l2_budget=0)
    assert list(two.tests) == ["max_margin", "universal_gain"]
    # the L-infinity search and the margins do not depend on whether the L2 search runs
    assert two.tests["universal_gain"] == three.tests["universal_gain"]
    assert two.tests["max_margin"] == three.tests["max_margin"]


# --- the sample models ----------------------------------------------------------------------


def test_the_backdoored_sample_is_flagged_with_its_target():
    folder = SAMPLES / "digits-cnn-badnet"
    target = json.loads((folder / "card.json").read_text())["attack"]["target"]
    result = mmexport.scan(folder / "model.onnx", folder / "clean.npz", **FAST)
    assert result.verdict == "backdoor" and result.target_class == target
    assert result.p_value < 0.05 and len(result.max_margins) == 10


def test_the_clean_sample_passes():
    folder = SAMPLES / "digits-cnn-clean"
    result = mmexport.scan(folder / "model.onnx", folder / "clean.npz", **FAST)
    assert result.verdict == "clean" and result.target_class is None and result.p_value >= 0.05


# --- the command ----------------------------------------------------------------------------


def test_cli_json_has_the_issue_keys_and_the_same_seed_gives_the_same_result(tiny):
    path, data, _ = tiny
    first = run("scan", path, "--data", data, "--json", "--seed", "3", *FAST_CLI)
    second = run("scan", path, "--data", data, "--json", "--seed", "3", *FAST_CLI)
    assert first.exit_code == 0, first.output
    out = json.loads(first.output)
    assert {"verdict", "target_class", "p_value", "max_margins"} <= set(out)
    assert out["verdict"] in ("backdoor", "clean") and len(out["max_margins"]) == 3
    drop = ("seconds", "schedule")  # timings
    assert {k: v for k, v in out.items() if k not in drop} == {
        k: v for k, v in json.loads(second.output).items() if k not in drop
    }


def test_cli_plain_output_ends_with_the_verdict(tiny):
    path, data, _ = tiny
    result = run("scan", path, "--data", data, *FAST_CLI)
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith(("BACKDOOR", "CLEAN"))


def test_report_is_written_and_not_overwritten_without_force(tiny):
    path, data, tmp = tiny
    report = tmp / "scan.json"
    assert run("scan", path, "--data", data, "--report", report, *FAST_CLI).exit_code == 0
    assert json.loads(report.read_text())["verdict"] in ("backdoor", "clean")
    assert_one_line_error(
        run("scan", path, "--data", data, "--report", report, *FAST_CLI), str(report), "--force"
    )


def test_a_clean_set_missing_a_class_is_a_one_line_error(tiny):
    path, data, tmp = tiny
    f = np.load(data)
    keep = f["y"] != 2
    partial = tmp / "partial.npz"
    np.savez(partial, x=f["x"][keep], y=f["y"][keep])
    assert_one_line_error(run("scan", path, "--data", partial, *FAST_CLI), str(partial), "2")


def test_data_shaped_unlike_the_model_is_a_one_line_error(tiny):
    path, _, tmp = tiny
    wrong = tmp / "wrong.npz"
    np.savez(wrong, x=np.zeros((6, 1, 5, 5), np.float32), y=np.array([0, 1, 2, 0, 1, 2]))
    assert_one_line_error(run("scan", path, "--data", wrong, *FAST_CLI), str(wrong), "do not match")


def test_two_classes_are_too_few_for_a_null(tmp_path):
    proto = tiny_cnn(seed=3, classes=2)
    path = tmp_path / "two.onnx"
    onnx.save(proto, path)
    x, y = labelled_set(proto, 4, seed=1)
    data = tmp_path / "clean.npz"
    np.savez(data, x=x, y=y)
    assert_one_line_error(run("scan", path, "--data", data, *FAST_CLI), "at least 3")


def test_each_class_is_judged_on_at_most_judge_rows_images():
    """K x |D| forwards would be 4M at 1,000 classes and 2,000 images: the gain is judged on a
    seeded draw of at most JUDGE_ROWS other-class images per class, fewer where classes are many."""
    import torch

    from mmexport.core.model import from_proto
    from mmexport.defences.common import ranks
    from mmexport.defences.common.config import JUDGE_ROWS, judge_rows
    from mmexport.defences.common.margins import input_box
    from mmexport.defences.mmbd.scan import universal_gain
    from mmexport.engine.executor import Engine

    engine = Engine(from_proto(tiny_cnn(seed=3)))
    x = torch.rand(900, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(3).repeat(300)

    def gains():
        ranks.rows_run.clear()
        return universal_gain(engine, input_box(x), x, y, 3, norm="linf", budget=0.05, steps=2, batch=4,
                              generator=torch.Generator().manual_seed(0), chunk=64)

    first = gains()
    assert ranks.rows_run["forward"] == 3 * 2 * JUDGE_ROWS and len(first) == 3
    assert gains() == first  # the draw is seeded
    assert [judge_rows(k) for k in (10, 50, 100, 1000)] == [400, 400, 200, 50]


def test_the_universal_searches_keep_their_perturbations_and_what_each_moves():
    import torch

    from mmexport.core.model import from_proto
    from mmexport.defences.common.margins import input_box
    from mmexport.defences.mmbd.scan import universal_gain
    from mmexport.engine.executor import Engine

    engine = Engine(from_proto(tiny_cnn(seed=3)))
    x = torch.rand(60, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(3).repeat(20)
    box = input_box(x)
    for norm, radius in (("linf", 0.2 * float((box.hi - box.lo).max())), ("l2", 0.2 * float((box.hi - box.lo).norm()))):
        keep = {}
        gains = universal_gain(engine, box, x, y, 3, norm=norm, budget=0.2, steps=5, batch=4,
                               generator=torch.Generator().manual_seed(0), keep=keep)
        delta = keep["delta"]
        assert delta.shape == (3, 1, 6, 6) and len(keep["fooled"]) == 3 == len(gains)
        size = delta.abs().amax(dim=(1, 2, 3)) if norm == "linf" else delta.flatten(1).norm(dim=1)
        assert float(size.max()) <= radius * 1.0001 and float(size.max()) > 0
        with torch.no_grad():  # fooled: the share of the other classes' images the shift sends to c
            for c in range(3):
                out = engine(box.clamp(x[y != c] + delta[c]))
                assert keep["fooled"][c] == pytest.approx(float((out.argmax(1) == c).float().mean()), abs=1e-6)
