"""onnxruntime sessions, batched inference and the validation metrics."""

import numpy as np
import onnx
import pytest
from builders import conv_net, identity_classifier

from mmexport import runtime
from mmexport.core.data import Dataset, load_npz, save_npz
from mmexport.core.errors import MmexportError
from mmexport.runtime.latency import latency, latency_pair
from mmexport.runtime.metrics import ValidationReport, validate
from mmexport.runtime.sessions import predict, session

needs_no_cuda = pytest.mark.skipif(
    runtime.cuda_problem() == "", reason="CUDA works here: the fallback cannot be seen"
)


def logits_for(pred, classes=3) -> np.ndarray:
    """Samples the identity classifier assigns to `pred`."""
    return np.eye(classes, dtype=np.float32)[np.asarray(pred)]


def test_cpu_session_reports_cpu():
    sess, used = session(identity_classifier(), provider="cpu")
    assert used == "cpu"
    assert sess.get_providers() == ["CPUExecutionProvider"]


@needs_no_cuda
def test_auto_falls_back_to_cpu_when_cuda_cannot_run():
    _, used = session(identity_classifier(), provider="auto")
    assert used == "cpu"


@needs_no_cuda
def test_cuda_request_that_cannot_run_is_an_error():
    with pytest.raises(MmexportError, match="CUDA provider requested but unavailable"):
        session(identity_classifier(), provider="cuda")


def test_unknown_provider_is_an_error():
    with pytest.raises(MmexportError, match="'tpu'"):
        session(identity_classifier(), provider="tpu")


