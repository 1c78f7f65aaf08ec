"""MMDF: one ONNX graph that flags inputs whose margin the bounds cut, and fixes them."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import IR_OLD, conv_net, labelled_set, relu6_net, tiny_cnn
from builders import run_cli as run

import mmexport
from mmexport.core.bounds import Bounds
from mmexport.core.data import Dataset
from mmexport.core.errors import MmexportError
from mmexport.core.provenance import get_metadata, set_metadata
from mmexport.defences.common.stats import fold_ids
from mmexport.defences.mmdf.bounds import clean_max_bounds
from mmexport.defences.mmdf.detector import detect, focus_plan
from mmexport.defences.mmdf.graph import DETECTED, SCORE, SUPPRESSED, build_mmdf_graph
from mmexport.defences.mmdf.null import fit_image_null, fit_null, margin_gap
from mmexport.graph.rewrite import apply_bounds
from mmexport.runtime.metrics import binomial_tail
from mmexport.runtime.sessions import session

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
TINY_BOUNDS = Bounds({"r1": [0.3, 0.2, 0.4, 0.1], "r2": 0.5})


def gap(proto, bounds, x):
    """d from the original model and the unfolded bounded model, run separately."""
    bounded = apply_bounds(proto, bounds, form="min")
    return margin_gap(ort(proto, x)["logits"], ort(bounded, x)["logits"])


def ort(proto, x, names=None):
    sess, _ = session(proto, provider="cpu")
    names = names or [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))


def tiny_bounds(proto, x):
    """Half of each site's clean maximum: every site clips some clean inputs."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.extend([onnx.ValueInfoProto(name="r1"), onnx.ValueInfoProto(name="r2")])
    acts = ort(probe, x, ["r1", "r2"])
    return Bounds({"r1": 0.5 * acts["r1"].max(axis=(0, 2, 3)), "r2": 0.5 * acts["r2"].max()})


@pytest.fixture(scope="module")
def tiny_set():
    proto = tiny_cnn(seed=3)
    x, y = labelled_set(proto, 10, seed=1)
    return proto, x, y, tiny_bounds(proto, x)


# --------------------------------------------------------------------------- scores and null


def test_margin_gap_is_the_margin_the_bounds_take_from_the_original_class():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]])
    bounded = np.array([[1.0, 2.0, 0.0], [0.0, 2.0, 1.5]])
    # row 0: original class 0, margin 2 -> -1 (class 1 now leads): d = 3; row 1 unchanged
    np.testing.assert_allclose(margin_gap(logits, bounded), [3.0, 0.0])


def test_conformal_threshold_is_the_order_statistic_that_guarantees_alpha():
    d = np.arange(1000, dtype=float)
    fit = fit_null(d, 0.005)
    assert fit.law == "conformal" and fit.params["rank"] == 996
    assert fit.threshold == 995.0 and fit.fpr == pytest.approx(0.004)


def test_conformal_threshold_falls_back_to_the_largest_score_on_small_sets():
    fit = fit_null(np.linspace(0, 1, 50), 0.005)
    assert fit.threshold == 1.0 and fit.fpr == 0.0
    assert fit.params["guarantee"] == pytest.approx(1 / 51)


def test_gaussian_null_sets_the_threshold_too_low_on_a_skewed_d():
    # d on clean data: mostly 0, a short right tail (what clean-max bounds give)
    d = np.concatenate([np.zeros(900), np.random.default_rng(0).exponential(0.05, 100)])
    gauss, conformal = fit_null(d, 0.005, law="gaussian"), fit_null(d, 0.005)
    assert gauss.threshold < conformal.threshold
    assert gauss.fpr > 0.005 >= conformal.fpr


def test_exponential_tail_extrapolates_past_the_largest_score():
    d = np.random.default_rng(1).exponential(1.0, 100)
    fit = fit_null(d, 0.005, law="exponential-tail")
    assert fit.threshold > d.max() * 0.8 and fit.params["beta"] > 0


