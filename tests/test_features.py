"""The feature test of MMDF: class-conditional Gaussians of site channel means."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import labelled_set, tiny_cnn
from builders import run_cli as run

import mmexport
from mmexport.core.errors import MmexportError
from mmexport.core.model import from_proto
from mmexport.defences.common.stats import fold_ids
from mmexport.defences.mmdf.config import FOLDS
from mmexport.defences.mmdf.detector import detect
from mmexport.defences.mmdf.features import channel_stats, fit_features, fit_site, site_feature_arrays
from mmexport.defences.mmdf.graph import DETECTED, FEATURE_SCORE, SCORE
from mmexport.runtime.sessions import session

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"


def ort(proto, x):
    sess, _ = session(proto, provider="cpu")
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, {sess.get_inputs()[0].name: x}), strict=True))


def gaussian_data(seed=0, n=60, c=6, k=3):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = rng.normal(0, 3, (k, c))
    mix = rng.normal(0, 1, (c, c))
    return centres[y] + rng.normal(0, 1, (n, c)) @ mix, y


@pytest.fixture(scope="module")
def tiny_set():
    proto = tiny_cnn(seed=3)
    x, y = labelled_set(proto, 10, seed=1)
    return proto, x, y


def test_full_rank_score_is_the_mahalanobis_distance_under_the_shrunk_covariance():
    f, y = gaussian_data()
    g = fit_site("s", f, y, 3, rank=100, shrink=0.1)
    means = np.stack([f[y == c].mean(0) for c in range(3)])
    r = f - means[y]
    cov = r.T @ r / len(f)
    cov = 0.9 * cov + 0.1 * np.trace(cov) / len(cov) * np.eye(len(cov))
    d = f - means[y]
    want = np.einsum("ij,jk,ik->i", d, np.linalg.inv(cov), d)
    # Within the half-precision rounding of the basis the graph stores.
    np.testing.assert_allclose(g.score(f, y), want, rtol=2e-3)
    assert np.abs(g.score(f, y) / want - 1).max() > 0  # rounded, not the float64 basis


def test_the_basis_is_scored_as_stored_in_half_precision():
    f, y = gaussian_data()
    g = fit_site("s", f, y, 3, rank=4)
    np.testing.assert_array_equal(g.basis.astype(np.float16).astype(np.float64), g.basis)


def test_low_rank_score_keeps_the_leading_directions_and_the_mean_variance_of_the_rest():
    f, y = gaussian_data(c=8)
    full, low = fit_site("s", f, y, 3, rank=8), fit_site("s", f, y, 3, rank=3)
    assert low.basis.shape == (8, 3)
    np.testing.assert_allclose(low.basis.T @ low.basis, np.eye(3), atol=2e-3)
    np.testing.assert_allclose(low.inv_var, full.inv_var[:3])
    assert low.inv_tail == pytest.approx(1 / np.mean(1 / full.inv_var[3:]))
    assert np.all(low.score(low.means[[0, 1, 2]], np.arange(3)) == 0)


def test_cross_fitted_null_scores_each_image_without_its_own_fold():
    f, y = gaussian_data()
    folds = fold_ids(y, 5, 0)
    fit = fit_features({"s": f}, y, y, 3, folds)
    out = folds == 0
    g = fit_site("s", f[~out], y[~out], 3)
    want = g.score(f[out], y[out]) / fit.sites[0].scale
    np.testing.assert_allclose(fit.null[out], want)
    # Each site's scores are divided by their 0.9 quantile on D.
    assert np.quantile(fit.null, 0.9) == pytest.approx(1.0)
    full = fit_site("s", f, y, 3)
    np.testing.assert_allclose(fit.sites[0].means, full.means)


def test_channel_stats_are_the_means_spreads_and_skews_over_the_trailing_axes():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 2, 2) ** 1.5
    a[0, 0] = [[0.0, 0.0], [0.0, 8.0]]  # one lopsided channel: third central moment 3 * 2^3
    stats = channel_stats(a)
    assert stats.shape == (2, 9)
    np.testing.assert_allclose(stats[:, :3], a.mean(axis=(2, 3)), rtol=1e-6)
    np.testing.assert_allclose(stats[:, 3:6], a.std(axis=(2, 3)), rtol=1e-5)
    assert stats[0, 6] == pytest.approx(np.cbrt(((0 - 2) ** 3 * 3 + (8 - 2) ** 3) / 4))
    # A site without spatial axes keeps its values.
    np.testing.assert_array_equal(channel_stats(a[:, :, 0, 0]), a[:, :, 0, 0])


@pytest.mark.parametrize("focus", [None, 1])
def test_graph_feature_score_is_the_largest_site_score_minus_its_threshold(tiny_set, focus):
    proto, x, y = tiny_set
    res = detect(proto, (x, y), augment=False, avoid=focus)
    assert res.report.focus["class"] == focus
    # Gated by default: on the focus class, or without one on the screen.
    assert res.report.gated and ("threshold" in res.report.screen) == (focus is None)
    assert res.report.calibration["feature_folds"] == FOLDS
    m = from_proto(proto)
    feats, logits = site_feature_arrays(proto, m.sites, x, input_name=m.input_name,
                                        output_name=m.output_name)
    fit = res.report.features
    assert [s["site"] for s in fit["sites"]] == ["r1", "r2"]
    # Recompute the scores with the fitted Gaussians the graph holds: against each input's
    # predicted class, or with a focus against the focus class (the only means stored).
    again = fit_features(feats, y, logits.argmax(1), 3, fold_ids(y, FOLDS, 0))
    against = logits.argmax(1) if focus is None else np.full(len(x), focus)
    want = np.max([g.score(feats[g.site], against) for g in again.sites], axis=0)
    out = ort(res.model, x)
    stored = [i for i in res.model.graph.initializer if "means" in i.name]
    assert len(stored) == 1 and ("focus" in stored[0].name) == (focus is not None)
    # Both sites' means side by side; with a focus only that class's row.
    assert list(stored[0].dims) == [3 if focus is None else 1, sum(g.means.shape[1] for g in again.sites)]
    tested = np.ones(len(x), bool) if focus is None else logits.argmax(1) == focus
    assert (np.isnan(out[FEATURE_SCORE]) == ~tested).all()  # the focus gate scores no others
    np.testing.assert_allclose(out[FEATURE_SCORE][tested] + fit["threshold"], want[tested], rtol=1e-4, atol=1e-4)
    flagged = (out[SCORE] > 0) | (out[FEATURE_SCORE] > 0)
    np.testing.assert_array_equal(out[DETECTED], flagged & tested)


@pytest.mark.parametrize("opset", [9, 12, 18])
def test_graph_feature_score_at_old_and_new_opsets(opset):
    # Split takes its sizes as an attribute before opset 13, ReduceSumSquare and ReduceMax
    # their axes as an input from 18; below 11 the graph is not gated.
    proto = tiny_cnn(seed=3, opset=opset)
    x, y = labelled_set(proto, 10, seed=1)
    res = detect(proto, (x, y), augment=False, avoid=None)
    m = from_proto(proto)
    feats, logits = site_feature_arrays(proto, m.sites, x, input_name=m.input_name,
                                        output_name=m.output_name)
    again = fit_features(feats, y, logits.argmax(1), 3, fold_ids(y, FOLDS, 0))
    want = np.max([g.score(feats[g.site], logits.argmax(1)) for g in again.sites], axis=0)
    out = ort(res.model, x)
    assert res.model.opset_import[0].version == opset
    np.testing.assert_allclose(out[FEATURE_SCORE] + res.report.features["threshold"], want,
                               rtol=1e-4, atol=1e-4)


def test_the_feature_test_costs_few_nodes_per_site():
    # Per site with spatial axes: three pools and the centred powers (6), the basis cast to
    # float, the projection, its way back, the rest and its norm (5), and maybe the site's
    # piece of the split; everything else runs once for all sites (was 24 per site).
    folder = SAMPLES / "digits-resnet-badnet"
    res = mmexport.detect(folder / "model.onnx", folder / "clean.npz", avoid=None)
    sites = res.report.features["sites"]
    names = [n.output[0] for n in res.model.graph.node]
    names += [n.output[0] for node in res.model.graph.node for a in node.attribute
              if a.type == onnx.AttributeProto.GRAPH for n in a.g.node]
    for i in range(len(sites)):
        assert sum(name.startswith(f"mmdf/f{i}/") for name in names) <= 12, sites[i]["site"]
    assert sum(name.startswith("mmdf/features/") for name in names) <= 20


def test_an_input_far_from_every_class_is_flagged_by_the_feature_test(tiny_set):
    proto, x, y = tiny_set
    res = detect(proto, (x, y), augment=False, avoid=None)  # every input tested
    far = (x * 4.0).astype(np.float32)
    out = ort(res.model, far)
    assert out[FEATURE_SCORE].min() > 0 and out[DETECTED].all()


def test_margin_statistic_writes_the_paper_graph_without_a_feature_output(tiny_set):
    proto, x, y = tiny_set
    res = detect(proto, (x, y), augment=False, statistic="margin")
    assert [o.name for o in res.model.graph.output] == ["logits", DETECTED, SCORE]
    assert res.report.features is None and res.report.statistic == "margin"


def test_unknown_statistic_is_a_one_line_error(tiny_set):
    proto, x, y = tiny_set
    with pytest.raises(MmexportError, match="statistic: 'energy'") as err:
        detect(proto, (x, y), statistic="energy")
    assert "\n" not in str(err.value)


def test_cli_statistic_option(tmp_path, tiny_set):
    proto, x, y = tiny_set
    onnx.save(proto, tmp_path / "m.onnx")
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    r = run("detect", tmp_path / "m.onnx", "--data", tmp_path / "clean.npz", "-q", "--json",
            "--no-bounds-file")
    assert r.exit_code == 0, r.output
    out = onnx.load(tmp_path / "m.mmdf.onnx")
    assert [o.name for o in out.graph.output] == ["logits", DETECTED, SCORE, FEATURE_SCORE]
    r = run("detect", tmp_path / "m.onnx", "--data", tmp_path / "clean.npz", "--statistic", "nope")
    assert r.exit_code != 0 and "nope" in r.output


def test_feature_test_catches_the_global_trigger_the_margin_test_misses():
    folder = SAMPLES / "digits-resnet-chessboard"
    test = mmexport.load_npz(folder / "test.npz")
    attack = mmexport.load_npz(folder / "attack.npz", attack=True)
    rates = {}
    for statistic in ("margin", "margin+features"):
        res = detect(folder / "model.onnx", folder / "clean.npz", statistic=statistic, avoid=None)
        rep = mmexport.validate(res.model, test, attack=attack, provider="cpu")
        rates[statistic] = rep
    assert rates["margin"].detection_rate < 0.5
    with_features = rates["margin+features"]
    assert with_features.detection_rate >= 0.95 and with_features.asr <= 0.02
    assert with_features.false_positive_rate <= 0.01


def test_feature_test_calibrated_with_shifts_keeps_false_positives_low_on_shifted_images():
    # Fitted on D without its shifts, the Gaussians flagged 28% of 1-pixel-shifted clean test
    # images of this model; with them (the default, as the margin test) about 2%.
    from mmexport.core.data import Dataset
    from mmexport.defences.mmdf.bounds import shifted

    folder = SAMPLES / "digits-cnn-sig"
    test = mmexport.load_npz(folder / "test.npz")
    moved = Dataset(shifted(test.x)[len(test) :], np.tile(test.y, 4))
    res = detect(folder / "model.onnx", folder / "clean.npz", avoid=None)
    assert res.report.calibration["augment"]
    rep = mmexport.validate(res.model, moved, provider="cpu")
    assert rep.false_positive_rate <= 0.04
