"""mmac-ft: MMAC, then a found stamp unlearned in the hardened graph's weights."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import run_cli
from onnx import numpy_helper

import mmexport
from mmexport.core.data import load_npz
from mmexport.core.model import from_proto
from mmexport.defences.common.weights import trainable
from mmexport.defences.harden import method_config, method_name
from mmexport.engine.executor import Engine
from mmexport.graph.rewrite import bound_tensors
from mmexport.runtime.metrics import validate

SAMPLE = Path(__file__).resolve().parents[1] / "sample_models" / "digits-cnn-badnet"
# A shorter schedule than the defaults that still finds the sample's stamp.
QUICK = dict(unlearn_epochs=40, probe_steps=10, ft_epochs=8, threads=1)


def _inits(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


@pytest.fixture(scope="module")
def hardened():
    mmac = mmexport.harden(SAMPLE / "model.onnx", SAMPLE / "clean.npz", **QUICK)
    ft = mmexport.harden(SAMPLE / "model.onnx", SAMPLE / "clean.npz", method="mmac-ft", **QUICK)
    return mmac, ft


def test_the_weights_unlearn_the_stamp_and_the_graph_and_bounds_stay(hardened):
    mmac, ft = hardened
    assert mmac.report.stamp["found"] and ft.report.method == "mmac-ft"
    info = ft.report.finetune
    assert info["epochs"] == 8 and info["stamped_rows"] == 180 and info["rows"] == 380
    assert info["stamped_to_target"][1] < info["stamped_to_target"][0]
    # Same bounds, same graph: only weights moved, and never the bounds' own tensors.
    assert {k: v.tolist() for k, v in ft.bounds.items()} == {k: v.tolist() for k, v in mmac.bounds.items()}
    assert [(n.op_type, list(n.input), list(n.output)) for n in ft.model.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in mmac.model.graph.node]
    a, b = _inits(mmac.model), _inits(ft.model)
    assert set(a) == set(b)
    moved = {k for k in a if not np.array_equal(a[k], b[k])}
    assert moved and not moved & bound_tensors(ft.model)
    meta = {p.key: p.value for p in ft.model.metadata_props}
    assert meta["mmexport.method"] == "mmac-ft" and meta["mmexport.weights"].startswith("fine-tuned: ")
    assert json.loads(meta["mmexport.settings"])["finetune"] is True


def test_the_real_trigger_goes_at_a_small_cost_in_accuracy(hardened):
    mmac, ft = hardened
    test, attack = load_npz(SAMPLE / "test.npz"), load_npz(SAMPLE / "attack.npz", attack=True)
    before = validate(SAMPLE / "model.onnx", test, attack=attack, provider="cpu")
    bounds_only = validate(mmac.model, test, attack=attack, provider="cpu")
    tuned = validate(ft.model, test, attack=attack, provider="cpu")
    assert tuned.asr <= 0.05 < bounds_only.asr  # the bounds alone leave 16% on this sample
    assert tuned.accuracy >= before.accuracy - 0.04


def test_mmdf_backs_the_fine_tuned_model_as_harden_wrote_it(hardened):
    _, ft = hardened
    res = mmexport.detect(SAMPLE / "model.onnx", SAMPLE / "clean.npz", serve=ft.model, threads=1)
    assert res.report.served["method"] == "mmac-ft" and res.report.avoid["class"] == 0  # the target
    test, attack = load_npz(SAMPLE / "test.npz"), load_npz(SAMPLE / "attack.npz", attack=True)
    alone = validate(ft.model, test, attack=attack, provider="cpu")
    stacked = validate(res.model, test, attack=attack, provider="cpu")
    # Only flagged rows can differ from the fine-tuned model, and they never go to the target.
    assert abs(stacked.accuracy - alone.accuracy) <= stacked.false_positive_rate + 1e-9
    assert stacked.asr <= alone.asr and stacked.detection_rate > 0.9


def test_no_stamp_no_fine_tune(hardened):
    mmac, _ = hardened
    # no stamp stands out, and the scan (which names this sample's target) is not asked
    gate = dict(QUICK, unlearn="stamp", unlearn_gate=1e9, restarts=3, warmup_steps=10, steps=2, max_epochs=10)
    ft = mmexport.harden(SAMPLE / "model.onnx", SAMPLE / "clean.npz", method="mmac-ft", **gate)
    plain = mmexport.harden(SAMPLE / "model.onnx", SAMPLE / "clean.npz", **gate)
    assert not ft.report.stamp["found"] and ft.report.finetune is None
    a, b = _inits(plain.model), _inits(ft.model)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert "mmexport.weights" not in {p.key for p in ft.model.metadata_props}


def test_the_method_names_and_the_trainable_tensors():
    assert method_config("mmac-ft").finetune and not method_config("mmac").finetune
    assert method_name(method_config("mmac-ft")) == "mmac-ft"
    with pytest.raises(mmexport.ParameterError, match="ft_epochs"):
        mmexport.MmacConfig(ft_epochs=0)
    with pytest.raises(mmexport.ParameterError, match="ft_lr"):
        mmexport.MmacConfig(ft_lr=0.0)
    proto = onnx.load(SAMPLE / "model.onnx")
    engine = Engine(from_proto(proto))
    every = trainable(engine, proto)
    assert set(every) == {i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    one = next(iter(every))
    assert one not in trainable(engine, proto, frozen={one})


def test_the_cli_says_what_the_fine_tune_did(tmp_path):
    out, settings = tmp_path / "ft.onnx", tmp_path / "quick.json"
    settings.write_text(json.dumps({"unlearn_epochs": 20, "probe_steps": 10}))
    res = run_cli("harden", SAMPLE / "model.onnx", "--data", SAMPLE / "clean.npz", "--method", "mmac-ft",
                  "--ft-epochs", "2", "--threads", "1", "-o", out, "--settings", settings)
    assert res.exit_code == 0, res.output
    assert "weights fine-tuned (2 epochs" in res.output and out.exists()


def test_the_plan_prices_the_fine_tune_beside_the_search():
    from mmexport.defences.harden import plan

    ft = plan(SAMPLE / "model.onnx", SAMPLE / "clean.npz", method="mmac-ft", threads=1)
    plain = plan(SAMPLE / "model.onnx", SAMPLE / "clean.npz", threads=1)
    assert plain.finetune_seconds is None and "finetune_seconds" not in plain.to_json()
    # 20 epochs of 200 rows of D and 180 stamped, 1.5 passes each, at the counted cost per row.
    assert ft.finetune_seconds == pytest.approx(1.5 * 20 * 380 * ft.cost.backward_seconds)
    assert ft.config == replace(plain.config, finetune=True) and ft.planned_seconds == plain.planned_seconds


def test_the_scans_shift_unlearned_in_the_weights_removes_a_blend():
    """A blend has no stamp of bounded area; the scan's L2 universal perturbation toward its
    target is its stand-in (measured: ASR 99.5% -> 7.7% on this sample, 84% of D moved)."""
    import torch

    from mmexport.core.model import load_model
    from mmexport.defences.common.margins import input_box
    from mmexport.defences.mmac.finetune import unlearn_weights
    from mmexport.defences.mmac.unlearn import Stamp
    from mmexport.defences.mmbd.scan import universal_gain

    torch.set_num_threads(1)
    blend = SAMPLE.parent / "digits-cnn-blend"
    target = json.loads((blend / "card.json").read_text())["attack"]["target"]
    model = load_model(blend / "model.onnx")
    clean = load_npz(blend / "clean.npz")
    x, y = torch.from_numpy(clean.x), torch.from_numpy(clean.y)
    attack = torch.from_numpy(np.load(blend / "attack.npz")["x"])
    box, keep = input_box(x), {}
    engine = Engine(model)
    universal_gain(engine, box, x, y, 10, norm="l2", budget=0.05, steps=100, batch=20,
                   generator=torch.Generator().manual_seed(1), keep=keep)
    assert keep["fooled"][target] >= 0.5
    stand_in = Stamp(target=target, margins=[], fooled=[], outlier=0.0, found=True, mask=torch.zeros(1),
                     pattern=torch.zeros(1), shift=keep["delta"][target], box=box, use_stamp=False)

    def asr() -> float:
        with torch.no_grad():
            return float((engine(attack).argmax(1) == target).float().mean())

    before = asr()
    _, info = unlearn_weights(engine, model.proto, x, y, stand_in, None, mmexport.MmacConfig())
    assert info["rows"] == len(x) + int((y != target).sum()) == len(x) + info["stamped_rows"]
    assert info["stamped_to_target"][1] < 0.1 < 0.5 <= info["stamped_to_target"][0]
    assert asr() < 0.3 < 0.9 < before and info["accuracy_D"][1] >= info["accuracy_D"][0] - 0.03
