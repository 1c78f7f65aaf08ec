"""Every supported op, run by the engine, equals onnxruntime (CPU) on a tiny graph."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders import assert_op_matches_onnxruntime, case, i64, make_onnx_model, unary
from onnx import TensorProto, helper

from mmexport.core.model import from_proto
from mmexport.engine.executor import SUPPORTED_OPS, Engine

N = helper.make_node
_rng = np.random.default_rng(0)
INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min


def f32(*shape):
    return _rng.standard_normal(shape).astype(np.float32)


def binary(op_type, other):
    return case(f"{op_type}-{other.shape}", [N(op_type, ["x", "b"], ["y"])], inits={"b": other})


def conv(name, x_shape, w_shape, bias=True, atol=1e-4, **attrs):
    inputs = ["x", "w", "b"] if bias else ["x", "w"]
    inits = {"w": f32(*w_shape)}
    if bias:
        inits["b"] = f32(w_shape[0])
    return case(name, [N("Conv", inputs, ["y"], **attrs)], x_shape, inits=inits, atol=atol)


def pool(name, op_type, x_shape=(2, 3, 7, 7), opset=13, **attrs):
    return case(name, [N(op_type, ["x"], ["y"], **attrs)], x_shape, opset=opset)


ELEMENTWISE = [
    case("Relu", unary("Relu")),
    case("Sigmoid", unary("Sigmoid")),
    case("Tanh", unary("Tanh")),
    case("Neg", unary("Neg")),
    case("Exp", unary("Exp")),
    case("Log", unary("Log"), positive=True),
    case("Sqrt", unary("Sqrt"), positive=True),
    case("Abs", unary("Abs")),
    case("Erf", unary("Erf")),
    case("Identity", unary("Identity")),
    case("LeakyRelu-default", unary("LeakyRelu")),
    case("LeakyRelu-alpha", unary("LeakyRelu", alpha=0.2)),
    case("HardSigmoid-default", unary("HardSigmoid")),
    case("HardSigmoid-unit-clip", unary("HardSigmoid", alpha=1.0, beta=0.0)),
    binary("Add", f32(5)),
    binary("Add", f32(3, 1, 1)),
    binary("Sub", f32(1, 3, 5, 1)),
    binary("Mul", np.float32(1.5)),
    binary("Div", f32(5) + 3.0),
    case("Pow", [N("Pow", ["x", "b"], ["y"])], inits={"b": f32(5)}, positive=True),
    case("Pow-int-exponent", [N("Pow", ["x", "b"], ["y"])], inits={"b": i64(2)}),
    case("Sum", [N("Sum", ["x", "a", "b"], ["y"])], inits={"a": f32(5), "b": f32(3, 1, 1)}),
    case("Sum-single", [N("Sum", ["x"], ["y"])]),
    case("Min", [N("Min", ["x", "a"], ["y"])], inits={"a": f32(5)}),
    case("Max", [N("Max", ["x", "a", "b"], ["y"])], inits={"a": f32(5), "b": f32(1)}),
    case("Mean", [N("Mean", ["x", "a", "b"], ["y"])], inits={"a": f32(5), "b": f32(3, 1, 1)}),
    case(
        "Equal-Where-float",
        [N("Equal", ["x", "x"], ["c"]), N("Where", ["c", "x", "b"], ["y"])],
        inits={"b": f32(5)},
        outputs=("y", "c"),
    ),
    case(
        "Where-static-cond",
        [N("Where", ["c", "x", "b"], ["y"])],
        inits={"c": _rng.random((3, 1, 5)) > 0.5, "b": f32(5)},
    ),
    case(
        "Equal-int-shapes",
        [
            N("Shape", ["x"], ["s"]),
            N("Equal", ["s", "t"], ["e"]),
            N("Where", ["e", "s", "t"], ["y"]),
        ],
        inits={"t": i64(2, 7, 5, 1)},
        outputs=("y", "e"),
    ),
    case(
        "Div-int-truncates",
        [N("Shape", ["x"], ["s"]), N("Sub", ["t", "s"], ["d"]), N("Div", ["d", "two"], ["y"])],
        inits={"t": i64(0, 0, 8, 1), "two": i64(2)},
    ),
]

ACTIVATIONS = [
    case("Clip-9-attrs", unary("Clip", min=-0.5, max=0.5), opset=9),
    case("Clip-9-min-only", unary("Clip", min=0.0), opset=9),
    case(
        "Clip-13-inputs",
        [N("Clip", ["x", "lo", "hi"], ["y"])],
        opset=13,
        inits={"lo": np.float32(-0.3), "hi": np.float32(0.6)},
    ),
    case("Clip-13-max-only", [N("Clip", ["x", "", "hi"], ["y"])], inits={"hi": np.float32(0.2)}),
    case("Clip-13-no-bounds", [N("Clip", ["x"], ["y"])]),
    case(
        "Clip-13-dynamic-min",
        [N("ReduceMean", ["x"], ["m"], keepdims=0), N("Clip", ["x", "m", "hi"], ["y"])],
        inits={"hi": np.float32(1.0)},
    ),
    case("Softmax-11-default-axis", unary("Softmax"), opset=11),
    case("Softmax-11-axis2", unary("Softmax", axis=2), opset=11),
    case("Softmax-13-default-axis", unary("Softmax"), opset=13),
    case("Softmax-13-axis1", unary("Softmax", axis=1), opset=13),
    case("LogSoftmax-11", unary("LogSoftmax", axis=1), opset=11),
    case("LogSoftmax-13", unary("LogSoftmax"), opset=13),
    case(
        "BatchNormalization-9",
        [N("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)],
        opset=9,
        inits={"s": f32(3), "b": f32(3), "m": f32(3), "v": np.abs(f32(3)) + 0.5},
    ),
    case(
        "BatchNormalization-15-rank2",
        [N("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"])],
        (4, 3),
        opset=15,
        inits={"s": f32(3), "b": f32(3), "m": f32(3), "v": np.abs(f32(3)) + 0.5},
    ),
    case("LRN-odd", unary("LRN", size=3, alpha=0.1, beta=0.75, bias=1.5), (2, 6, 4, 4)),
    case(
        "Dropout-9-mask", [N("Dropout", ["x"], ["y", "m"], ratio=0.3)], opset=9, outputs=("y", "m")
    ),
    case("Dropout-10-mask", [N("Dropout", ["x"], ["y", "m"])], opset=10, outputs=("y", "m")),
    case(
        "Dropout-13-mask",
        [N("Dropout", ["x", "r"], ["y", "m"])],
        inits={"r": np.float32(0.5)},
        outputs=("y", "m"),
    ),
    case("Cast-int64", [N("Cast", ["x"], ["y"], to=TensorProto.INT64)]),
    case("Cast-int32", [N("Cast", ["x"], ["y"], to=TensorProto.INT32)]),
    case(
        "Cast-float16",
        [
            N("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
            N("Cast", ["h"], ["y"], to=TensorProto.FLOAT),
        ],
    ),
    case("Cast-bool", [N("Cast", ["x"], ["y"], to=TensorProto.BOOL)]),
    case(
        "Cast-shape-to-float",
        [N("Shape", ["x"], ["s"]), N("Cast", ["s"], ["y"], to=TensorProto.FLOAT)],
    ),
]

LINEAR = [
    case("MatMul-4d", [N("MatMul", ["x", "w"], ["y"])], inits={"w": f32(5, 4)}, atol=1e-4),
    case("MatMul-2d", [N("MatMul", ["x", "w"], ["y"])], (4, 6), inits={"w": f32(6, 3)}, atol=1e-4),
    case("MatMul-vector", [N("MatMul", ["x", "w"], ["y"])], inits={"w": f32(5)}, atol=1e-4),
    case(
        "Gemm-plain",
        [N("Gemm", ["x", "w", "c"], ["y"])],
        (4, 6),
        inits={"w": f32(6, 3), "c": f32(3)},
        atol=1e-4,
    ),
    case(
        "Gemm-transB",
        [N("Gemm", ["x", "w", "c"], ["y"], transB=1)],
        (4, 6),
        inits={"w": f32(3, 6), "c": f32(3)},
        atol=1e-4,
    ),
    case(
        "Gemm-alpha-beta-fullC",
        [N("Gemm", ["x", "w", "c"], ["y"], alpha=0.5, beta=2.0)],
        (4, 6),
        inits={"w": f32(6, 3), "c": f32(4, 3)},
        atol=1e-4,
    ),
    case(
        "Gemm-transA-rowC",
        [N("Gemm", ["x", "w", "c"], ["y"], transA=1, transB=1)],
        (6, 4),
        inits={"w": f32(3, 6), "c": f32(1, 3)},
        atol=1e-4,
    ),
    case(
        "Gemm-11-no-C",
        [N("Gemm", ["x", "w"], ["y"], transB=1)],
        (4, 6),
        opset=11,
        inits={"w": f32(3, 6)},
        atol=1e-4,
    ),
    case(
        "Gemm-9-scalar-C",
        [N("Gemm", ["x", "w", "c"], ["y"], beta=0.5)],
        (4, 6),
        opset=9,
        inits={"w": f32(6, 3), "c": np.float32(0.7)},
        atol=1e-4,
    ),
]

CONV = [
    conv("Conv-pads1", (2, 3, 7, 7), (4, 3, 3, 3), pads=[1, 1, 1, 1]),
    conv("Conv-stride2-nobias", (2, 3, 8, 8), (4, 3, 3, 3), bias=False, strides=[2, 2]),
    conv("Conv-depthwise", (2, 6, 7, 7), (6, 1, 3, 3), group=6, pads=[1, 1, 1, 1]),
    conv("Conv-groups2", (2, 6, 7, 7), (4, 3, 3, 3), group=2),
    conv("Conv-dilations", (2, 3, 9, 9), (4, 3, 3, 3), dilations=[2, 2], pads=[2, 2, 2, 2]),
    conv("Conv-asymmetric-pads", (2, 3, 7, 7), (4, 3, 3, 3), pads=[0, 1, 2, 1]),
    conv(
        "Conv-same-upper-stride2", (2, 3, 8, 8), (4, 3, 3, 3), auto_pad="SAME_UPPER", strides=[2, 2]
    ),
    conv("Conv-same-lower-even-kernel", (2, 3, 7, 7), (4, 3, 2, 2), auto_pad="SAME_LOWER"),
    conv(
        "Conv-same-stride-beyond-kernel",
        (2, 3, 5, 5),
        (4, 3, 1, 1),
        auto_pad="SAME_UPPER",
        strides=[3, 3],
    ),
    conv(
        "Conv-same-negative-pad-is-dropped",
        (2, 3, 9, 6),
        (4, 3, 1, 1),
        auto_pad="SAME_UPPER",
        strides=[3, 3],
    ),
    conv("Conv-valid", (2, 3, 7, 7), (4, 3, 3, 3), auto_pad="VALID", strides=[2, 2]),
    conv("Conv-1d", (2, 3, 9), (4, 3, 3), pads=[1, 2], strides=[2]),
    conv("Conv-3d", (1, 2, 5, 5, 5), (3, 2, 3, 3, 3), pads=[1, 1, 1, 1, 1, 1]),
]

POOLS = [
    pool("MaxPool-k2s2", "MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
    pool("MaxPool-k3s2p1", "MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    pool(
        "MaxPool-ceil",
        "MaxPool",
        (2, 3, 6, 6),
        kernel_shape=[3, 3],
        strides=[2, 2],
        pads=[1, 1, 1, 1],
        ceil_mode=1,
    ),
    pool(
        "MaxPool-ceil-last-window-dropped",
        "MaxPool",
        (1, 2, 5, 5),
        kernel_shape=[3, 3],
        strides=[3, 3],
        pads=[1, 1, 1, 1],
        ceil_mode=1,
    ),
    pool(
        "MaxPool-asymmetric-pads", "MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[0, 1, 2, 0]
    ),
    pool("MaxPool-large-pads", "MaxPool", kernel_shape=[4, 4], pads=[3, 3, 3, 3]),
    pool(
        "MaxPool-dilations",
        "MaxPool",
        (2, 3, 9, 9),
        kernel_shape=[2, 2],
        dilations=[2, 2],
        pads=[1, 1, 1, 1],
        opset=12,
    ),
    pool(
        "MaxPool-same-upper", "MaxPool", kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_UPPER"
    ),
    pool(
        "MaxPool-same-lower", "MaxPool", kernel_shape=[2, 2], strides=[2, 2], auto_pad="SAME_LOWER"
    ),
    pool("MaxPool-valid", "MaxPool", kernel_shape=[3, 3], strides=[2, 2], auto_pad="VALID"),
    pool("MaxPool-1d", "MaxPool", (2, 3, 9), kernel_shape=[3], strides=[2], pads=[1, 1]),
    pool("MaxPool-8", "MaxPool", kernel_shape=[3, 3], strides=[2, 2], opset=8),
    pool(
        "MaxPool-window-longer-than-input",
        "MaxPool",
        (2, 2, 3),
        kernel_shape=[4],
        strides=[3],
        auto_pad="VALID",
    ),
    pool(
        "MaxPool-ceil-empty-output",
        "MaxPool",
        (2, 2, 3, 3),
        kernel_shape=[4, 1],
        strides=[3, 3],
        dilations=[2, 1],
        auto_pad="VALID",
        ceil_mode=1,
    ),
    pool(
        "MaxPool-same-lower-negative-pads",
        "MaxPool",
        (2, 2, 5, 9),
        kernel_shape=[3, 2],
        strides=[3, 3],
        dilations=[1, 2],
        auto_pad="SAME_LOWER",
    ),
    pool("GlobalMaxPool", "GlobalMaxPool"),
    pool("GlobalAveragePool", "GlobalAveragePool"),
]
for _include in (0, 1):
    _c = {"count_include_pad": _include}
    POOLS += [
        pool(
            f"AveragePool-k2s2-cip{_include}",
            "AveragePool",
            kernel_shape=[2, 2],
            strides=[2, 2],
            **_c,
        ),
        pool(
            f"AveragePool-p1-cip{_include}",
            "AveragePool",
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            **_c,
        ),
        pool(
            f"AveragePool-asymmetric-cip{_include}",
            "AveragePool",
            kernel_shape=[3, 3],
            pads=[0, 2, 1, 0],
            **_c,
        ),
        pool(
            f"AveragePool-ceil-past-pads-cip{_include}",
            "AveragePool",
            (2, 3, 6, 6),
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
            ceil_mode=1,
            **_c,
        ),
        pool(
            f"AveragePool-ceil-nopads-cip{_include}",
            "AveragePool",
            (2, 3, 5, 5),
            kernel_shape=[2, 2],
            strides=[2, 2],
            ceil_mode=1,
            **_c,
        ),
        pool(
            f"AveragePool-same-upper-cip{_include}",
            "AveragePool",
            kernel_shape=[2, 2],
            strides=[2, 2],
            auto_pad="SAME_UPPER",
            **_c,
        ),
        pool(
            f"AveragePool-same-lower-cip{_include}",
            "AveragePool",
            kernel_shape=[3, 3],
            auto_pad="SAME_LOWER",
            **_c,
        ),
        pool(
            f"AveragePool-1d-cip{_include}",
            "AveragePool",
            (2, 3, 9),
            kernel_shape=[3],
            strides=[2],
            pads=[1, 1],
            ceil_mode=1,
            **_c,
        ),
        pool(
            f"AveragePool-19-dilations-cip{_include}",
            "AveragePool",
            (2, 3, 9, 9),
            kernel_shape=[2, 2],
            dilations=[2, 2],
            pads=[1, 1, 1, 1],
            opset=19,
            **_c,
        ),
    ]

SHAPES = [
    case("Flatten-default", unary("Flatten")),
    case("Flatten-axis0", unary("Flatten", axis=0)),
    case("Flatten-axis2", unary("Flatten", axis=2)),
    case("Flatten-axis-neg", unary("Flatten", axis=-1)),
    case("Reshape-copy-and-infer", [N("Reshape", ["x", "s"], ["y"])], inits={"s": i64(0, -1)}),
    case("Reshape-static", [N("Reshape", ["x", "s"], ["y"])], inits={"s": i64(6, -1, 5)}),
    case(
        "Reshape-14-allowzero",
        [N("Reshape", ["x", "s"], ["y"], allowzero=1)],
        opset=14,
        inits={"s": i64(2, 75)},
    ),
    case(
        "Reshape-dynamic-batch",
        [
            N("Shape", ["x"], ["s"]),
            N("Gather", ["s", "zero"], ["n"]),
            N("Unsqueeze", ["n", "ax"], ["n1"]),
            N("Concat", ["n1", "minus1"], ["t"], axis=0),
            N("Reshape", ["x", "t"], ["y"]),
        ],
        inits={"zero": i64(0).reshape(()), "ax": i64(0), "minus1": i64(-1)},
    ),
    case("Transpose-default", unary("Transpose")),
    case("Transpose-perm", unary("Transpose", perm=[0, 2, 3, 1])),
    case("Concat-axis1", [N("Concat", ["x", "b"], ["y"], axis=1)], inits={"b": f32(2, 2, 5, 5)}),
    case(
        "Concat-negative-axis",
        [N("Concat", ["b", "x"], ["y"], axis=-1)],
        inits={"b": f32(2, 3, 5, 2)},
    ),
    case(
        "Split-11-attr",
        [N("Split", ["x"], ["y", "z"], axis=1, split=[1, 2])],
        opset=11,
        outputs=("y", "z"),
    ),
    case(
        "Split-11-equal",
        [N("Split", ["x"], ["y", "z", "w"], axis=1)],
        opset=11,
        outputs=("y", "z", "w"),
    ),
    case(
        "Split-13-input",
        [N("Split", ["x", "s"], ["y", "z"], axis=2)],
        opset=13,
        inits={"s": i64(4, 1)},
        outputs=("y", "z"),
    ),
    case(
        "Split-13-equal",
        [N("Split", ["x"], ["y", "z", "w"], axis=1)],
        opset=13,
        outputs=("y", "z", "w"),
    ),
    case(
        "Split-18-num-outputs-uneven",
        [N("Split", ["x"], ["y", "z"], axis=3, num_outputs=2)],
        opset=18,
        outputs=("y", "z"),
    ),
    case("Slice-9-attrs", unary("Slice", starts=[1, -3], ends=[3, 100], axes=[1, 3]), opset=9),
    case("Slice-9-no-axes", unary("Slice", starts=[0, 1], ends=[1, -1]), opset=9),
    case(
        "Slice-13-steps",
        [N("Slice", ["x", "s", "e", "a", "st"], ["y"])],
        inits={"s": i64(0, 4), "e": i64(INT64_MAX, 0), "a": i64(2, 3), "st": i64(2, -2)},
    ),
    case(
        "Slice-13-reverse-all",
        [N("Slice", ["x", "s", "e", "a", "st"], ["y"])],
        inits={"s": i64(-1), "e": i64(INT64_MIN), "a": i64(1), "st": i64(-1)},
    ),
    case(
        "Slice-13-negative-starts",
        [N("Slice", ["x", "s", "e"], ["y"])],
        inits={"s": i64(-1, -2, -4), "e": i64(INT64_MAX, -1, 4)},
    ),
    case(
        "Slice-13-empty",
        [N("Slice", ["x", "s", "e", "a"], ["y"])],
        inits={"s": i64(3), "e": i64(1), "a": i64(2)},
    ),
    case(
        "Slice-13-dynamic-ends",
        [
            N("Shape", ["x"], ["sh"]),
            N("Slice", ["sh", "one", "three"], ["e"]),
            N("Div", ["e", "two"], ["half"]),
            N("Slice", ["x", "zero2", "half", "a"], ["y"]),
        ],
        inits={"one": i64(1), "three": i64(3), "two": i64(2), "zero2": i64(0, 0), "a": i64(1, 2)},
    ),
    case("Squeeze-11-attr", unary("Squeeze", axes=[1]), (2, 1, 5, 1), opset=11),
    case("Squeeze-11-all", unary("Squeeze"), (2, 1, 5, 1), opset=11),
    case(
        "Squeeze-13-input", [N("Squeeze", ["x", "a"], ["y"])], (2, 1, 5, 1), inits={"a": i64(-1, 1)}
    ),
    case("Squeeze-13-all", [N("Squeeze", ["x"], ["y"])], (2, 1, 5, 1)),
    case("Unsqueeze-11-attr", unary("Unsqueeze", axes=[0, 3]), (2, 3), opset=11),
    case(
        "Unsqueeze-13-input", [N("Unsqueeze", ["x", "a"], ["y"])], (2, 3), inits={"a": i64(-1, 0)}
    ),
    case("Shape-13", unary("Shape")),
    case("Shape-15-start-end", unary("Shape", start=1, end=-1), opset=15),
    case("Shape-15-start-only", unary("Shape", start=-2), opset=15),
    case("Gather-axis1", [N("Gather", ["x", "i"], ["y"], axis=1)], inits={"i": i64(2, 0)}),
    case(
        "Gather-scalar", [N("Gather", ["x", "i"], ["y"], axis=2)], inits={"i": i64(3).reshape(())}
    ),
    case("Gather-negative", [N("Gather", ["x", "i"], ["y"], axis=-1)], inits={"i": i64(-1, 1)}),
    case(
        "Gather-2d-indices",
        [N("Gather", ["x", "i"], ["y"])],
        inits={"i": np.array([[1, 0], [-1, 1]], np.int64)},
    ),
    case(
        "Gather-dynamic-indices",
        [
            N("Shape", ["x"], ["s"]),
            N("Sub", ["s", "s5"], ["i"]),
            N("Gather", ["x", "i"], ["y"], axis=3),
        ],
        inits={"s5": i64(5, 5, 5, 5)},
    ),
    case("Expand", [N("Expand", ["x", "s"], ["y"])], (3, 1), inits={"s": i64(2, 3, 4)}),
    case(
        "Expand-smaller-shape", [N("Expand", ["x", "s"], ["y"])], (2, 3, 1), inits={"s": i64(1, 5)}
    ),
]


def _const(name, **attrs):
    return N("Constant", [], [name], **attrs)


CONSTANTS = [
    case(
        "Constant-value",
        [
            _const("c", value=helper.make_tensor("v", TensorProto.FLOAT, [5], list(range(5)))),
            N("Add", ["x", "c"], ["y"]),
        ],
    ),
    case("Constant-value-float", [_const("c", value_float=2.5), N("Mul", ["x", "c"], ["y"])]),
    case(
        "Constant-value-floats",
        [_const("c", value_floats=[1.0, 2.0, 3.0, 4.0, 5.0]), N("Mul", ["x", "c"], ["y"])],
    ),
    case(
        "Constant-value-int",
        [_const("c", value_int=3), N("Shape", ["x"], ["s"]), N("Mul", ["s", "c"], ["y"])],
    ),
    case(
        "Constant-value-ints",
        [
            _const("c", value_ints=[1, 2, 3, 4]),
            N("Shape", ["x"], ["s"]),
            N("Add", ["s", "c"], ["y"]),
        ],
    ),
    case(
        "ConstantOfShape-float",
        [
            N("Shape", ["x"], ["s"]),
            N(
                "ConstantOfShape",
                ["s"],
                ["c"],
                value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5]),
            ),
            N("Add", ["x", "c"], ["y"]),
        ],
    ),
    case("ConstantOfShape-default", [N("Shape", ["x"], ["s"]), N("ConstantOfShape", ["s"], ["y"])]),
    case(
        "ConstantOfShape-int64",
        [
            N("Shape", ["x"], ["s"]),
            N(
                "ConstantOfShape",
                ["s"],
                ["y"],
                value=helper.make_tensor("v", TensorProto.INT64, [1], [7]),
            ),
        ],
    ),
]

PADS = [
    case("Pad-9-constant", unary("Pad", pads=[0, 0, 1, 2, 0, 1, 0, 1], value=1.5), opset=9),
    case("Pad-9-reflect", unary("Pad", mode="reflect", pads=[0, 0, 2, 1, 0, 0, 1, 2]), opset=9),
    case("Pad-9-edge", unary("Pad", mode="edge", pads=[0, 0, 1, 0, 0, 0, 2, 3]), opset=9),
    case(
        "Pad-11-constant-value",
        [N("Pad", ["x", "p", "v"], ["y"])],
        opset=11,
        inits={"p": i64(0, 1, 1, 0, 0, 0, 2, 1), "v": np.float32(-2.0)},
    ),
    case(
        "Pad-11-reflect",
        [N("Pad", ["x", "p"], ["y"], mode="reflect")],
        opset=11,
        inits={"p": i64(0, 0, 1, 3, 0, 0, 2, 1)},
    ),
    case(
        "Pad-11-edge-rank2",
        [N("Pad", ["x", "p"], ["y"], mode="edge")],
        (3, 4),
        opset=11,
        inits={"p": i64(2, 1, 0, 3)},
    ),
    case(
        "Pad-11-negative",
        [N("Pad", ["x", "p"], ["y"])],
        opset=11,
        inits={"p": i64(0, 0, -1, 2, 0, 0, 1, -2)},
    ),
    case(
        "Pad-18-axes",
        [N("Pad", ["x", "p", "", "a"], ["y"], mode="reflect")],
        opset=18,
        inits={"p": i64(1, 2, 2, 1), "a": i64(-1, 2)},
    ),
    case(
        "Pad-19-wrap",
        [N("Pad", ["x", "p"], ["y"], mode="wrap")],
        opset=19,
        inits={"p": i64(0, 0, 1, 2, 0, 0, 2, 1)},
    ),
]

REDUCTIONS = [
    case("ReduceMean-13-keepdims", unary("ReduceMean", axes=[2, 3])),
    case("ReduceMean-13-no-keepdims", unary("ReduceMean", axes=[1], keepdims=0)),
    case("ReduceMean-13-all", unary("ReduceMean", keepdims=0)),
    case(
        "ReduceMean-18-input",
        [N("ReduceMean", ["x", "a"], ["y"])],
        opset=18,
        inits={"a": i64(-1, 1)},
    ),
    case(
        "ReduceMean-18-empty-noop",
        [N("ReduceMean", ["x", "a"], ["y"], noop_with_empty_axes=1)],
        opset=18,
        inits={"a": np.zeros(0, np.int64)},
    ),
    case("ReduceMean-18-no-axes", [N("ReduceMean", ["x"], ["y"])], opset=18),
    case("ReduceSum-11-attr", unary("ReduceSum", axes=[1, 2]), opset=11),
    case(
        "ReduceSum-13-input",
        [N("ReduceSum", ["x", "a"], ["y"], keepdims=0)],
        inits={"a": i64(0, 3)},
    ),
    case("ReduceSum-13-noop", [N("ReduceSum", ["x"], ["y"], noop_with_empty_axes=1)]),
    case("ReduceMax-13-attr", unary("ReduceMax", axes=[3], keepdims=0)),
    case(
        "ReduceMax-18-input", [N("ReduceMax", ["x", "a"], ["y"])], opset=18, inits={"a": i64(2, 3)}
    ),
]

CASES = ELEMENTWISE + ACTIVATIONS + LINEAR + CONV + POOLS + SHAPES + CONSTANTS + PADS + REDUCTIONS


@pytest.mark.parametrize("nodes, shape, opset, inits, outputs, atol, positive", CASES)
def test_op_matches_onnxruntime(nodes, shape, opset, inits, outputs, atol, positive):
    assert_op_matches_onnxruntime(nodes, shape, opset, inits, outputs, atol, positive)


def test_every_supported_op_has_a_case():
    from test_engine_ops_modern import CASES as MODERN  # transformer and modern-CNN ops

    covered = {node.op_type for param in CASES + MODERN for node in param.values[0]}
    assert SUPPORTED_OPS - covered == set()


def test_lrn_even_size_follows_the_onnx_formula():
    # onnxruntime's CPU LRN refuses even sizes, and torch's local_response_norm centres an
    # even window the other way: check the ONNX formula by hand, window 1 before, 2 after
    # (rtol: ONNX stores alpha as float32).
    size, alpha, beta, bias = 4, 0.2, 0.75, 1.5
    x = np.random.default_rng(2).standard_normal((2, 6, 3, 3))
    proto = make_onnx_model(
        [N("LRN", ["x"], ["y"], size=size, alpha=alpha, beta=beta, bias=bias)], x.shape
    )
    got = Engine(from_proto(proto), dtype=torch.float64)(torch.from_numpy(x)).numpy()

    sums = np.stack([(x[:, max(0, c - 1) : c + 3] ** 2).sum(1) for c in range(6)], axis=1)
    np.testing.assert_allclose(got, x / (bias + alpha / size * sums) ** beta, rtol=1e-6)
