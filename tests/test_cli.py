"""The command line: one-line errors for bad input, JSON output, safe writes."""

import json

import numpy as np
import onnx
import pytest
from builders import assert_one_line_error, two_input_model, unsupported_model, write_tiny
from builders import run_cli as run


@pytest.fixture
def tiny(tmp_path):
    _, path, data, _, _ = write_tiny(tmp_path)
    return path, data


def test_inspect_json_lists_sites_and_verifies(tiny):
    path, _ = tiny
    result = run("inspect", path, "--verify", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert [s["name"] for s in info["sites"]] == ["r1", "r2"]
    assert [s["channels"] for s in info["sites"]] == [4, 8]
    assert info["num_classes"] == 3 and info["opset"] == 13 and info["ir_version"] == 8
    assert info["unsupported_ops"] == []
    assert info["verify"]["passed"] and info["verify"]["provider"] == "cpu"
    assert info["verify"]["max_abs_diff"] < 1e-4


def test_inspect_plain_output_ends_with_a_verdict(tiny):
    result = run("inspect", tiny[0], "--verify")
    assert result.exit_code == 0
    assert "PASSED" in result.output


def test_non_onnx_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model")
    assert_one_line_error(run("inspect", bad), str(bad))


def test_truncated_file_is_a_one_line_error(tmp_path, tiny):
    data = tiny[0].read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("inspect", cut), str(cut))


def test_missing_file_is_a_one_line_error(tmp_path):
    assert_one_line_error(run("inspect", tmp_path / "nope.onnx"), "no such file")


def test_unsupported_ops_are_all_named_with_their_first_node(tmp_path):
    path = tmp_path / "unsup.onnx"
    onnx.save(unsupported_model(), path)
    result = run("inspect", path, "--json")
    assert result.exit_code == 0
    ops = {u["op"]: u["node"] for u in json.loads(result.output)["unsupported_ops"]}
    assert ops == {"TopK": "topk_node", "Hardmax": "hardmax_node"}
    assert_one_line_error(run("inspect", path, "--verify"), "TopK", "Hardmax", "topk_node")


def test_several_inputs_need_a_choice(tmp_path):
    path = tmp_path / "two.onnx"
    onnx.save(two_input_model(), path)
    assert_one_line_error(run("inspect", path), "--input", "a, b")
    assert run("inspect", path, "--input", "a", "--json").exit_code == 0


def test_harden_writes_model_bounds_and_provenance(tiny, tmp_path):
    path, data = tiny
    out = tmp_path / "hard.onnx"
    args = [
        "harden",
        path,
        "--data",
        data,
        "-o",
        out,
        "--max-epochs",
        "4",
        "--restarts",
        "2",
        "--steps",
        "2",
        "--seed",
        "1",
        "--json",
        "-q",
    ]
    result = run(*args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["sites"] == 2 and summary["seed"] == 1
    bounds = json.loads((tmp_path / "hard.onnx.bounds.json").read_text())
    assert set(bounds["bounds"]) == {"r1", "r2"}
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    assert meta["mmexport.method"] == "mmac" and meta["mmexport.seed"] == "1"
    assert len(meta["mmexport.source_sha256"]) == 64
    # an existing output is never overwritten without --force
    assert_one_line_error(run(*args), "exists", "--force")
    assert run(*args, "--force").exit_code == 0


def test_harden_search_options_reach_the_recorded_settings(tiny, tmp_path):
    path, data = tiny
    out = tmp_path / "area.onnx"
    r = run("harden", path, "--data", data, "-o", out, "--max-epochs", "2", "--restarts", "2",
            "--steps", "1", "--mask-area", "0.1", "--budget", "0.3", "-q", "--no-bounds-file")
    assert r.exit_code == 0, r.output
    meta = {p.key: p.value for p in onnx.load(out).metadata_props}
    settings = json.loads(meta["mmexport.settings"])
    assert settings["mask_area"] == 0.1 and settings["budget"] == 0.3


def test_harden_refuses_to_overwrite_its_input(tiny):
    path, data = tiny
    assert_one_line_error(run("harden", path, "--data", data, "-o", path, "--force", "-q"), "input")


def test_harden_rejects_data_of_the_wrong_shape(tiny, tmp_path):
    path, _ = tiny
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((6, 1, 5, 5), np.float32), y=np.array([0, 1, 2, 0, 1, 2]))
    assert_one_line_error(run("harden", path, "--data", bad, "-q"), str(bad), "do not match")
    assert not (tmp_path / "tiny.mmac.onnx").exists()


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        (dict(x=np.zeros((3, 1, 6, 6), np.float32), y=np.array([0, 1, 7])), "outside 0..2"),
        (dict(x=np.full((3, 1, 6, 6), np.nan, np.float32), y=np.array([0, 1, 2])), "NaN"),
        (dict(x=np.zeros((2, 1, 6, 6), np.float32), y=np.array([0, 1])), "no sample of class"),
        (dict(x=np.zeros((2, 1, 6, 6), np.float32)), "missing key 'y'"),
        (dict(x=np.zeros((2, 1, 6, 6), np.float32), y=np.array([{}, {}], dtype=object)), "pickle"),
    ],
)
def test_bad_clean_sets_are_one_line_errors(tiny, tmp_path, arrays, fragment):
    path, _ = tiny
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    assert_one_line_error(run("harden", path, "--data", bad, "-q"), fragment)


