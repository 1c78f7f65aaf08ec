"""The nine classic ImageNet models of onnx's backend test data pass `inspect --verify`.

As shipped (`tests/classic.py` says what that holds: trained biases and BatchNorm values, every
large weight filled with 0.02) and with seeded random weights of the same shapes. All have a
fixed batch of 1 and, but DenseNet-121 and SqueezeNet, a final Softmax over (1, 1000): verify
compares the logits behind it too. VGG-19, AlexNet and ZFNet-512 hold 60-140 M parameters in
their fully connected layers: with random values those become 230-570 MB protos that shape
inference, onnxruntime and the engine each take 20-50 s to read on a 2-core machine, so their
random-weight check runs only with MMEXPORT_BIG_MODELS=1.
"""

from __future__ import annotations

import json
import os

import onnx
import pytest
from builders import run_cli as run
from classic import NAMES, light_model, with_random_weights

BIG = ("vgg19", "bvlc_alexnet", "zfnet512")
SOFTMAX_OVER_2D = {"bvlc_alexnet", "inception_v1", "inception_v2", "resnet50", "shufflenet", "vgg19", "zfnet512"}


def verify(path, *extra) -> dict:
    result = run("inspect", path, "--verify", "--samples", 1, "--provider", "cpu", "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.parametrize("name", NAMES)
def test_inspect_verify_passes_on_the_model_as_shipped(name):
    info = verify(light_model(name))
    assert info["verify"]["passed"], info["verify"]
    assert info["fixed_batch"] == 1
    compared = {o["name"] for o in info["verify"]["outputs"]}
    assert info["logits"]["tensor"] in compared
    assert (info["logits"]["via"] == "Softmax") == (name in SOFTMAX_OVER_2D)


@pytest.mark.parametrize("name", [n for n in NAMES if n not in BIG])
def test_inspect_verify_passes_with_seeded_random_weights(name, tmp_path):
    path = tmp_path / f"{name}.onnx"
    onnx.save(with_random_weights(onnx.load(light_model(name)), seed=0), path)
    assert verify(path)["verify"]["passed"]


@pytest.mark.skipif(not os.environ.get("MMEXPORT_BIG_MODELS"), reason="set MMEXPORT_BIG_MODELS=1 (about 2 min)")
@pytest.mark.parametrize("name", BIG)
def test_inspect_verify_passes_on_the_big_models_with_random_weights(name, tmp_path):
    path = tmp_path / f"{name}.onnx"
    onnx.save(with_random_weights(onnx.load(light_model(name)), seed=0), path)
    assert verify(path)["verify"]["passed"]


def test_two_inputs_run_batched_through_the_channel_shuffle():
    # ShuffleNet reshapes to the constant [1, 4, 28, 56, 56] and back: the batch follows it.
    info = verify(light_model("shufflenet"), "--samples", 2)
    assert info["verify"]["passed"] and info["verify"]["engine_batching"] == "scaled"
