"""The searches under torch.distributed: the same bounds on 1 and 2 ranks, rank 0 alone writes.

The partition is tested as a pure function; the ranks themselves as torchrun runs the CLI
(gloo on the CPU, two processes), on two sample models: MMAC through its stamp-unlearning
stage and through the max-margin search, and the scan.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mmexport
from mmexport.core.launch import leader, local_ranks
from mmexport.core.threads import threads_in_use
from mmexport.defences.common import ranks

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
# A short schedule, time limit 0: the same work on any number of ranks (through --settings, which
# also reaches the fields without a flag).
SMALL = {"max_epochs": 4, "restarts": 2, "steps": 2, "warmup_steps": 20, "unlearn_epochs": 6, "probe_steps": 5,
         "time_limit": 0, "max_memory": 1, "seed": 3}
SMALL_SCAN = {"restarts": 2, "ascent_steps": 20, "universal_steps": 20, "time_limit": 0}


# --- the partition -----------------------------------------------------------------------------


def rows_of(parts):
    return [i for _, s in parts for i in range(s.start, s.stop)]


@pytest.mark.parametrize("n,chunk,unit", [(200, None, 20), (200, 7, 20), (13, None, 32), (100, 30, 32), (1, 4, 5)])
def test_every_row_is_run_once_and_the_blocks_do_not_depend_on_the_world(n, chunk, unit):
    one = ranks.split(n, chunk, unit, 0, 1)
    assert rows_of(one) == list(range(n))
    for world in (2, 3, 7):
        parts = [ranks.split(n, chunk, unit, r, world) for r in range(world)]
        assert rows_of([p for part in parts for p in part]) == list(range(n))  # rank order is global order
        assert sorted(p for part in parts for p in [(b, (s.start, s.stop)) for b, s in part]) == \
            [(b, (s.start, s.stop)) for b, s in one]  # the same calls, shared out
    assert all(s.stop - s.start <= (chunk or n) for _, s in one)
    assert all(s.start // unit == (s.stop - 1) // unit == b for b, s in one)  # a call never spans blocks


def test_a_single_process_keeps_the_plain_batching():
    assert ranks.split(10, 4, None, 0, 1) == [(0, slice(0, 4)), (0, slice(4, 8)), (0, slice(8, 10))]
    keep = [False, True, True, True, False, False, True, True, False, False]
    assert [s for _, s in ranks.split(10, 2, None, 0, 1, keep)] == [slice(1, 3), slice(3, 4), slice(6, 8)]
    assert not ranks.active() and ranks.runs(5, None) == [(0, slice(0, 5))]


def test_weighted_rows_keep_whole_classes_in_a_distributed_run():
    keep = [False] * 4 + [True] * 4 + [False] * 4  # class 1 of 3, 4 rows each
    assert ranks.split(12, 3, 4, 0, 1, keep) == [(1, slice(4, 7)), (1, slice(7, 8))]
    assert ranks.owner(1, 3, 2) == 0  # blocks 0 and 1 on rank 0, block 2 on rank 1
    assert ranks.split(12, 3, 4, 0, 2, keep) == ranks.split(12, 3, 4, 0, 1, keep)
    assert ranks.split(12, 3, 4, 1, 2, keep) == []


def test_more_ranks_than_classes_leave_some_ranks_idle():
    parts = [ranks.split(3, None, 1, r, 5) for r in range(5)]
    assert sum(1 for p in parts if not p) == 2 and rows_of([p for part in parts for p in part]) == [0, 1, 2]


def test_torchruns_variables_make_rank_zero_the_leader_and_split_the_cores(monkeypatch):
    assert leader() and local_ranks() == 1
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "1",
                 "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)
    assert not leader() and local_ranks() == 2
    monkeypatch.setattr("mmexport.core.threads.available_cores", lambda: 8)
    monkeypatch.setattr("mmexport.core.threads._in_use", None)
    assert threads_in_use() == 4


def test_block_gradients_sum_to_the_plain_backward(tmp_path):
    """One rank of a real (gloo) group: per-block gradients, gathered and summed, equal autograd's."""
    w = torch.linspace(-1, 1, 6, requires_grad=True)
    x = torch.randn(70, 6, generator=torch.Generator().manual_seed(0))
    (x @ w).square().sum().backward()
    expected, w.grad = w.grad.clone(), None
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        grads = ranks.Gradients([w])
        for block, sl in ranks.runs(70, 10, None, "test"):
            grads.backward((x[sl] @ w).square().sum(), (0, block))
        assert len(grads.blocks) == 3  # blocks of ROWS = 32 rows, whatever the chunk
        grads.reduce()
        got = ranks.gather_rows([x[sl].sum(1) for _, sl in ranks.runs(70, 10, None, "test")], x.device)
    finally:
        torch.distributed.destroy_process_group()
    assert torch.allclose(w.grad, expected, rtol=1e-5) and torch.equal(got, x.sum(1))


# --- torchrun: 1 and 2 ranks ----------------------------------------------------------------