def test_empty_data_file_is_an_error(tiny, tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    assert_one_line_error(run("harden", tiny[0], "--data", empty, "-q"), "empty")


def test_model_without_sites_is_refused(tmp_path):
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "nosites",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    path = tmp_path / "nosites.onnx"
    onnx.save(m, path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.eye(3, dtype=np.float32), y=np.arange(3))
    assert_one_line_error(run("harden", path, "--data", data, "-q"), "no clipping sites")


def test_apply_then_validate(tiny, tmp_path):
    path, data = tiny
    bounds = tmp_path / "b.json"
    bounds.write_text(json.dumps({"bounds": {"r1": [0.5, 0.5, 0.5, 0.5], "r2": 1.0}}))
    out = tmp_path / "applied.onnx"
    result = run("apply", path, bounds, "-o", out)
    assert result.exit_code == 0, result.output
    rep = json.loads(run("validate", out, "--data", data, "--json").output)
    assert rep["provider"] == "cpu" and rep["n"] == 24
    assert 0.0 <= rep["accuracy"] <= 1.0 and len(rep["per_class_accuracy"]) == 3


def test_apply_rejects_bounds_for_unknown_sites(tiny, tmp_path):
    bounds = tmp_path / "b.json"
    bounds.write_text(json.dumps({"bounds": {"nope": 1.0}}))
    assert_one_line_error(run("apply", tiny[0], bounds, "-o", tmp_path / "o.onnx"), "nope")


def test_validate_reports_asr_and_ra(tiny, tmp_path):
    path, data = tiny
    d = np.load(data)
    attack = tmp_path / "attack.npz"
    np.savez(attack, x=d["x"], y=np.zeros_like(d["y"]), y_true=d["y"])
    rep = json.loads(run("validate", path, "--data", data, "--attack", attack, "--json").output)
    # the model labelled these inputs itself: everything keeps its true class
    assert rep["accuracy"] == 1.0 and rep["asr"] == 0.0 and rep["ra"] == 1.0


def test_attack_set_without_y_true_is_an_error(tiny, tmp_path):
    path, data = tiny
    attack = tmp_path / "attack.npz"
    d = np.load(data)
    np.savez(attack, x=d["x"], y=d["y"])
    assert_one_line_error(run("validate", path, "--data", data, "--attack", attack), "y_true")


# --- --settings: a run's settings from a JSON object (a report replays its run) ----------------


def test_a_reports_settings_replay_its_harden(tiny, tmp_path):
    path, data = tiny
    first = run("harden", path, "--data", data, "-o", tmp_path / "a.onnx", "--max-epochs", "4", "--restarts", "2",
                "--time-limit", "0", "--report", tmp_path / "a.json", "--json", "-q")
    assert first.exit_code == 0, first.output
    again = run("harden", path, "--data", data, "-o", tmp_path / "b.onnx", "--settings", tmp_path / "a.json",
                "--json", "-q")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "a.onnx.bounds.json").read_text() == (tmp_path / "b.onnx.bounds.json").read_text()
    assert json.loads(again.output)["settings"]["max_epochs"] == 4
    wins = run("harden", path, "--data", data, "-o", tmp_path / "c.onnx", "--settings", tmp_path / "a.json",
               "--max-epochs", "2", "--plan", "--json")
    assert json.loads(wins.output)["settings"]["max_epochs"] == 2  # the command line wins


@pytest.mark.parametrize("text,names", [("{\"bogus\": 1}", "bogus"), ("[1, 2]", "JSON object"),
                                        ("{not json", "not JSON"), ("{\"method\": \"mmom\"}", "--method mmom"),
                                        (None, "cannot read")])
def test_bad_settings_files_are_one_line_errors(tiny, tmp_path, text, names):
    path, data = tiny
    if text is not None:
        (tmp_path / "s.json").write_text(text)
    res = run("harden", path, "--data", data, "-o", tmp_path / "x.onnx", "--settings", tmp_path / "s.json")
    assert_one_line_error(res, names)
    assert not (tmp_path / "x.onnx").exists()