def test_session_from_path_and_missing_or_broken_files(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(identity_classifier(), path)
    assert session(path, provider="cpu")[1] == "cpu"
    with pytest.raises(MmexportError, match="nope.onnx: no such file"):
        session(tmp_path / "nope.onnx", provider="cpu")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(MmexportError, match="bad.onnx: onnxruntime cannot load"):
        session(tmp_path / "bad.onnx", provider="cpu")


def test_predict_in_batches_equals_one_run():
    sess, _ = session(conv_net(), provider="cpu")
    x = np.random.default_rng(0).normal(size=(10, 2, 6, 6)).astype(np.float32)
    whole = predict(sess, x, batch_size=64)
    assert whole.shape == (10, 3) and whole.dtype == np.float32
    np.testing.assert_allclose(predict(sess, x, batch_size=3), whole, rtol=1e-6, atol=1e-6)


def test_predict_pads_the_last_batch_of_a_fixed_batch_model():
    sess, _ = session(identity_classifier(batch=4), provider="cpu")
    x = logits_for([0, 1, 2, 0, 1, 2, 2])
    np.testing.assert_array_equal(predict(sess, x), x)


def test_predict_unknown_output_name_is_an_error():
    sess, _ = session(identity_classifier(), provider="cpu")
    with pytest.raises(MmexportError, match="no model output named 'probs'"):
        predict(sess, logits_for([0]), output_name="probs")


def test_validate_accuracy_balanced_and_per_class():
    # class 0: 3 of 4 right; class 1: 1 of 2 right; class 2: absent.
    y = np.array([0, 0, 0, 0, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 0])
    report = validate(identity_classifier(), Dataset(logits_for(pred), y), provider="cpu")
    assert report.n == 6
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.per_class_accuracy == [pytest.approx(0.75), pytest.approx(0.5), None]
    assert report.balanced_accuracy == pytest.approx(0.625)
    assert report.num_classes == 3
    assert report.provider == "cpu"
    assert report.asr is None and report.ra is None and report.n_attack is None
    assert report.images_per_s > 0


def test_validate_asr_and_ra_skip_samples_already_of_the_target():
    clean = Dataset(logits_for([0, 1, 2]), np.array([0, 1, 2]))
    # target 2 for all; the last sample's true class is 2 and does not count.
    y_true = np.array([0, 0, 1, 1, 0, 2])
    pred = np.array([2, 2, 1, 0, 0, 2])
    attack = Dataset(logits_for(pred), np.full(6, 2), y_true)
    report = validate(identity_classifier(), clean, attack=attack, provider="cpu")
    assert report.n_attack == 5
    assert report.asr == pytest.approx(2 / 5)
    assert report.ra == pytest.approx(2 / 5)  # samples 3 and 5 keep their class
    assert report.accuracy == 1.0


def test_validate_takes_npz_paths_and_pairs_as_harden_does(tmp_path):
    y_true = np.array([0, 0, 1, 1, 0, 2])
    pred = np.array([2, 2, 1, 0, 0, 2])
    save_npz(tmp_path / "clean.npz", Dataset(logits_for([0, 1, 2]), np.array([0, 1, 2])))
    np.savez(tmp_path / "attack.npz", x=logits_for(pred), y=np.full(6, 2), y_true=y_true)
    report = validate(identity_classifier(), tmp_path / "clean.npz",
                      attack=str(tmp_path / "attack.npz"), provider="cpu")
    assert report.accuracy == 1.0 and report.asr == pytest.approx(2 / 5)
    pair = validate(identity_classifier(), (logits_for([0, 1]), np.array([0, 0])), provider="cpu")
    assert pair.accuracy == pytest.approx(0.5)
    np.savez(tmp_path / "no_truth.npz", x=logits_for(pred), y=np.full(6, 2))
    with pytest.raises(MmexportError, match="y_true"):
        validate(identity_classifier(), tmp_path / "clean.npz", attack=tmp_path / "no_truth.npz",
                 provider="cpu")


def test_attack_set_needs_true_labels():
    clean = Dataset(logits_for([0]), np.array([0]))
    with pytest.raises(MmexportError, match="y_true"):
        validate(identity_classifier(), clean, attack=clean, provider="cpu")


def test_shape_mismatch_names_the_data_and_model_files(tmp_path):
    model_path = tmp_path / "classifier.onnx"
    onnx.save(identity_classifier(), model_path)
    save_npz(tmp_path / "clean.npz", Dataset(np.zeros((2, 4), np.float32), np.array([0, 1])))
    with pytest.raises(MmexportError) as err:
        validate(model_path, load_npz(tmp_path / "clean.npz"), provider="cpu")
    message = str(err.value)
    assert "clean.npz" in message and "classifier.onnx" in message
    assert "(N, 3)" in message and "\n" not in message


def test_label_outside_the_classes_is_an_error():
    with pytest.raises(MmexportError, match="outside 0..2"):
        validate(identity_classifier(), Dataset(logits_for([0]), np.array([5])), provider="cpu")


def test_report_json_has_the_metric_keys_and_reloads():
    report = validate(
        identity_classifier(), Dataset(logits_for([0, 1]), np.array([0, 1])), provider="cpu"
    )
    obj = report.to_json()
    for key in (
        "accuracy",
        "balanced_accuracy",
        "per_class_accuracy",
        "asr",
        "ra",
        "n",
        "n_attack",
        "provider",
        "images_per_s",
        "detection_rate",
        "false_positive_rate",
    ):
        assert key in obj
    assert ValidationReport.from_json(obj) == report


def test_latency_reports_sane_numbers():
    x = np.zeros((4, 2, 6, 6), np.float32)
    stats = latency(conv_net(), x, runs=5, warmup=1, provider="cpu")
    assert stats["runs"] == 5 and stats["batch"] == 4 and stats["provider"] == "cpu"
    assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p95_ms"] < 1000


def test_latency_pair_times_both_models_on_one_provider():
    x = np.zeros((4, 2, 6, 6), np.float32)
    a, b = latency_pair(conv_net(), conv_net(seed=3), x, runs=4, warmup=1, provider="cpu")
    assert a["runs"] == b["runs"] == 4
    assert a["provider"] == b["provider"] == "cpu"
    assert a["median_ms"] > 0 and b["median_ms"] > 0


@needs_no_cuda
def test_cuda_failure_seen_at_session_creation_is_remembered(monkeypatch):
    monkeypatch.setattr(runtime.sessions, "_cuda_problem", "")  # as if the libraries had loaded
    _, used = session(identity_classifier(), provider="auto")
    assert used == "cpu"
    assert runtime.cuda_problem() != ""
