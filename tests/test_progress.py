"""Progress where stderr is not a terminal (a log file, CliRunner): plain lines, one as each
stage starts and one every few epochs or seconds, with the epoch of how many, lambda, accuracy
on D and the time left."""

from __future__ import annotations

import pytest
from builders import run_cli as run
from builders import write_tiny

from mmexport.cli.progress import EVERY_SECONDS, Progress, duration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("progress")
    write_tiny(tmp)
    return tmp


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line]


def test_harden_logs_its_stages_and_every_tenth_epoch(tiny):
    result = run("harden", tiny / "tiny.onnx", "--data", tiny / "clean.npz", "-o", tiny / "h.onnx",
                 "--max-epochs", 20, "--restarts", 2, "--unlearn", "off", "--force")
    assert result.exit_code == 0, result.output
    log = [line for line in result.stderr.splitlines() if line.startswith("[MMAC]")]
    assert log[0] == "[MMAC] planning"
    assert log[1].startswith("[MMAC] schedule: as configured, about ") and "ms per row" in log[1]
    assert log[2] == "[MMAC] max-margin search"
    epochs = [line for line in log if ": epoch " in line]
    assert [line.split("epoch ")[1].split(",")[0] for line in epochs] == ["2/20", "12/20", "20/20"]
    assert "lambda" in epochs[0] and "acc(D)" in epochs[0] and "left" in epochs[0]
    assert log[-1] == "[MMAC] margin check"


def test_a_shrunk_schedule_is_logged_with_what_moved(tiny):
    result = run("harden", tiny / "tiny.onnx", "--data", tiny / "clean.npz", "-o", tiny / "t.onnx",
                 "--max-epochs", 20, "--restarts", 4, "--unlearn", "off", "--time-limit", "0.000001", "--force")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stderr.splitlines() if x.startswith("[MMAC] schedule:"))
    assert "shrunk to fit --time-limit 1e-06 s" in line and "restarts 4->2" in line and "max_epochs 20->10" in line


def test_the_stamp_search_and_its_verdict_are_logged(tiny):
    result = run("harden", tiny / "tiny.onnx", "--data", tiny / "clean.npz", "-o", tiny / "s.onnx",
                 "--max-epochs", 2, "--restarts", 2, "--force")
    assert result.exit_code == 0, result.output
    assert "[MMAC] stamp search\n[MMAC] stamp search: class" in result.stderr


def test_detect_and_scan_log_their_stages(tiny):
    detect = run("detect", tiny / "tiny.onnx", "--data", tiny / "clean.npz", "-o", tiny / "d.onnx", "--force")
    assert detect.exit_code == 0, detect.output
    assert "[MMDF] scan (MM-BD" in detect.stderr and "[MMDF] calibration (120 inputs)" in detect.stderr
    scan = run("scan", tiny / "tiny.onnx", "--data", tiny / "clean.npz", "--ascent-steps", 60, "--restarts", 2)
    assert scan.exit_code == 0, scan.output
    log = scan.stderr.splitlines()
    assert log[:2] == ["[scan] scan", "[scan] max margins 20/260"]  # 60 ascent steps, 2 x 100 universal
    assert "[scan] max margins 60/260" not in log  # every 50 steps, not every report
    assert any(line.startswith("[scan] universal perturbations (L-infinity)") for line in log)
    assert any(line.startswith("[scan] universal perturbations (L2)") for line in log)


def test_quiet_prints_nothing(tiny):
    result = run("scan", tiny / "tiny.onnx", "--data", tiny / "clean.npz", "--ascent-steps", 5, "-q")
    assert result.exit_code == 0 and result.stderr == ""


def test_a_line_every_ten_epochs_or_thirty_seconds(capsys):
    clock = Clock()
    with Progress(False, "MMAC", interactive=False, clock=clock) as progress:
        progress({"stage": "max-margin search"})
        for epoch in range(2, 41, 2):
            clock.now += 1.0 if epoch <= 20 else EVERY_SECONDS  # slow epochs after 20
            progress({"epoch": epoch, "max_epochs": 40, "lambda": 0.1, "accuracy": 0.99, "objective": 3.0})
    got = [line.split("epoch ")[1].split(",")[0] for line in lines(capsys) if "epoch" in line]
    assert got == ["2/40", "12/40", "22/40", "24/40", "26/40", "28/40", "30/40", "32/40", "34/40", "36/40",
                   "38/40", "40/40"]


def test_the_estimate_is_the_time_per_epoch_times_the_epochs_left(capsys):
    clock = Clock()
    with Progress(False, "MMAC", interactive=False, clock=clock) as progress:
        progress({"stage": "unlearning"})
        clock.now = 30.0
        progress({"epoch": 10, "max_epochs": 40, "lambda": 0.02, "accuracy": 0.98, "objective": 0.25,
                  "phase": "unlearn"})
    last = lines(capsys)[-1]
    assert last == ("[MMAC] unlearning: epoch 10/40, weight 0.02, acc(D) 0.980, stamped held-out to class "
                    "25.0%, at most 1 min 30 s left")


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (3, 59.4, 130, 3725)] == ["3 s", "59 s", "2 min 10 s", "1 h 02 min"]


def test_a_stage_refitted_after_the_stamp_search_is_named_with_the_time_it_was_left():
    from mmexport.cli.progress import schedule_text
    from mmexport.defences.common.cost import RowCost
    from mmexport.defences.common.schedule import MMAC_KNOBS, after_stamp, fit_schedule, mmac_work, with_rows
    from mmexport.defences.mmac.config import MmacConfig

    cfg = with_rows(MmacConfig(), 200)
    cost = RowCost(backward_seconds=1e-4, forward_seconds=3e-5, saved_bytes=1 << 20, kind="reference")
    first = fit_schedule(cfg, MMAC_KNOBS, lambda c: mmac_work(c, 200, 10), cost, time_limit=240.242)
    assert not first.changed  # the default schedule (stamp search, unlearning) fits the limit
    plan, again = after_stamp(first, "search", 200, 10, 5.0, None)  # the costlier search, 5 s left
    assert again.changed and plan.to_json()["second_stage"] == {
        "stage": "search", "default_seconds": round(again.default_seconds, 1), "time_left": 5.0}
    text = schedule_text(plan.to_json())
    assert text.startswith("schedule: the max-margin search would take about")
    assert "shrunk to the 5 s --time-limit 240.2 s (auto) leaves after the stamp search" in text
