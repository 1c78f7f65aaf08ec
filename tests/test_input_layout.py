"""Where the input keeps its channels: NHWC models (a Transpose to NCHW first, as tf2onnx
writes them) get the input box, stamps and 1-pixel shifts on their channel axis."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from builders import identity_classifier, tiny_cnn
from builders import run_cli as run
from variants import labelled_by, nhwc_inputs, tiny_nhwc_cnn

import mmexport
from mmexport.core.conventions import input_layout
from mmexport.core.errors import ParameterError
from mmexport.core.model import from_proto
from mmexport.defences.common.margins import MaskedMaximisers, input_box
from mmexport.defences.common.search import augment, shifts
from mmexport.defences.mmdf.bounds import shifted


@pytest.fixture(scope="module")
def nhwc():
    proto = tiny_nhwc_cnn(seed=2)
    x, _ = nhwc_inputs(2000, seed=1)
    return proto, labelled_by(proto, x, 8)


def test_a_graph_that_transposes_its_input_to_nchw_first_takes_nhwc(nhwc):
    lay = input_layout(from_proto(nhwc[0]))
    assert (lay.name, lay.channel_axis) == ("nhwc", 3)
    assert input_layout(from_proto(tiny_cnn(seed=3))).channel_axis == 1
    assert input_layout(from_proto(identity_classifier())).channel_axis is None  # flat features


def test_a_layout_given_overrides_the_graph_and_is_checked(nhwc):
    assert input_layout(from_proto(nhwc[0]), "nchw").channel_axis == 1
    with pytest.raises(ParameterError, match="layout"):
        input_layout(from_proto(nhwc[0]), "chwn")


def test_the_box_is_each_channels_range_on_the_last_axis():
    x, scale = nhwc_inputs(300, seed=3)
    box = input_box(torch.from_numpy(x), channel_axis=3)
    for c in range(3):
        assert float(box.lo[..., c].min()) == pytest.approx(x[..., c].min())
        assert float(box.hi[..., c].max()) == pytest.approx(x[..., c].max())
        assert float(box.hi[..., c].max()) > scale[c] - 0.05  # not another channel's range


def test_nhwc_box_shifts_and_augmentation_are_the_nchw_ones_transposed():
    x = torch.from_numpy(nhwc_inputs(7, seed=4)[0])
    nchw = x.permute(0, 3, 1, 2)
    torch.testing.assert_close(input_box(x, channel_axis=3).hi, input_box(nchw).hi.permute(1, 2, 0))
    for a, b in zip(shifts(x, 3), shifts(nchw), strict=True):
        torch.testing.assert_close(a, b.permute(0, 2, 3, 1))
    a = augment(x, torch.Generator().manual_seed(5), 3)
    b = augment(nchw, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b.permute(0, 2, 3, 1))
    np.testing.assert_array_equal(shifted(x.numpy(), 3), shifted(nchw.numpy()).transpose(0, 2, 3, 1))


def test_a_stamps_mask_is_shared_over_the_channels_of_an_nhwc_image():
    x = torch.from_numpy(nhwc_inputs(30, seed=6)[0])
    y = torch.arange(30) % 3
    ms = MaskedMaximisers(input_box(x, channel_axis=3), x, y, 3, generator=torch.Generator().manual_seed(0),
                          batch=4)
    assert tuple(ms.mask.shape) == (3, 6, 6, 1)
    assert tuple(ms.x.shape) == (12, 6, 6, 3)


def test_harden_detect_and_scan_run_on_an_nhwc_model_and_record_the_layout(nhwc):
    proto, clean = nhwc
    res = mmexport.harden(proto, clean, max_epochs=4, restarts=2, warmup_steps=5, device="cpu")
    assert res.report.settings["layout"] == "nhwc"
    if res.report.stage == "unlearn":
        assert res.report.stamp is not None
    det = mmexport.detect(proto, clean, avoid=None, provider="cpu")
    assert det.report.calibration["augment"]  # D's shifts, taken along H and W
    sc = mmexport.scan(proto, clean, restarts=2, ascent_steps=5, universal_steps=5, device="cpu")
    assert sc.settings["layout"] == "nhwc"


def test_inspect_says_where_the_channels_are(nhwc, tmp_path):
    path = tmp_path / "nhwc.onnx"
    onnx.save(nhwc[0], path)
    info = json.loads(run("inspect", path, "--json").output)
    assert info["layout"] == {"name": "nhwc", "channel_axis": 3,
                              "reason": "the graph transposes the input to NCHW first"}
    forced = json.loads(run("inspect", path, "--json", "--layout", "nchw").output)
    assert forced["layout"]["channel_axis"] == 1 and forced["layout"]["reason"] == "given"


def test_the_torch_exported_nhwc_net_is_recognised_and_its_box_has_three_channel_ranges():
    from builders_modern import MODELS, build, export

    _, shape, opset = MODELS["nhwc"]
    model = from_proto(export(build("nhwc"), shape, opset=opset, dynamic=True))
    lay = input_layout(model)
    assert (lay.name, lay.channel_axis) == ("nhwc", 3)
    x = torch.rand(5, *shape) * torch.tensor([1.0, 2.0, 3.0])
    box = input_box(x, channel_axis=lay.channel_axis)
    assert box.hi.shape == (32, 32, 3)
    assert [float(box.hi[..., c].max()) for c in range(3)] == [float(x[..., c].max()) for c in range(3)]