def test_image_null_ranks_images_not_their_shifted_copies():
    # 100 images, 5 copies each; one copy of the first 3 images scores high. Ranked as 500 rows
    # at alpha 0.01 (rank ceil(501 * 0.99) = 496) the threshold is the 5th largest row, 0.99;
    # as 100 images it is the largest image score (rank ceil(101 * 0.99) = 100).
    rows = np.zeros((5, 100))
    rows[2, :3] = [5.0, 4.0, 3.0]
    rows[0] = np.linspace(0.0, 1.0, 100)
    tested = np.ones(500, bool)
    assert fit_null(rows.reshape(-1), 0.01).threshold == pytest.approx(98 / 99)
    fit = fit_image_null(rows.reshape(-1), 100, tested, 0.01)
    assert fit.threshold == 5.0 and fit.n == 100
    assert fit.params == {"unit": "image", "rank": 100, "guarantee": pytest.approx(0.01),
                          "tested_images": 100}


def test_image_null_holds_alpha_over_all_images_when_only_some_are_tested():
    rng = np.random.default_rng(0)
    rows = rng.exponential(size=(2, 400)).reshape(-1)
    tested = np.tile(np.arange(400) < 40, 2)  # the focus: 40 of 400 images
    fit = fit_image_null(rows, 400, tested, 0.05)
    # rank ceil(401 * 0.95) = 381: 360 untested images sort first, then the 21st of the 40.
    per_image = np.sort(rows.reshape(2, 400)[:, :40].max(0))
    assert fit.threshold == pytest.approx(per_image[20], rel=1e-6)
    assert fit.params["tested_images"] == 40
    with pytest.raises(MmexportError, match="1 of D's images are tested"):
        fit_image_null(rows, 400, np.tile(np.arange(400) < 1, 2), 0.05)


def test_image_null_guarantee_holds_for_new_unshifted_images():
    # Copies of an image share its level (a shifted copy is not a new image); the new image is
    # one unshifted draw. Over many D's, the rate at which it exceeds the threshold stays <= alpha.
    rng = np.random.default_rng(1)
    n, alpha, trials = 99, 0.05, 4000
    level = rng.normal(size=(trials, 1, n + 1))
    rows = level + 0.5 * rng.normal(size=(trials, 3, n + 1))
    exceed = [rows[t, 0, n] > fit_image_null(rows[t, :, :n].reshape(-1), n, np.ones(3 * n, bool), alpha).threshold
              for t in range(trials)]
    # Ranking the 3n rows instead lets the new image through about twice as often.
    rowwise = [rows[t, 0, n] > fit_null(rows[t, :, :n].reshape(-1), alpha).threshold for t in range(trials)]
    se = (alpha * (1 - alpha) / trials) ** 0.5
    assert np.mean(exceed) <= alpha + 3 * se
    assert np.mean(rowwise) > np.mean(exceed) + 3 * se


@pytest.mark.parametrize("alpha", [0.0, 0.5, -1])
def test_fit_null_refuses_an_alpha_outside_0_to_half(alpha):
    with pytest.raises(MmexportError, match="alpha"):
        fit_null(np.arange(100.0), alpha)


def test_fit_null_refuses_fewer_than_ten_scores():
    with pytest.raises(MmexportError, match="at least 10"):
        fit_null(np.arange(5.0))


def test_clean_max_bound_is_the_largest_value_plus_the_last_gap():
    maxima = {"s": np.array([[1.0, 2.0], [3.0, 5.0], [2.0, 4.0]]),
              "t": np.array([[1.0], [0.5], [2.0]])}
    b = clean_max_bounds(maxima)
    np.testing.assert_allclose(b["s"], [4.0, 6.0])
    assert b["t"].shape == () and float(b["t"]) == 3.0
    np.testing.assert_allclose(clean_max_bounds(maxima, [0, 2])["s"], [3.0, 6.0])


def test_folds_are_stratified_and_seeded():
    y = np.repeat(np.arange(3), 10)
    f = fold_ids(y, 5, seed=0)
    assert all(np.bincount(f[y == c], minlength=5).tolist() == [2] * 5 for c in range(3))
    assert (f == fold_ids(y, 5, seed=0)).all() and (f != fold_ids(y, 5, seed=1)).any()


# --------------------------------------------------------------------------- the graph


