"""benchmarks/seeds_table.py: the real tier's defaults over seeds, from bench_peers' JSON."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import seeds_table  # noqa: E402


def _row(acc, asr=None, detection=None, fpr=None):
    return {"acc": acc, "asr": asr, "detection": detection, "fpr": fpr}


def _write(folder: Path, seed: int, mmac_asr: float, *, mmdf: bool = True, only: str | None = None):
    (folder / "peers").mkdir(parents=True)
    models = {
        "bd-a": {"none": _row(0.90, 0.99), "mmac": _row(0.88, mmac_asr)},
        "bd-b": {"none": _row(0.80, 1.0), "mmac": _row(0.79, 0.02)},
        "clean": {"none": _row(0.95), "mmac": _row(0.94)},
    }
    if mmdf:
        models["bd-a"]["mmdf"] = _row(0.89, 0.0, 0.99, 0.01)
    if only:
        models = {only: models[only]}
    for name, rows in models.items():
        (folder / "peers" / f"{name}.json").write_text(json.dumps({"seed": seed, "rows": rows}))


def test_the_table_aggregates_each_seed_and_their_mean(tmp_path):
    _write(tmp_path / "s0", 0, 0.10)
    _write(tmp_path / "s1", 1, 0.00, mmdf=False)
    _write(tmp_path / "s2", 2, 0.50, mmdf=False, only="bd-a")  # a seed run on fewer models is not averaged in
    runs = dict(seeds_table.load(tmp_path / f) for f in ("s0", "s1", "s2"))
    a = seeds_table.aggregates(runs[0], "mmac")
    assert a["models"] == 2 and a["met"] == 1 and a["worst"] == pytest.approx(0.10)
    assert a["drop"] == pytest.approx(0.015) and a["asr"] == pytest.approx(0.06)
    assert a["clean_drop"] == [pytest.approx(0.01)]
    text = seeds_table.table(runs)
    assert "| mmac | mean of 2 | 2 | 1.5 | 3.5 | 6.0 | | |" in text
    assert "| mmac | 2 | 1 | 2.0 | 50.0 | 50.0 | 0 / 1 | - |" in text
    assert "| mmdf | mean of" not in text  # MMDF ran at seed 0 only
    assert "89.0 / 0.0 (99.0 / 1.0)" in text and "not run" in text  # bd-b has no mmdf row


def test_a_folder_with_two_seeds_is_refused(tmp_path):
    _write(tmp_path / "s0", 0, 0.1)
    (tmp_path / "s0" / "peers" / "other.json").write_text(json.dumps({"seed": 1, "rows": {}}))
    with pytest.raises(SystemExit, match="expected one seed"):
        seeds_table.load(tmp_path / "s0")
