"""Ops of transformers and modern CNNs, run by the engine, equal onnxruntime (CPU).

The same harness as test_engine_ops.py: one tiny graph per case, fed a seeded input `x`.
test_engine_ops.test_every_supported_op_has_a_case counts these CASES too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import assert_op_matches_onnxruntime, case, i64, make_onnx_model, unary
from onnx import TensorProto, helper

from mmexport.core.errors import MmexportError
from mmexport.core.model import from_proto
from mmexport.engine.executor import Engine

N = helper.make_node
_rng = np.random.default_rng(10)


def f32(*shape):
    return _rng.standard_normal(shape).astype(np.float32)


def fl(*values):
    return np.array(values, dtype=np.float32)


def compare(op_type, other):
    return case(
        f"{op_type}-broadcast", [N(op_type, ["x", "b"], ["y"])], opset=13, inits={"b": other}
    )


def bool_tensor(name, value: bool):
    return helper.make_tensor(name, TensorProto.BOOL, [1], [value])


ACTIVATIONS = [
    case("Reciprocal", unary("Reciprocal"), positive=True),
    case("Floor", [N("Mul", ["x", "k"], ["s"]), N("Floor", ["s"], ["y"])], inits={"k": fl(3)}),
    case("Ceil", [N("Mul", ["x", "k"], ["s"]), N("Ceil", ["s"], ["y"])], inits={"k": fl(3)}),
    case("Round", [N("Mul", ["x", "k"], ["s"]), N("Round", ["s"], ["y"])], inits={"k": fl(3)}),
    case(
        "Round-ties-to-even",
        [N("Mul", ["x", "zero"], ["z"]), N("Add", ["z", "t"], ["s"]), N("Round", ["s"], ["y"])],
        inits={"zero": fl(0), "t": fl(0.5, 1.5, 2.5, -0.5, -2.5)},
    ),
    case("Sign", unary("Sign")),
    case("Sin", unary("Sin")),
    case("Cos", unary("Cos")),
    case("Softsign", unary("Softsign")),
    case("Softplus", unary("Softplus")),
    case("HardSwish-14", unary("HardSwish"), opset=14),
    case("Mish-18", unary("Mish"), opset=18),
    case("Elu-default", unary("Elu")),
    case("Elu-alpha", unary("Elu", alpha=0.4)),
    case("Celu-12", unary("Celu", alpha=0.5), opset=12),
    case("Selu-default", unary("Selu")),
    case("Selu-attrs", unary("Selu", alpha=1.2, gamma=0.8)),
    case("ThresholdedRelu-10", unary("ThresholdedRelu", alpha=0.3), opset=10),
    case("LeakyRelu", unary("LeakyRelu", alpha=0.1)),
    case("Sigmoid", unary("Sigmoid")),
    case("Gelu-20-exact", unary("Gelu"), opset=20),
    case("Gelu-20-tanh", unary("Gelu", approximate="tanh"), opset=20),
    case("PRelu-channel-slope", [N("PRelu", ["x", "s"], ["y"])], inits={"s": f32(3, 1, 1)}),
    case("PRelu-trailing-slope", [N("PRelu", ["x", "s"], ["y"])], inits={"s": f32(5)}),
    case("PRelu-scalar-slope", [N("PRelu", ["x", "s"], ["y"])], inits={"s": fl(0.25)}),
    case("PRelu-9-rank2", [N("PRelu", ["x", "s"], ["y"])], (4, 6), opset=9, inits={"s": f32(6)}),
    case(
        "IsNaN",
        [N("Log", ["x"], ["l"]), N("IsNaN", ["l"], ["y"])],
    ),
    case("Softmax-11-negative-axis", unary("Softmax", axis=-2), opset=11),
    case("Softmax-13-negative-axis", unary("Softmax", axis=-2), opset=13),
    case("Softmax-11-3d-axis1", unary("Softmax", axis=1), (2, 3, 4), opset=11),
]

LOGIC = [
    compare("Less", f32(5)),
    compare("Greater", f32(3, 1, 1)),
    case("LessOrEqual-12", [N("LessOrEqual", ["x", "b"], ["y"])], opset=12, inits={"b": f32(5)}),
    case(
        "GreaterOrEqual-12",
        [N("GreaterOrEqual", ["x", "b"], ["y"])],
        opset=12,
        inits={"b": f32(1, 5)},
    ),
    case(
        "Not-And-Or-Xor",
        [
            N("Greater", ["x", "zero"], ["p"]),
            N("Less", ["x", "half"], ["q"]),
            N("Not", ["p"], ["n"]),
            N("And", ["p", "q"], ["a"]),
            N("Or", ["n", "q"], ["o"]),
            N("Xor", ["a", "o"], ["y"]),
        ],
        inits={"zero": fl(0), "half": fl(0.5)},
        outputs=("y", "n", "a", "o"),
    ),
    case(
        "Where-Less",
        [N("Less", ["x", "b"], ["c"]), N("Where", ["c", "x", "b"], ["y"])],
        inits={"b": f32(5)},
    ),
    case("Mod-fmod-float", [N("Mod", ["x", "b"], ["y"], fmod=1)], inits={"b": f32(5) + 2.5}),
    case(
        "Mod-int-sign-of-divisor",
        [N("Shape", ["x"], ["s"]), N("Sub", ["s", "t"], ["d"]), N("Mod", ["d", "m"], ["y"])],
        inits={"t": i64(9, 0, 12, 0), "m": i64(3, -2, 5, -3)},
    ),
    case(
        "Mod-int-fmod",
        [
            N("Shape", ["x"], ["s"]),
            N("Sub", ["s", "t"], ["d"]),
            N("Mod", ["d", "m"], ["y"], fmod=1),
        ],
        inits={"t": i64(9, 0, 12, 0), "m": i64(3, -2, 5, -3)},
    ),
    case(
        "CastLike-15-to-int-and-float",
        [
            N("Shape", ["x"], ["s"]),
            N("CastLike", ["x", "s"], ["y"]),
            N("CastLike", ["s", "x"], ["f"]),
        ],
        opset=15,
        outputs=("y", "f"),
    ),
]

NORMALIZATION = [
    case(
        "LayerNormalization-17-last-axis",
        [N("LayerNormalization", ["x", "s", "b"], ["y"], epsilon=1e-3)],
        opset=17,
        inits={"s": f32(5), "b": f32(5)},
        atol=1e-4,
    ),
    case(
        "LayerNormalization-17-axis1-no-bias",
        [N("LayerNormalization", ["x", "s"], ["y"], axis=1)],
        opset=17,
        inits={"s": f32(3, 5, 5)},
        atol=1e-4,
    ),
    case(
        "LayerNormalization-17-broadcast-scale",
        [N("LayerNormalization", ["x", "s", "b"], ["y"], axis=-2)],
        opset=17,
        inits={"s": f32(1, 5), "b": f32(5)},
        atol=1e-4,
    ),
    case(
        "LayerNormalization-17-mean-invstd",
        [N("LayerNormalization", ["x", "s", "b"], ["y", "m", "i"], axis=2)],
        opset=17,
        inits={"s": f32(5, 5), "b": f32(5, 5)},
        outputs=("y", "m", "i"),
        atol=1e-4,
    ),
    case(
        "LayerNormalization-17-invstd-only",
        [N("LayerNormalization", ["x", "s"], ["y", "", "i"])],
        opset=17,
        inits={"s": f32(5)},
        outputs=("y", "i"),
        atol=1e-4,
    ),
    case(
        "LayerNorm-decomposed-13-axes-attr",
        [
            N("ReduceMean", ["x"], ["mu"], axes=[-1]),
            N("Sub", ["x", "mu"], ["d"]),
            N("Pow", ["d", "two"], ["d2"]),
            N("ReduceMean", ["d2"], ["var"], axes=[-1]),
            N("Add", ["var", "eps"], ["ve"]),
            N("Sqrt", ["ve"], ["sd"]),
            N("Div", ["d", "sd"], ["n"]),
            N("Mul", ["n", "s"], ["ns"]),
            N("Add", ["ns", "b"], ["y"]),
        ],
        opset=13,
        inits={"two": fl(2), "eps": fl(1e-5), "s": f32(5), "b": f32(5)},
        atol=1e-4,
    ),
    case(
        "LayerNorm-decomposed-18-axes-input",
        [
            N("ReduceMean", ["x", "ax"], ["mu"]),
            N("Sub", ["x", "mu"], ["d"]),
            N("Pow", ["d", "two"], ["d2"]),
            N("ReduceMean", ["d2", "ax"], ["var"]),
            N("Add", ["var", "eps"], ["ve"]),
            N("Sqrt", ["ve"], ["sd"]),
            N("Reciprocal", ["sd"], ["r"]),
            N("Mul", ["d", "r"], ["n"]),
            N("Mul", ["n", "s"], ["ns"]),
            N("Add", ["ns", "b"], ["y"]),
        ],
        opset=18,
        inits={"ax": i64(-1), "two": fl(2), "eps": fl(1e-5), "s": f32(5), "b": f32(5)},
        atol=1e-4,
    ),
    case(
        "InstanceNormalization",
        [N("InstanceNormalization", ["x", "s", "b"], ["y"], epsilon=1e-3)],
        inits={"s": f32(3), "b": f32(3)},
        atol=1e-4,
    ),
    case(
        "InstanceNormalization-rank3",
        [N("InstanceNormalization", ["x", "s", "b"], ["y"])],
        (2, 4, 7),
        inits={"s": f32(4), "b": f32(4)},
        atol=1e-4,
    ),
    case(
        "GroupNormalization-18-per-group",
        [N("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=3)],
        (2, 6, 3, 3),
        opset=18,
        inits={"s": f32(3), "b": f32(3)},
        atol=1e-4,
    ),
    case(
        "GroupNormalization-18-groups-equal-channels",
        [N("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=4, epsilon=1e-3)],
        (2, 4, 5),
        opset=18,
        inits={"s": f32(4), "b": f32(4)},
        atol=1e-4,
    ),
    case(
        "GroupNormalization-21-per-channel",
        [N("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=2)],
        (2, 6, 3, 3),
        opset=21,
        inits={"s": f32(6), "b": f32(6)},
        atol=1e-4,
    ),
]

REDUCTIONS = []
for _op in (
    "ReduceMin",
    "ReduceProd",
    "ReduceL1",
    "ReduceL2",
    "ReduceSumSquare",
    "ReduceLogSumExp",
):
    REDUCTIONS += [
        case(f"{_op}-13-attr", unary(_op, axes=[1, 3]), atol=1e-4),
        case(
            f"{_op}-18-input",
            [N(_op, ["x", "a"], ["y"], keepdims=0)],
            opset=18,
            inits={"a": i64(-1)},
            atol=1e-4,
        ),
    ]
REDUCTIONS += [
    case("ReduceLogSum-13-all", unary("ReduceLogSum", keepdims=0), positive=True, atol=1e-4),
    case(
        "ReduceLogSum-18-input",
        [N("ReduceLogSum", ["x", "a"], ["y"])],
        opset=18,
        inits={"a": i64(2)},
        positive=True,
    ),
]

LINEAR = [
    case(
        "Einsum-batched-matmul",
        [N("Einsum", ["x", "x"], ["y"], equation="bchw,bcwk->bchk")],
        opset=12,
        atol=1e-4,
    ),
    case(
        "Einsum-attention-scores",
        [N("Einsum", ["x", "k"], ["y"], equation="bhqd, bhkd -> bhqk")],
        opset=12,
        inits={"k": f32(2, 3, 4, 5)},
        atol=1e-4,
    ),
    case(
        "Einsum-implicit-output",
        [N("Einsum", ["x", "w"], ["y"], equation="ij,jk")],
        (4, 6),
        opset=12,
        inits={"w": f32(6, 3)},
        atol=1e-4,
    ),
    case(
        "Einsum-ellipsis-and-reduce",
        [N("Einsum", ["x", "w"], ["y"], equation="...ij,j->...i")],
        opset=12,
        inits={"w": f32(5)},
        atol=1e-4,
    ),
    case("Einsum-transpose", [N("Einsum", ["x"], ["y"], equation="bchw->bhwc")], opset=12),
    case(
        "MatMul-broadcast-batch",
        [N("MatMul", ["x", "w"], ["y"])],
        (2, 1, 5, 5),
        inits={"w": f32(4, 5, 3)},
        atol=1e-4,
    ),
    case(
        "MatMul-batched-left-constant",
        [N("MatMul", ["w", "x"], ["y"])],
        inits={"w": f32(3, 4, 5)},
        atol=1e-4,
    ),
    case("MatMul-vector-left", [N("MatMul", ["w", "x"], ["y"])], inits={"w": f32(5)}, atol=1e-4),
    case(
        "MatMul-both-dynamic",
        [N("Transpose", ["x"], ["t"], perm=[0, 1, 3, 2]), N("MatMul", ["x", "t"], ["y"])],
        atol=1e-4,
    ),
    case(
        "Attention-subgraph",
        [
            N("MatMul", ["x", "wq"], ["q0"]),
            N("MatMul", ["x", "wk"], ["k0"]),
            N("MatMul", ["x", "wv"], ["v0"]),
            N("Reshape", ["q0", "heads"], ["q1"]),
            N("Reshape", ["k0", "heads"], ["k1"]),
            N("Reshape", ["v0", "heads"], ["v1"]),
            N("Transpose", ["q1"], ["q"], perm=[0, 2, 1, 3]),
            N("Transpose", ["k1"], ["kt"], perm=[0, 2, 3, 1]),
            N("Transpose", ["v1"], ["v"], perm=[0, 2, 1, 3]),
            N("MatMul", ["q", "kt"], ["s0"]),
            N("Mul", ["s0", "scale"], ["s"]),
            N("Softmax", ["s"], ["p"], axis=-1),
            N("MatMul", ["p", "v"], ["o0"]),
            N("Transpose", ["o0"], ["o1"], perm=[0, 2, 1, 3]),
            N("Reshape", ["o1", "merge"], ["o"]),
            N("MatMul", ["o", "wo"], ["y"]),
        ],
        (2, 4, 6),
        inits={
            "wq": f32(6, 6),
            "wk": f32(6, 6),
            "wv": f32(6, 6),
            "wo": f32(6, 6),
            "heads": i64(0, 0, 2, 3),
            "merge": i64(0, 0, -1),
            "scale": fl(3**-0.5),
        },
        atol=1e-4,
    ),
]

SHAPES = [
    case("Tile-static", [N("Tile", ["x", "r"], ["y"])], inits={"r": i64(1, 2, 1, 3)}),
    case(
        "Tile-dynamic-repeats",
        [N("Shape", ["x"], ["s"]), N("Sub", ["s", "t"], ["r"]), N("Tile", ["x", "r"], ["y"])],
        inits={"t": i64(1, 1, 4, 3)},
    ),
    case(
        "Range-int-from-shape",
        [
            N("Shape", ["x"], ["s"]),
            N("Gather", ["s", "three"], ["n"]),
            N("Range", ["zero", "n", "one"], ["y"]),
        ],
        opset=11,
        inits={"three": i64(3).reshape(()), "zero": i64(0).reshape(()), "one": i64(1).reshape(())},
    ),
    case(
        "Range-float-negative-delta",
        [
            N("Shape", ["x"], ["s"]),
            N("Gather", ["s", "two"], ["n"]),
            N("Cast", ["n"], ["f"], to=TensorProto.FLOAT),
            N("Range", ["f", "lo", "d"], ["y"]),
        ],
        opset=11,
        inits={"two": i64(2).reshape(()), "lo": fl(-1.2).reshape(()), "d": fl(-0.7).reshape(())},
    ),
    case(
        "Range-static-folded",
        [N("Range", ["a", "b", "c"], ["r"]), N("Add", ["x", "r"], ["y"])],
        opset=11,
        inits={"a": fl(0.5).reshape(()), "b": fl(3).reshape(()), "c": fl(0.5).reshape(())},
    ),
    case(
        "Shape-Gather-Concat-Reshape",
        [
            N("Shape", ["x"], ["s"]),
            N("Gather", ["s", "i0"], ["n"]),
            N("Gather", ["s", "i1"], ["c"]),
            N("Unsqueeze", ["n", "ax"], ["n1"]),
            N("Unsqueeze", ["c", "ax"], ["c1"]),
            N("Concat", ["n1", "c1", "minus1"], ["t"], axis=0),
            N("Reshape", ["x", "t"], ["r"]),
            N("Transpose", ["r"], ["y"], perm=[0, 2, 1]),
        ],
        inits={
            "i0": i64(0).reshape(()),
            "i1": i64(1).reshape(()),
            "ax": i64(0),
            "minus1": i64(-1),
        },
    ),
    case(
        "Shape-15-slice-Mul-Reshape",
        [
            N("Shape", ["x"], ["hw"], start=2),
            N("ReduceProd", ["hw"], ["p"], keepdims=1),
            N("Shape", ["x"], ["nc"], end=2),
            N("Concat", ["nc", "p"], ["t"], axis=0),
            N("Reshape", ["x", "t"], ["y"]),
        ],
        opset=15,
    ),
    case(
        "Expand-from-shape",
        [N("Shape", ["x"], ["s"]), N("Expand", ["b", "s"], ["e"]), N("Add", ["x", "e"], ["y"])],
        inits={"b": f32(3, 1, 1)},
    ),
    case(
        "Expand-torch-minus-one-pattern",
        [
            # torch's x.expand(n, -1, -1): Where(Equal(target, -1), ones, target)
            N("Shape", ["x"], ["s"]),
            N("Gather", ["s", "i0"], ["n"]),
            N("Unsqueeze", ["n", "ax"], ["n1"]),
            N("Concat", ["n1", "m1", "m1"], ["t"], axis=0),
            N("Shape", ["t"], ["ts"]),
            N(
                "ConstantOfShape",
                ["ts"],
                ["ones"],
                value=helper.make_tensor("v", TensorProto.INT64, [1], [1]),
            ),
            N("Equal", ["t", "m1"], ["eq"]),
            N("Where", ["eq", "ones", "t"], ["tt"]),
            N("Expand", ["cls", "tt"], ["y"]),
        ],
        inits={"i0": i64(0).reshape(()), "ax": i64(0), "m1": i64(-1), "cls": f32(1, 1, 4)},
    ),
    case(
        "Split-18-sizes-input",
        [N("Split", ["x", "s"], ["y", "z"], axis=-1)],
        opset=18,
        inits={"s": i64(2, 3)},
        outputs=("y", "z"),
    ),
    case(
        "Split-18-qkv",
        [N("Split", ["x"], ["y", "z", "w"], axis=1, num_outputs=3)],
        (2, 6, 4),
        opset=18,
        outputs=("y", "z", "w"),
    ),
    case("Transpose-nhwc-to-nchw", unary("Transpose", perm=[0, 3, 1, 2])),
    case(
        "Slice-last-token",
        [N("Slice", ["x", "s", "e", "a"], ["y"])],
        (2, 5, 4),
        inits={"s": i64(-1), "e": i64(np.iinfo(np.int64).max), "a": i64(1)},
    ),
    case("Trilu-upper", [N("Trilu", ["x"], ["y"])], opset=14),
    case("Trilu-lower-k", [N("Trilu", ["x", "k"], ["y"], upper=0)], opset=14, inits={"k": i64(-1)}),
    case(
        "Trilu-dynamic-k",
        [
            N("Shape", ["x"], ["s"]),
            N("Gather", ["s", "i0"], ["k"]),
            N("Trilu", ["x", "k"], ["y"], upper=1),
        ],
        opset=14,
        inits={"i0": i64(0).reshape(())},
    ),
    case(
        "Causal-mask-softmax",
        [
            N("Shape", ["x"], ["s"], start=2),
            N("ConstantOfShape", ["s"], ["ones"], value=bool_tensor("v", True)),
            N("Trilu", ["ones"], ["mask"], upper=0),
            N("Where", ["mask", "x", "ninf"], ["m"]),
            N("Softmax", ["m"], ["y"], axis=-1),
        ],
        opset=15,
        inits={"ninf": fl(-np.inf)},
    ),
]


def resize(name, shape=(2, 2, 4, 5), *, opset=13, scales=None, sizes=None, roi=False, **attrs):
    inits, inputs = {}, ["x", "roi" if roi else ""]
    if roi:
        inits["roi"] = np.zeros(0, np.float32)
    if opset < 11:
        inputs = ["x", "scales"]
    if scales is not None:
        inits["scales"] = fl(*scales)
        if opset >= 11:
            inputs.append("scales")
    elif sizes is not None:
        if opset < 13:
            inits["scales"] = np.zeros(0, np.float32)
        inputs += ["scales" if opset < 13 else "", "sizes"]
        inits["sizes"] = i64(*sizes)
    node = N("Resize", inputs, ["y"], **attrs)
    return case(f"Resize-{opset}-{name}", [node], shape, opset=opset, inits=inits, atol=1e-5)


RESIZE = [
    resize(
        "nearest-asymmetric-floor-x2",
        scales=(1, 1, 2, 2),
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
    ),
    resize("nearest-half-pixel-default", scales=(1, 1, 1.5, 0.6)),
    resize(
        "nearest-align-corners-round-prefer-ceil",
        sizes=(2, 2, 7, 3),
        coordinate_transformation_mode="align_corners",
        nearest_mode="round_prefer_ceil",
    ),
    resize(
        "nearest-pytorch-half-pixel-ceil",
        scales=(1, 1, 0.5, 1.7),
        coordinate_transformation_mode="pytorch_half_pixel",
        nearest_mode="ceil",
    ),
    resize(
        "nearest-tf-half-pixel-for-nn",
        scales=(1, 1, 1.6, 2.5),
        coordinate_transformation_mode="tf_half_pixel_for_nn",
        mode="nearest",
    ),
    resize(
        "nearest-asymmetric-ties-prefer-floor",
        scales=(1, 1, 2, 4),
        coordinate_transformation_mode="asymmetric",
    ),
    resize("linear-half-pixel-x2", scales=(1, 1, 2, 2), mode="linear"),
    resize("linear-half-pixel-shrink", scales=(1, 1, 0.5, 0.7), mode="linear"),
    resize(
        "linear-pytorch-half-pixel",
        scales=(1, 1, 2.5, 1.5),
        mode="linear",
        coordinate_transformation_mode="pytorch_half_pixel",
    ),
    resize(
        "linear-pytorch-half-pixel-to-one",
        sizes=(2, 2, 1, 3),
        mode="linear",
        coordinate_transformation_mode="pytorch_half_pixel",
    ),
    resize(
        "linear-align-corners-sizes",
        sizes=(2, 2, 7, 9),
        mode="linear",
        coordinate_transformation_mode="align_corners",
    ),
    resize(
        "linear-asymmetric",
        scales=(1, 1, 1.5, 3),
        mode="linear",
        coordinate_transformation_mode="asymmetric",
    ),
    resize("linear-one-axis-sizes", sizes=(2, 2, 4, 8), mode="linear"),
    resize("linear-nhwc", (2, 4, 5, 3), scales=(1, 2, 1.5, 1), mode="linear"),
    resize("linear-rank2", (4, 5), scales=(2, 1.5), mode="linear"),
    resize(
        "cubic-pytorch-half-pixel",
        scales=(1, 1, 2, 1.5),
        mode="cubic",
        coordinate_transformation_mode="pytorch_half_pixel",
    ),
    resize(
        "cubic-align-corners",
        sizes=(2, 2, 6, 8),
        mode="cubic",
        coordinate_transformation_mode="align_corners",
    ),
    resize(
        "cubic-exclude-outside",
        scales=(1, 1, 0.75, 0.6),
        mode="cubic",
        cubic_coeff_a=-0.5,
        exclude_outside=1,
    ),
    resize("11-roi-and-empty-scales", opset=11, sizes=(2, 2, 6, 3), roi=True, mode="linear"),
    resize("nearest-simple-x2", opset=10, scales=(1, 1, 2, 3)),
    resize("nearest-simple-shrink", opset=10, scales=(1, 1, 0.5, 0.6)),
    resize("linear", opset=10, scales=(1, 1, 2, 1.5), mode="linear"),
    resize(
        "axes-scales",
        opset=18,
        scales=(1.5, 2),
        axes=[2, 3],
        mode="linear",
    ),
    resize(
        "axes-sizes-not-larger",
        opset=18,
        sizes=(7, 7),
        axes=[2, 3],
        keep_aspect_ratio_policy="not_larger",
    ),
    resize(
        "axes-sizes-not-smaller",
        opset=18,
        sizes=(7, 7),
        axes=[2, 3],
        mode="linear",
        keep_aspect_ratio_policy="not_smaller",
    ),
    resize(
        "half-pixel-symmetric",
        opset=19,
        scales=(1, 1, 1.7, 0.7),
        mode="linear",
        coordinate_transformation_mode="half_pixel_symmetric",
    ),
    case(
        "Resize-13-dynamic-sizes",
        [
            N("Shape", ["x"], ["s"]),
            N("Mul", ["s", "k"], ["sz"]),
            N("Resize", ["x", "", "", "sz"], ["y"], mode="linear"),
        ],
        (2, 2, 3, 4),
        inits={"k": i64(1, 1, 2, 3)},
    ),
    case(
        "Resize-13-same-size-is-identity",
        [N("Resize", ["x", "", "sc"], ["y"], mode="cubic")],
        inits={"sc": fl(1, 1, 1, 1)},
    ),
    case(
        "Upsample-9-nearest",
        [N("Upsample", ["x", "sc"], ["y"])],
        opset=9,
        inits={"sc": fl(1, 1, 2, 3)},
    ),
    case(
        "Upsample-9-linear",
        [N("Upsample", ["x", "sc"], ["y"], mode="linear")],
        opset=9,
        inits={"sc": fl(1, 1, 2, 1.5)},
    ),
    case(
        "Upsample-7-attr",
        [N("Upsample", ["x"], ["y"], scales=[1.0, 1.0, 2.0, 2.0], mode="nearest")],
        opset=7,
    ),
]

CASES = ACTIVATIONS + LOGIC + NORMALIZATION + REDUCTIONS + LINEAR + SHAPES + RESIZE


@pytest.mark.parametrize("nodes, shape, opset, inits, outputs, atol, positive", CASES)
def test_op_matches_onnxruntime(nodes, shape, opset, inits, outputs, atol, positive):
    assert_op_matches_onnxruntime(nodes, shape, opset, inits, outputs, atol, positive)


GRAD_CASES = [
    (
        "LayerNormalization",
        [N("LayerNormalization", ["x", "s", "b"], ["y"])],
        17,
        {"s": f32(4), "b": f32(4)},
    ),
    (
        "LayerNormalization-stats",
        [N("LayerNormalization", ["x", "s"], ["y", "m", "i"], axis=1), N("Mul", ["y", "i"], ["z"])],
        17,
        {"s": f32(2, 3, 4)},
    ),
    (
        "GroupNormalization",
        [N("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=1)],
        18,
        {"s": f32(1), "b": f32(1)},
    ),
    ("Gelu", [N("Gelu", ["x"], ["y"], approximate="tanh")], 20, {}),
    ("PRelu", [N("PRelu", ["x", "s"], ["y"])], 13, {"s": f32(2, 1, 1)}),
    ("HardSwish-Mish", [N("HardSwish", ["x"], ["h"]), N("Mish", ["h"], ["y"])], 18, {}),
    ("ReduceL2", [N("ReduceL2", ["x"], ["y"], axes=[1])], 13, {}),
    (
        "Resize-linear",
        [N("Resize", ["x", "", "sc"], ["y"], mode="linear")],
        13,
        {"sc": fl(1, 1, 1.5, 2)},
    ),
    (
        "Resize-cubic",
        [
            N(
                "Resize",
                ["x", "", "sc"],
                ["y"],
                mode="cubic",
                coordinate_transformation_mode="align_corners",
            )
        ],
        13,
        {"sc": fl(1, 1, 2, 1.5)},
    ),
    ("Einsum", [N("Einsum", ["x", "x"], ["y"], equation="bchw,bcvw->bhv")], 12, {}),
]


@pytest.mark.parametrize("nodes, opset, inits", [pytest.param(*c[1:], id=c[0]) for c in GRAD_CASES])
def test_gradient_through_new_ops_matches_finite_differences(nodes, opset, inits):
    proto = make_onnx_model(
        nodes, (2, 2, 3, 4), outputs=(nodes[-1].output[0],), inits=inits, opset=opset
    )
    engine = Engine(from_proto(proto), dtype=torch.float64)
    x = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 2, 3, 4)))
    weights = torch.from_numpy(np.random.default_rng(4).standard_normal(engine(x).shape))
    assert torch.autograd.gradcheck(
        lambda t: (engine(t) * weights).sum(), (x.requires_grad_(True),), eps=1e-6, atol=1e-6
    )


def test_resize_errors_name_the_node():
    proto = make_onnx_model(
        [
            N(
                "Resize",
                ["x", "", "sc"],
                ["y"],
                name="crop",
                coordinate_transformation_mode="tf_crop_and_resize",
            )
        ],
        (1, 1, 2, 2),
        inits={"sc": fl(1, 1, 2, 2)},
    )
    with pytest.raises(MmexportError, match=r"node 'crop' \(Resize\).*tf_crop_and_resize"):
        Engine(from_proto(proto))