def test_graph_score_is_margin_gap_of_the_original_and_the_bounded_model(tiny_set):
    proto, x, _, bounds = tiny_set
    out = ort(build_mmdf_graph(proto, bounds, 0.25), x)
    want = gap(proto, bounds, x)
    assert out[SCORE].shape == (len(x),) and out[SCORE].dtype == np.float32
    np.testing.assert_allclose(out[SCORE], want - 0.25, atol=1e-5)
    assert (out[DETECTED] == (out[SCORE] > 0)).all()
    assert 0 < out[DETECTED].mean() < 1  # the test sees both kinds of rows


def test_flagged_rows_get_the_bounded_logits_without_the_original_class(tiny_set):
    proto, x, _, bounds = tiny_set
    out = ort(build_mmdf_graph(proto, bounds, 0.25), x)
    original = ort(proto, x)["logits"]
    bounded = ort(apply_bounds(proto, bounds, form="min"), x)["logits"]
    flagged = out[DETECTED]
    np.testing.assert_array_equal(out["logits"][~flagged], original[~flagged])
    c = original.argmax(1)
    want = bounded.copy()
    want[np.arange(len(x)), c] = SUPPRESSED
    np.testing.assert_allclose(out["logits"][flagged], want[flagged], atol=1e-5)
    assert (out["logits"][flagged].argmax(1) != c[flagged]).all()


def test_graph_shares_the_weights_and_keeps_inputs_opset_and_ir():
    m = mmexport.load_model(SAMPLES / "digits-cnn-badnet" / "model.onnx")
    bounds = Bounds({s.name: np.ones(s.channels, np.float32) for s in m.sites})
    out = build_mmdf_graph(m.proto, bounds, 1.0)
    onnx.checker.check_model(out)
    assert len(out.SerializeToString()) <= 1.1 * len(m.proto.SerializeToString())
    weights = [i.name for i in m.proto.graph.initializer]
    assert [i.name for i in out.graph.initializer if i.name in weights] == weights
    big = [i for i in out.graph.initializer if np.prod(i.dims) > 1000]
    assert len(big) == sum(np.prod(i.dims) > 1000 for i in m.proto.graph.initializer)
    assert [i.name for i in out.graph.input] == ["input"]
    assert [o.name for o in out.graph.output] == ["logits", DETECTED, SCORE]
    assert out.ir_version == m.proto.ir_version and out.opset_import == m.proto.opset_import


def test_graph_leaves_the_input_model_untouched(tiny_set):
    proto, _, _, bounds = tiny_set
    before = proto.SerializeToString()
    build_mmdf_graph(proto, bounds, 0.1)
    assert proto.SerializeToString() == before


@pytest.mark.parametrize("opset, ir", [(9, IR_OLD), (11, 6), (18, 8)])
def test_graph_runs_at_old_and_new_opsets(opset, ir):
    proto = conv_net(opset=opset, ir=ir)
    x = np.random.default_rng(0).uniform(-1, 1, (16, 2, 6, 6)).astype(np.float32)
    bounds = Bounds({"r1": [0.5, 0.4, 0.3, 0.2], "r3": 0.5})
    out = build_mmdf_graph(proto, bounds, 0.0)
    assert out.ir_version == ir and out.opset_import[0].version == opset
    got = ort(out, x)
    want = gap(proto, bounds, x)
    np.testing.assert_allclose(got[SCORE], want, atol=1e-5)


