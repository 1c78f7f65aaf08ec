"""--threads / `threads=`: torch's and onnxruntime's thread pools, by default the cores this
process may use; the count changes speed, never results."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from builders import run_cli as run
from builders import write_tiny

import mmexport
from mmexport.core.errors import ParameterError
from mmexport.core.threads import available_cores, check_threads, threads_in_use, using_threads
from mmexport.engine.threads import use_threads
from mmexport.runtime.sessions import session

pytestmark = pytest.mark.own_threads  # these tests set and read the thread count themselves


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("threads")
    proto, _, _, x, y = write_tiny(tmp)
    return proto, (x, y), tmp


def test_the_default_is_the_cores_this_process_may_use():
    assert available_cores() == len(os.sched_getaffinity(0))
    assert threads_in_use() == available_cores()


def test_an_inner_call_without_a_count_keeps_the_enclosing_one():
    with using_threads(1):
        with using_threads(None) as inner:
            assert inner == 1
        with using_threads(3) as inner:
            assert inner == threads_in_use() == 3
        assert threads_in_use() == 1
    assert threads_in_use() == available_cores()


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_a_thread_count_must_be_a_whole_number_of_at_least_one(bad):
    with pytest.raises(ParameterError, match="threads"):
        check_threads(bad)


def test_torch_and_onnxruntime_get_the_count_and_torch_gets_its_own_back(tiny):
    before = torch.get_num_threads()
    with use_threads(1):
        assert torch.get_num_threads() == 1
        sess, _ = session(tiny[0], provider="cpu")
        assert sess.get_session_options().intra_op_num_threads == 1
    assert torch.get_num_threads() == before


def test_validate_refuses_a_bad_count_naming_the_parameter(tiny):
    with pytest.raises(ParameterError, match="threads"):
        mmexport.validate(tiny[0], tiny[1], threads=0)


def test_one_thread_or_two_the_same_bounds(tiny):
    kw = dict(max_epochs=4, restarts=2, warmup_steps=5, unlearn="off", device="cpu", seed=0)
    one = mmexport.harden(tiny[0], tiny[1], threads=1, **kw)
    two = mmexport.harden(tiny[0], tiny[1], threads=2, **kw)
    for site, value in one.bounds.items():
        np.testing.assert_array_equal(two.bounds[site], value)


@pytest.mark.parametrize("command", ["inspect", "validate", "harden", "detect", "scan", "compare"])
def test_every_computing_command_takes_threads(tiny, command):
    _, _, tmp = tiny
    model, data = tmp / "tiny.onnx", tmp / "clean.npz"
    args = {
        "inspect": ["inspect", model, "--verify"],
        "validate": ["validate", model, "--data", data],
        "harden": ["harden", model, "--data", data, "-o", tmp / "h.onnx", "--max-epochs", 2, "--restarts", 2,
                   "--unlearn", "off", "--force"],
        "detect": ["detect", model, "--data", data, "-o", tmp / "d.onnx", "--avoid", "none", "--force"],
        "scan": ["scan", model, "--data", data, "--restarts", 2, "--ascent-steps", 5],
        "compare": ["compare", model, model, "--data", data, "--no-margins", "--runs", 2],
    }[command]
    result = run(*args, "--threads", 1, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)
    refused = run(*args, "--threads", 0)
    assert refused.exit_code == 2 and "--threads" in refused.output