def torchrun(n: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: gloo on the loopback, whatever the hostname resolves to
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(n), "-m", "mmexport", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def runs_on(tmp_path_factory):
    """(command, sample, extra) -> {1: output folder, 2: output folder}, each command run once."""
    done = {}

    def run(command: str, sample: str, *extra: str):
        key = (command, sample, extra)
        if key not in done:
            folder = SAMPLES / sample
            out = {}
            for n in (1, 2):
                where = tmp_path_factory.mktemp(f"{command}-{n}")
                args = [command, str(folder / "model.onnx"), "--data", str(folder / "clean.npz"), "--json", "-q",
                        "--report", str(where / "report.json"), *extra]
                if command == "scan":
                    (where / "small.json").write_text(json.dumps(SMALL_SCAN))
                    args += ["--settings", str(where / "small.json"), "--threads", "1"]
                if command == "detect":
                    args += ["-o", str(where / "mmdf.onnx"), "--threads", "1"]
                if command == "harden":
                    (where / "small.json").write_text(json.dumps(SMALL))
                    args += ["-o", str(where / "hard.onnx"), "--settings", str(where / "small.json"), "--threads", "1"]
                res = torchrun(n, *args, cwd=where)
                assert res.returncode == 0, res.stderr[-3000:]
                out[n] = (where, res)
            done[key] = out
        return done[key]

    return run


@pytest.mark.parametrize("sample,extra", [("digits-cnn-badnet", ()), ("digits-resnet-badnet", ("--unlearn", "off"))])
def test_two_ranks_find_the_same_bounds_as_one(runs_on, sample, extra):
    out = runs_on("harden", sample, *extra)
    (one, _), (two, res) = out[1], out[2]
    assert (one / "hard.onnx.bounds.json").read_bytes() == (two / "hard.onnx.bounds.json").read_bytes()
    r1, r2 = (json.loads((w / "report.json").read_text()) for w in (one, two))
    assert r1["stage"] == r2["stage"] == ("unlearn" if not extra else "max-margin")
    assert r1["max_margins_after"] == r2["max_margins_after"]
    assert r1["distributed"]["world_size"] == 1 and r2["distributed"]["world_size"] == 2
    share = r2["distributed"]["rows_per_rank"]
    assert min(share) > 0.3 * sum(share) and sum(share) == sum(r1["distributed"]["rows_per_rank"])
    summary = json.loads(res.stdout)  # rank 0's JSON alone: one object on stdout
    assert summary["written"]["model"] == str(two / "hard.onnx")
    assert sorted(p.name for p in two.iterdir()) == ["hard.onnx", "hard.onnx.bounds.json", "report.json",
                                                     "small.json"]
    assert r2["settings"]["unlearn_epochs"] == SMALL["unlearn_epochs"] and r2["schedule"]["time_limit"] == 0


def test_the_scan_gives_the_same_statistics_on_two_ranks(runs_on):
    out = runs_on("scan", "digits-resnet-badnet")
    (one, _), (two, res) = out[1], out[2]
    r1, r2 = (json.loads((w / "report.json").read_text()) for w in (one, two))
    assert r1["verdict"] == r2["verdict"] == "backdoor" and r1["target_class"] == r2["target_class"] == 7
    assert r1["tests"] == r2["tests"] and r1["p_value"] == r2["p_value"]
    assert r2["distributed"]["rows_per_rank"][0] == r2["distributed"]["rows_per_rank"][1]
    assert json.loads(res.stdout)["verdict"] == "backdoor"


def test_detect_writes_the_same_mmdf_model_on_two_ranks(runs_on):
    """The scan it runs and its cross-fitted folds are shared; the model is byte for byte the same."""
    out = runs_on("detect", "digits-cnn-badnet")
    (one, _), (two, res) = out[1], out[2]
    assert (one / "mmdf.onnx").read_bytes() == (two / "mmdf.onnx").read_bytes()
    assert json.loads(res.stdout)["avoid"]["scan"]["target_class"] == 0


def test_a_user_error_under_torchrun_is_one_line_from_rank_zero(tmp_path):
    folder = SAMPLES / "digits-cnn-badnet"
    res = torchrun(2, "harden", str(folder / "model.onnx"), "--data", str(tmp_path / "missing.npz"),
                   "-o", str(tmp_path / "out.onnx"), cwd=tmp_path)
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing.npz" in errors[0]
    # No frame of ours in a traceback: torchrun's agent reports the exit its way (with its own
    # traceback, naming the interpreter, whose path holds "mmexport/" in a checkout so named).
    package = str(Path(mmexport.__file__).resolve().parent)
    assert f'File "{package}' not in res.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_more_ranks_than_classes_give_the_same_bounds(tmp_path):
    """Four ranks on a three-class model: one rank owns no class and only rows of D."""
    from builders import write_tiny

    _, model, data, _, _ = write_tiny(tmp_path)
    out = {}
    for n in (1, 4):
        res = torchrun(n, "harden", str(model), "--data", str(data), "-o", str(tmp_path / f"t{n}.onnx"),
                       "--max-epochs", "4", "--restarts", "2", "--time-limit", "0", "--threads", "1", "--json", "-q",
                       cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        out[n] = json.loads(res.stdout)["distributed"]["rows_per_rank"]
    assert (tmp_path / "t1.onnx.bounds.json").read_bytes() == (tmp_path / "t4.onnx.bounds.json").read_bytes()
    assert len(out[4]) == 4 and sum(out[4]) == sum(out[1])