@pytest.mark.parametrize("opset", [9, 13])
def test_relu6_sites_get_a_lower_clip_max_in_the_bounded_branch_only(opset):
    proto = relu6_net(opset=opset)
    x = np.array([[5.0, 1.0, 0.0], [1.0, 0.5, 0.0]], np.float32)
    out = ort(build_mmdf_graph(proto, Bounds({"r6": 2.0}), 0.0), x)
    # row 0: margin 4 -> 1, d = 3; row 1 is not clipped
    np.testing.assert_allclose(out[SCORE], [3.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(out["y"][1], x[1])


def test_opset_below_9_is_a_clear_error():
    with pytest.raises(MmexportError, match="opset >= 9"):
        build_mmdf_graph(conv_net(opset=8), Bounds({"r1": 1.0}), 0.0)


def test_bounds_for_an_unknown_site_are_refused(tiny_set):
    proto = tiny_set[0]
    with pytest.raises(MmexportError, match="'nope' is not a site"):
        build_mmdf_graph(proto, Bounds({"nope": 1.0}), 0.0)


# --------------------------------------------------------------------------- detect


def test_detect_threshold_reproduces_the_calibrated_scores(tiny_set):
    proto, x, y, bounds = tiny_set
    res = detect(proto, (x, y), bounds=bounds, augment=False, statistic="margin")
    out = ort(res.model, x)
    want = gap(proto, bounds, x)
    tested = ~np.isnan(out[SCORE])  # the gate scores only inputs sent to the focus class
    focus = res.report.focus["class"]
    sent = ort(proto, x)["logits"].argmax(1) == focus if focus is not None else np.ones(len(x), bool)
    assert (tested == sent).all() and tested.any()
    np.testing.assert_allclose(out[SCORE][tested] + res.threshold, want[tested], atol=1e-5)
    assert out[DETECTED].mean() == pytest.approx(res.report.false_positive_rate_clean_set)
    assert res.report.bounds_source == "bounds"
    assert res.report.calibration["cross_fit_folds"] is None


def test_detect_stamps_its_provenance(tiny_set):
    proto, x, y, bounds = tiny_set
    res = detect(proto, (x, y), bounds=bounds, alpha=0.01, seed=4)
    meta = get_metadata(res.model)
    assert meta["mmexport.method"] == "mmdf"
    assert float(meta["mmexport.mmdf.threshold"]) == res.threshold
    assert float(meta["mmexport.mmdf.alpha"]) == 0.01 and meta["mmexport.seed"] == "4"
    null = json.loads(meta["mmexport.mmdf.null"])
    assert null["law"] == "conformal" and "rank" in null["params"]
    assert meta["mmexport.mmdf.bounds_source"] == "bounds"
    assert meta["mmexport.mmdf.output"] == "logits"
    assert len(meta["mmexport.source_sha256"]) == 64 and len(meta["mmexport.data_sha256"]) == 64


def test_detect_computes_clean_max_bounds_with_a_cross_fitted_null(tiny_set):
    proto, x, y, _ = tiny_set
    res = detect(proto, (x, y), folds=3)
    assert res.report.bounds_source == "clean-max"
    # images [N, 1, 6, 6]: D and its four 1-pixel shifts
    assert res.report.calibration == {"n": 5 * len(x), "images": len(x), "augment": True,
                                         "cross_fit_folds": 3, "feature_folds": 3}
    assert set(res.bounds) == {"r1", "r2"}
    # bounds above every clean activation: the final model flags no clean input of D
    assert not ort(res.model, x)[DETECTED].any()
    assert detect(proto, (x, y), folds=3).threshold == res.threshold  # same seed, same model


def test_detect_with_mmac_bounds_runs_the_harden_search_with_its_seed_and_options(
    tiny_set, monkeypatch
):
    from types import SimpleNamespace

    import mmexport.defences.harden

    proto, x, y, bounds = tiny_set
    calls = []

    def fake_harden(model, clean, config, **kw):
        calls.append((config, kw))
        report = SimpleNamespace(to_json=lambda history=True: {"method": "mmac"})
        return mmexport.defences.harden.HardenResult(bounds, proto, report)

    monkeypatch.setattr(mmexport.defences.harden, "harden", fake_harden)
    res = detect(proto, (x, y), method="mmac", seed=7, max_epochs=4, restarts=2)
    config, kw = calls[0]
    assert kw["seed"] == 7 and config.max_epochs == 4 and config.restarts == 2
    assert res.report.bounds_source == "mmac" and res.report.harden == {"method": "mmac"}
    assert res.threshold == detect(proto, (x, y), bounds=bounds).threshold


def test_detect_reads_the_bounds_of_a_hardened_model(tiny_set):
    proto, x, y, bounds = tiny_set
    hardened = apply_bounds(proto, bounds)  # folded form: bounds come from its metadata
    res = detect(proto, (x, y), hardened=hardened)
    for site in bounds:
        np.testing.assert_allclose(res.bounds[site], bounds[site], rtol=1e-6)
    assert res.threshold == detect(proto, (x, y), bounds=bounds).threshold


def test_detect_refuses_a_hardened_model_of_another_model(tiny_set):
    proto, x, y, bounds = tiny_set
    other = apply_bounds(proto, bounds)
    set_metadata(other, {"mmexport.source_sha256": "0" * 64})
    with pytest.raises(MmexportError, match="hardened from another model"):
        detect(proto, (x, y), hardened=other)


@pytest.mark.parametrize("kw, match", [
    (dict(bounds=TINY_BOUNDS, hardened="h.onnx"), "not both"),
    (dict(bounds=Bounds({"nope": 1.0})), "'nope' is not a site"),
    (dict(method="mmdf"), "method: 'mmdf'"),
    (dict(max_epochs=3), "apply to method 'mmac' only"),
    (dict(law="student"), "law: 'student'"),
    (dict(folds=1), "folds: must be >= 2"),
])
def test_detect_bad_options_are_one_line_errors(tiny_set, kw, match):
    proto, x, y, _ = tiny_set
    with pytest.raises(MmexportError, match=match) as err:
        detect(proto, (x, y), **kw)
    assert "\n" not in str(err.value)


def test_detect_refuses_a_model_without_sites():
    from builders import identity_classifier

    x = np.eye(3, dtype=np.float32).repeat(4, axis=0)
    with pytest.raises(MmexportError, match="no clipping sites"):
        detect(identity_classifier(), (x, x.argmax(1)))


def test_detect_refuses_an_mmdf_model(tiny_set):
    proto, x, y, bounds = tiny_set
    res = detect(proto, (x, y), bounds=bounds)
    with pytest.raises(MmexportError, match="already an MMDF model"):
        detect(res.model, (x, y), bounds=bounds, output_name="logits")


def detect_and_validate(name: str, **options):
    """MMDF on a sample with its clean set; the graph validated on its test and attack sets."""
    folder = SAMPLES / name
    res = mmexport.detect(folder / "model.onnx", folder / "clean.npz", **options)
    test = mmexport.load_npz(folder / "test.npz")
    attack = mmexport.load_npz(folder / "attack.npz", attack=True)
    return res, mmexport.validate(res.model, test, attack=attack, provider="cpu"), attack


def test_focus_keeps_false_positives_off_classes_the_trigger_never_produces():
    # digits-cnn-sig: tested on every input, its test-set "1"s were flagged (2.0% of clean
    # inputs); the trigger sends everything to 8, and only inputs sent to 8 are tested now.
    res, rep, _ = detect_and_validate("digits-cnn-sig")
    assert res.report.focus["class"] == 8
    assert rep.false_positive_rate <= 0.01 and rep.detection_rate >= 0.95 and rep.asr <= 0.02


def test_the_feature_test_catches_a_blend_that_stays_inside_the_clean_range():
    # digits-cnn-blend: the margin gap and the channel means alone detected 2% of its triggered
    # inputs; the spread and skew of the first conv's channels tell them from clean 3s.
    _, rep, _ = detect_and_validate("digits-cnn-blend")
    assert rep.false_positive_rate <= 0.01 and rep.detection_rate >= 0.95 and rep.asr <= 0.02
    _, margin_only, _ = detect_and_validate("digits-cnn-blend", statistic="margin")
    assert margin_only.asr >= 0.5


def test_the_mmdf_file_of_a_sample_stays_within_a_tenth_of_the_original():
    # The bounded branch reads the original's weights; the feature test stores, per site, the
    # focus class's means and a half-precision basis, and no shapes of its own tensors.
    model = SAMPLES / "digits-mlp-sig" / "model.onnx"
    res = mmexport.detect(model, SAMPLES / "digits-mlp-sig" / "clean.npz")
    assert res.report.focus["class"] is not None
    assert len(res.model.SerializeToString()) <= 1.1 * model.stat().st_size
    assert len(res.model.graph.value_info) == len(onnx.load(model).graph.value_info)
    basis = [i for i in res.model.graph.initializer if i.name.endswith("/basis")]
    assert basis and all(i.data_type == onnx.TensorProto.FLOAT16 for i in basis)


def test_detect_flags_the_triggers_of_a_backdoored_sample_and_few_clean_inputs():
    folder = SAMPLES / "digits-cnn-badnet"
    res, rep, attack = detect_and_validate("digits-cnn-badnet")
    assert rep.detection_rate >= 0.9 and rep.false_positive_rate <= 0.02
    assert rep.asr <= 0.05 and rep.accuracy >= 0.96
    # The scan on D names the backdoor's target (the card's), and flagged inputs avoid it.
    card = json.loads((folder / "card.json").read_text())
    assert res.report.avoid["class"] == card["attack"]["target"]
    assert get_metadata(res.model)["mmexport.mmdf.avoid"] == str(card["attack"]["target"])
    flagged = ort(res.model, attack.x)
    assert flagged[DETECTED].any()
    assert not np.any(flagged["logits"][flagged[DETECTED]].argmax(1) == card["attack"]["target"])


def test_flagged_inputs_never_go_to_the_class_to_avoid(tiny_set):
    proto, x, y, bounds = tiny_set
    everything = -1e9  # threshold below every d: every input is flagged
    plain = ort(build_mmdf_graph(proto, bounds, everything), x)
    assert plain[DETECTED].all()
    sent = plain["logits"].argmax(1)
    avoid = int(np.bincount(sent).argmax())  # the class the fix sends most inputs to
    out = ort(build_mmdf_graph(proto, bounds, everything, avoid=avoid), x)
    moved = out["logits"].argmax(1)
    assert not np.any(moved == avoid)
    assert np.array_equal(moved[sent != avoid], sent[sent != avoid])  # the others keep their class
    original = ort(proto, x)["logits"].argmax(1)
    assert not np.any(moved == original)  # still never the original prediction
    with pytest.raises(MmexportError, match="class to avoid 9"):
        build_mmdf_graph(proto, bounds, everything, avoid=9)


def test_with_a_focus_class_only_inputs_sent_to_it_are_flagged(tiny_set):
    proto, x, y, bounds = tiny_set
    everything = -1e9
    original = ort(proto, x)["logits"].argmax(1)
    focus = int(np.bincount(original).argmin())
    out = ort(build_mmdf_graph(proto, bounds, everything, focus=focus), x)
    assert np.array_equal(out[DETECTED], original == focus)
    assert np.array_equal(out["logits"].argmax(1) == original, original != focus)
    with pytest.raises(MmexportError, match="class to focus on 3"):
        build_mmdf_graph(proto, bounds, everything, focus=3)


def test_focus_plan_spends_alpha_on_the_target_share_of_d():
    predicted = np.repeat(np.arange(4), [100, 100, 100, 100])
    plan = focus_plan(2, predicted, 0.005)
    assert plan == {"class": 2, "n": 100, "share": 0.25, "alpha": pytest.approx(0.02)}
    assert focus_plan(None, predicted, 0.005)["class"] is None
    few = focus_plan(2, np.r_[np.zeros(100), np.full(9, 2)], 0.005)
    assert few["class"] is None and "9 calibration inputs predicted as class 2" in few["reason"]


def test_detect_focus_calibrates_on_the_inputs_sent_to_the_avoided_class(tiny_set):
    proto, x, y, bounds = tiny_set
    res = detect(proto, (x, y), bounds=bounds, avoid=1, statistic="margin")
    focus = res.report.focus
    assert focus["class"] == 1 and focus["n"] < res.report.calibration["n"]
    # Ranked over every image of D at alpha: an image never sent to class 1 cannot be flagged.
    null = res.report.null
    assert null["n"] == res.report.calibration["images"] and null["alpha"] == pytest.approx(0.005)
    assert 0 < null["params"]["tested_images"] < null["n"]
    assert get_metadata(res.model)["mmexport.mmdf.focus"] == "1"
    flagged = ort(res.model, x)[DETECTED]
    assert not flagged[ort(proto, x)["logits"].argmax(1) != 1].any()
    res = detect(proto, (x, y), bounds=bounds, avoid=1, statistic="margin", focus=False)
    assert res.report.focus["class"] is None
    assert res.report.null["params"]["tested_images"] == res.report.null["n"]
    assert get_metadata(res.model)["mmexport.mmdf.focus"] == ""


def test_detect_without_every_class_in_d_skips_the_scan_and_says_why(tiny_set):
    proto, x, y, bounds = tiny_set
    keep = y != 2
    res = detect(proto, (x[keep], y[keep]), bounds=bounds)
    avoid = res.report.avoid
    assert avoid["class"] is None and "no sample of class(es) 2" in avoid["scan"]["skipped"]


def test_detect_avoid_given_none_or_bad(tiny_set):
    proto, x, y, bounds = tiny_set
    res = detect(proto, (x, y), bounds=bounds, avoid=1)
    assert res.report.avoid == {"class": 1, "source": "given", "scan": None}
    assert get_metadata(res.model)["mmexport.mmdf.avoid"] == "1"
    res = detect(proto, (x, y), bounds=bounds, avoid=None)
    assert res.report.avoid["class"] is None and get_metadata(res.model)["mmexport.mmdf.avoid"] == ""
    for bad, match in ((7, "not one of the model's"), ("target", "expected 'scan'"), (True, "expected 'scan'")):
        with pytest.raises(MmexportError, match=match):
            detect(proto, (x, y), bounds=bounds, avoid=bad)


# --------------------------------------------------------------------------- validate and CLI


def test_validate_adds_detection_and_false_positive_rates_for_an_mmdf_model(tiny_set):
    proto, x, y, bounds = tiny_set
    model = build_mmdf_graph(proto, bounds, 0.25)
    flagged = ort(model, x)[DETECTED]
    target = np.zeros_like(y)
    attack = Dataset(x, target, y_true=y)
    rep = mmexport.validate(model, Dataset(x, y), attack=attack, provider="cpu")
    assert rep.false_positive_rate == pytest.approx(flagged.mean())
    assert rep.detection_rate == pytest.approx(flagged[y != 0].mean())
    plain = mmexport.validate(proto, Dataset(x, y), provider="cpu")
    assert plain.detection_rate is None and plain.false_positive_rate is None
    assert rep.false_positive_guarantee is None  # a graph built by hand promises nothing


def test_binomial_tail_is_the_exact_upper_tail():
    from math import comb

    for k, n, r in [(0, 10, 0.1), (1, 10, 0.1), (3, 10, 0.1), (10, 10, 0.5), (5, 200, 0.00995), (11, 4, 0.3)]:
        exact = sum(comb(n, j) * r**j * (1 - r) ** (n - j) for j in range(k, n + 1))
        assert binomial_tail(k, n, r) == pytest.approx(exact, rel=1e-9, abs=1e-300)
    assert binomial_tail(3, 100_000, 0.0) == 0.0 and binomial_tail(0, 5, 0.0) == 1.0


def test_validate_weighs_an_mmdf_models_false_positives_against_what_it_holds():
    # digits-cnn-clean (no focus: every input tested), D of 200 images: its thresholds hold
    # 2 / 201. Its test set's flags are within that; noisy digits (not like D) are not.
    folder = SAMPLES / "digits-cnn-clean"
    res = mmexport.detect(folder / "model.onnx", folder / "clean.npz")
    held = res.report.false_positive_guarantee
    assert held == pytest.approx(2 / 201) and res.report.focus["class"] is None
    test = mmexport.load_npz(folder / "test.npz")
    rep = mmexport.validate(res.model, test, provider="cpu")
    assert rep.false_positive_guarantee == pytest.approx(held) and rep.false_positive_p_value > 0.05
    noisy = test.x + np.random.default_rng(0).normal(0.0, 0.3, test.x.shape).astype(np.float32)
    drift = mmexport.validate(res.model, Dataset(noisy, test.y), provider="cpu")
    assert drift.false_positive_rate > 3 * held and drift.false_positive_p_value < 0.05


@pytest.fixture
def tiny_files(tmp_path, tiny_set):
    proto, x, y, bounds = tiny_set
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    (tmp_path / "b.json").write_text(bounds.dumps())
    return tmp_path


def test_cli_detect_writes_the_model_and_its_bounds_and_prints_json(tiny_files):
    r = run("detect", tiny_files / "m.onnx", "--data", tiny_files / "clean.npz", "--bounds",
            tiny_files / "b.json", "--no-augment", "--json", "-q", "--statistic", "margin")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert rep["method"] == "mmdf" and rep["null"]["law"] == "conformal"
    out = tiny_files / "m.mmdf.onnx"
    assert rep["written"] == {"model": str(out), "bounds": str(out) + ".bounds.json"}
    assert [o.name for o in onnx.load(out).graph.output] == ["logits", DETECTED, SCORE]
    r = run("validate", out, "--data", tiny_files / "clean.npz", "--json", "--provider", "cpu")
    assert r.exit_code == 0, r.output
    fpr = json.loads(r.output)["false_positive_rate"]
    assert fpr == pytest.approx(rep["false_positive_rate_clean_set"])


def test_cli_detect_says_what_false_positive_rate_its_thresholds_hold(tiny_files):
    # The tiny clean set has far fewer than 1 / alpha images: the conformal threshold is the
    # largest image score, and the summary, the report and the metadata say what that holds.
    r = run("detect", tiny_files / "m.onnx", "--data", tiny_files / "clean.npz", "--bounds",
            tiny_files / "b.json", "--statistic", "margin", "--alpha", "0.01")
    assert r.exit_code == 0, r.output
    n = len(np.load(tiny_files / "clean.npz")["y"])
    text = " ".join(r.output.split())
    assert f"flags a new clean image with probability <= {1 / (n + 1):.3g}, not the 0.01 asked" in text
    assert f"D has {n} images; that takes 99" in text
    meta = get_metadata(onnx.load(tiny_files / "m.mmdf.onnx"))
    assert float(meta["mmexport.mmdf.guarantee"]) == pytest.approx(1 / (n + 1))
    r = run("detect", tiny_files / "m.onnx", "--data", tiny_files / "clean.npz", "--bounds",
            tiny_files / "b.json", "--alpha", "0.2", "--law", "gaussian", "--json", "-q", "--force")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["false_positive_guarantee"] is None


def test_cli_inspect_reads_an_mmdf_model_through_its_logits(tiny_files):
    r = run("detect", tiny_files / "m.onnx", "--data", tiny_files / "clean.npz", "--bounds",
            tiny_files / "b.json", "-q", "--no-bounds-file", "--avoid", "2")  # focus on class 2: gated
    assert r.exit_code == 0, r.output
    r = run("inspect", tiny_files / "m.mmdf.onnx", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["output"] == "logits"
    # The engine runs no ONNX If: the gated graph cannot be verified, and says so in one line.
    r = run("inspect", tiny_files / "m.mmdf.onnx", "--verify")
    assert r.exit_code == 1 and "unsupported ops" in r.output and "If (node 'mmdf/gated/if')" in r.output
    assert len(r.output.strip().splitlines()) == 1


@pytest.mark.parametrize("value, expected", [("none", None), ("2", 2)])
def test_cli_detect_avoid(tiny_files, value, expected):
    r = run("detect", tiny_files / "m.onnx", "--data", tiny_files / "clean.npz", "--bounds",
            tiny_files / "b.json", "--json", "-q", "--avoid", value)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["avoid"]["class"] == expected
    assert json.loads(r.output)["focus"]["class"] == expected


def test_cli_detect_no_focus(tiny_files):
    r = run("detect", tiny_files / "m.onnx", "--data", tiny_files / "clean.npz", "--bounds",
            tiny_files / "b.json", "--json", "-q", "--avoid", "2", "--no-focus")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["focus"] == {"class": None, "reason": "no suspected target"}


def test_cli_detect_avoid_bad_value_is_an_error(tiny_files):
    r = run("detect", tiny_files / "m.onnx", "--data", tiny_files / "clean.npz", "-q", "--avoid", "target")
    assert r.exit_code != 0 and "expected scan, none or a class number" in r.output
    r = run("detect", tiny_files / "m.onnx", "--data", tiny_files / "clean.npz", "-q", "--avoid", "5")
    assert r.exit_code == 1 and "--avoid: 5: not one of the model's 3 classes" in r.output
    assert not (tiny_files / "m.mmdf.onnx").exists()


def test_cli_detect_needs_force_to_overwrite(tiny_files):
    args = ("detect", tiny_files / "m.onnx", "--data", tiny_files / "clean.npz", "-q", "-o",
            tiny_files / "o.onnx", "--no-bounds-file")
    assert run(*args).exit_code == 0
    r = run(*args)
    assert r.exit_code == 1 and "use --force" in r.output
    assert run(*args, "--force").exit_code == 0


def test_cli_detect_unknown_site_bounds_is_a_one_line_error(tiny_files):
    (tiny_files / "bad.json").write_text(json.dumps({"bounds": {"nope": 1.0}}))
    r = run("detect", tiny_files / "m.onnx", "--data", tiny_files / "clean.npz", "--bounds",
            tiny_files / "bad.json", "-q")
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and "'nope' is not a site" in lines[0]
    assert not (tiny_files / "m.mmdf.onnx").exists()
