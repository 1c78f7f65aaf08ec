"""ONNX operators as small PyTorch closures, registered by (op_type, since_version).

A builder runs once per node when the Engine compiles a graph: it parses the node's
attributes, reads its static inputs (initializers and constant-folded tensors) and returns
`fn(*inputs)`, the node's whole runtime work. `inputs` are the node's inputs in order, None
where an optional input is absent; `fn` returns one tensor, or a tuple when the node has
several outputs. The builder chosen for a node is the one with the highest `since` not above
the model's opset, the same rule as the ONNX operator changelog.

Conventions shared by every op, because onnxruntime and torch differ on them:
- float tensors compute in the engine's dtype (float16/float/double in the graph alike);
  integer tensors are int64 and bool stays bool;
- integer tensors (shapes, axes, indices) live on the host: Shape returns a CPU tensor, so
  a dynamic-batch Reshape reads its target shape without a device sync;
- whatever a torch op needs as Python ints is parsed here, at compile time, when it is static.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import reduce

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from ..core.errors import MmexportError

Builder = Callable[["OpNode"], Callable]

_REGISTRY: dict[str, list[tuple[int, Builder]]] = {}


def op(*op_types: str, since: int = 1):
    """Register a builder for `op_types` from opset `since` on."""

    def deco(builder: Builder) -> Builder:
        for op_type in op_types:
            versions = _REGISTRY.setdefault(op_type, [])
            versions.append((since, builder))
            versions.sort(key=lambda v: v[0])
        return builder

    return deco


def builder_for(op_type: str, opset: int) -> Builder | None:
    """The builder for `op_type` at `opset`, or None if the op is not supported there."""
    chosen = None
    for since, builder in _REGISTRY.get(op_type, ()):
        if since <= opset:
            chosen = builder
    return chosen


def supported_ops() -> frozenset[str]:
    return frozenset(_REGISTRY)


class Runtime:
    """Where float tensors created at run time go; the Engine updates it on `.to()`.

    `fixed_batch`: the batch size the model's input is fixed at (None: free); `batch`: the
    batch of the call running now (None while compiling), so a Reshape whose constant shape
    bakes in the fixed batch can follow a larger one (`rebatch`).
    """

    def __init__(self, device: torch.device, dtype: torch.dtype, fixed_batch: int | None = None):
        self.device = device
        self.dtype = dtype
        self.fixed_batch = fixed_batch
        self.batch: int | None = None


class OpNode:
    """What a builder sees: one ONNX node with parsed attributes and its static inputs."""

    def __init__(
        self,
        proto: onnx.NodeProto,
        opset: int,
        static: dict[str, torch.Tensor],
        runtime: Runtime,
        where: str,
    ):
        self.proto = proto
        self.name = proto.name
        self.op_type = proto.op_type
        self.opset = opset
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.rt = runtime
        self._static = static
        self._where = where
        self.attrs = {a.name: self._attr_value(a) for a in proto.attribute}

    def _attr_value(self, attr: onnx.AttributeProto):
        value = onnx.helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, onnx.TensorProto):
            return numpy_helper.to_array(value)
        if isinstance(value, list):
            return [v.decode() if isinstance(v, bytes) else v for v in value]
        return value

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)

    def attr(self, name: str, default=None):
        return self.attrs.get(name, default)

    def has_input(self, i: int) -> bool:
        return i < len(self.inputs) and self.inputs[i] != ""

    def const(self, i: int) -> torch.Tensor | None:
        """Input `i` as a CPU tensor if it is static, else None (dynamic or absent)."""
        if not self.has_input(i):
            return None
        return self._static.get(self.inputs[i])

    def is_static(self, i: int) -> bool:
        """True when input `i` is absent or known at compile time."""
        return not self.has_input(i) or self.inputs[i] in self._static

    def const_ints(self, i: int) -> list[int] | None:
        t = self.const(i)
        return None if t is None else [int(v) for v in t.reshape(-1).tolist()]

    def fail(self, message: str) -> MmexportError:
        label = self.name or (self.outputs[0] if self.outputs else "?")
        return MmexportError(f"{self._where}: node {label!r} ({self.op_type}): {message}")

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """A numpy constant as an engine tensor (see the module conventions), on the host."""
        return to_torch(array, self.rt.dtype, lambda m: self.fail(m))


def to_torch(array: np.ndarray, float_dtype: torch.dtype, fail=None) -> torch.Tensor:
    array = np.asarray(array)
    kind = array.dtype.kind
    if kind == "f" and array.dtype == np.float32 and float_dtype == torch.float32:
        return torch.from_numpy(np.array(array))  # the same values as through float64, half the memory
    if kind == "f" or array.dtype.name in ("bfloat16",):
        return torch.from_numpy(np.array(array, dtype=np.float64)).to(float_dtype)
    if kind == "b":
        return torch.from_numpy(np.array(array, dtype=np.bool_))
    if kind in "iu":
        return torch.from_numpy(np.array(array, dtype=np.int64))
    message = f"tensors of type {array.dtype} are not supported"
    raise fail(message) if fail else MmexportError(message)


def _as_ints(t) -> list[int]:
    return [int(v) for v in (t.reshape(-1).tolist() if isinstance(t, torch.Tensor) else t)]


def _same_device(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Move host tensors next to the one on an accelerator (shape math meeting data)."""
    device = next((t.device for t in tensors if t.device.type != "cpu"), None)
    if device is None:
        return list(tensors)
    return [t.to(device) for t in tensors]


def _device_safe(f: Callable) -> Callable:
    """Call `f`; only if devices clash, retry with all inputs on one device (no cost otherwise)."""

    def fn(*args):
        try:
            return f(*args)
        except RuntimeError:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if len({t.device for t in tensors}) < 2:
                raise
            return f(*_same_device(*args))

    return fn


def _torch_pads(pads: list[int], nd: int) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] for the last nd dims -> F.pad order (last dim first)."""
    out = []
    for i in reversed(range(nd)):
        out += [pads[i], pads[i + nd]]
    return out


# --- elementwise -----------------------------------------------------------------------------


def _unary(op_type: str, f: Callable, since: int = 1):
    op(op_type, since=since)(lambda node: f)


_unary("Relu", torch.relu)
_unary("Sigmoid", torch.sigmoid)
_unary("Tanh", torch.tanh)
_unary("Neg", torch.neg)
_unary("Exp", torch.exp)
_unary("Log", torch.log)
_unary("Sqrt", torch.sqrt)
_unary("Abs", torch.abs)
_unary("Erf", torch.erf)
_unary("Reciprocal", torch.reciprocal)
_unary("Floor", torch.floor)
_unary("Ceil", torch.ceil)
_unary("Round", torch.round, since=11)  # half to even, as ONNX
_unary("Sign", torch.sign, since=9)
_unary("Sin", torch.sin, since=7)
_unary("Cos", torch.cos, since=7)
_unary("Softsign", F.softsign)
_unary("Softplus", F.softplus)
_unary("HardSwish", F.hardswish, since=14)
_unary("Mish", F.mish, since=18)
_unary("Not", torch.logical_not)
_unary("IsNaN", torch.isnan, since=9)


@op("Identity")
def identity(node):
    return lambda x: x


@op("HardSigmoid")
def hard_sigmoid(node):
    alpha, beta = float(node.attr("alpha", 0.2)), float(node.attr("beta", 0.5))
    if alpha == 1.0 and beta == 0.0:  # a unit clip (a folded bound): exact, no multiply
        return lambda x: torch.clamp(x, 0.0, 1.0)
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


@op("LeakyRelu")
def leaky_relu(node):
    alpha = float(node.attr("alpha", 0.01))
    return lambda x: F.leaky_relu(x, alpha)


@op("Elu")
def elu(node):
    alpha = float(node.attr("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@op("Celu", since=12)
def celu(node):
    alpha = float(node.attr("alpha", 1.0))
    return lambda x: F.celu(x, alpha)


@op("Selu")
def selu(node):
    """gamma * elu(x, alpha), with the node's constants (torch's selu fixes its own)."""
    alpha = float(node.attr("alpha", 1.67326319217681884765625))
    gamma = float(node.attr("gamma", 1.05070102214813232421875))
    return lambda x: F.elu(x, alpha) * gamma


@op("ThresholdedRelu", since=10)
def thresholded_relu(node):
    alpha = float(node.attr("alpha", 1.0))
    return lambda x: F.threshold(x, alpha, 0.0)


@op("Gelu", since=20)
def gelu(node):
    approximate = node.attr("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise node.fail(f"approximate {approximate!r} is not supported")
    return lambda x: F.gelu(x, approximate=approximate)


@op("PRelu")
def prelu(node):
    """x where x >= 0, slope * x below: the slope broadcasts numpy-style ([C, 1, 1] over NCHW)."""
    return _device_safe(lambda x, slope: torch.where(x < 0, x * slope, x))


def _div(a, b):
    if a.is_floating_point():
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")  # C-style integer division, as onnxruntime


def _pow(a, b):
    y = torch.pow(a, b)
    return y if y.dtype == a.dtype else y.to(a.dtype)  # ONNX: the result has X's type


def _binary(op_type: str, f: Callable, since: int = 1):
    g = _device_safe(f)
    op(op_type, since=since)(lambda node: g)


_binary("Add", torch.add)
_binary("Sub", torch.sub)
_binary("Mul", torch.mul)
_binary("Div", _div)
_binary("Pow", _pow)
_binary("Equal", torch.eq)
_binary("Less", torch.lt)
_binary("Greater", torch.gt)
_binary("LessOrEqual", torch.le, since=12)
_binary("GreaterOrEqual", torch.ge, since=12)
_binary("And", torch.logical_and)
_binary("Or", torch.logical_or)
_binary("Xor", torch.logical_xor)
_binary("Where", torch.where)  # ternary, but the same device-safe wrapper applies


@op("Mod", since=10)
def mod(node):
    # fmod=0: the result takes the divisor's sign (Python %); fmod=1: the dividend's (C fmod).
    return _device_safe(torch.fmod if node.attr("fmod", 0) else torch.remainder)


def _variadic(f: Callable, finish: Callable | None = None):
    def build(node):
        g = _device_safe(f)

        def fn(*xs):
            y = reduce(g, xs)
            return finish(y, len(xs)) if finish else y

        return fn

    return build


op("Sum")(_variadic(torch.add))
op("Min")(_variadic(torch.minimum))
op("Max")(_variadic(torch.maximum))
op("Mean")(_variadic(torch.add, lambda y, n: y / n))


@op("Clip")
def clip_attrs(node):
    lo, hi = node.attr("min"), node.attr("max")
    if lo is None and hi is None:
        return lambda x: x
    return lambda x: torch.clamp(x, lo, hi)


@op("Clip", since=11)
def clip_inputs(node):
    if node.is_static(1) and node.is_static(2):
        lo, hi = node.const(1), node.const(2)
        lo = None if lo is None else lo.item()
        hi = None if hi is None else hi.item()
        if lo is None and hi is None:
            return lambda x, *_: x
        return lambda x, *_: torch.clamp(x, lo, hi)

    def fn(x, lo=None, hi=None):
        if lo is not None:
            x = torch.maximum(x, lo.to(x.device))
        if hi is not None:
            x = torch.minimum(x, hi.to(x.device))
        return x

    return fn


def _softmax_fn(op_type: str) -> Callable:
    return F.softmax if op_type == "Softmax" else F.log_softmax


@op("Softmax", "LogSoftmax")
def softmax_2d(node):
    """Before opset 13: coerce to 2-D at `axis` and normalise over the flattened tail."""
    axis = int(node.attr("axis", 1))
    f = _softmax_fn(node.op_type)

    def fn(x):
        shape = x.shape
        ax = axis + len(shape) if axis < 0 else axis
        return f(x.reshape(math.prod(shape[:ax]), -1), dim=1).reshape(shape)

    return fn


@op("Softmax", "LogSoftmax", since=13)
def softmax_axis(node):
    axis = int(node.attr("axis", -1))
    f = _softmax_fn(node.op_type)
    return lambda x: f(x, dim=axis)


@op("Cast")
def cast(node):
    to = node.attr("to")
    if isinstance(to, str):  # opset 1 named the type
        to = onnx.TensorProto.DataType.Value(to.upper())
    to = int(to)
    T = onnx.TensorProto
    if to in (T.FLOAT, T.DOUBLE):
        return lambda x: x.to(node.rt.dtype)
    if to in (T.FLOAT16, T.BFLOAT16):
        narrow = torch.float16 if to == T.FLOAT16 else torch.bfloat16
        return lambda x: x.to(narrow).to(node.rt.dtype)  # keep the rounding, not the type
    if to == T.BOOL:
        return lambda x: x != 0
    if to in (T.INT8, T.INT16, T.INT32, T.INT64, T.UINT8, T.UINT16, T.UINT32, T.UINT64):
        return lambda x: x.to(torch.int64)  # truncates toward zero, as onnxruntime
    raise node.fail(f"cast to {T.DataType.Name(to)} is not supported")


@op("CastLike", since=15)
def cast_like(node):
    """Cast to the kind of the second input: float (the engine's dtype), bool or int64."""

    def fn(x, like):
        if like.is_floating_point():
            return x.to(node.rt.dtype)
        if like.dtype == torch.bool:
            return x != 0
        return x.to(torch.int64)

    return fn


# --- linear algebra --------------------------------------------------------------------------


@op("MatMul")
def matmul(node):
    return torch.matmul


@op("Gemm")
def gemm(node):
    alpha = float(node.attr("alpha", 1.0))
    beta = float(node.attr("beta", 1.0))
    trans_a = bool(node.attr("transA", 0))
    trans_b = bool(node.attr("transB", 0))

    def fn(a, b, c=None):
        if trans_a:
            a = a.t()
        if not trans_b:
            b = b.t()  # F.linear wants [N, K]
        if c is not None and alpha == 1.0 and beta == 1.0 and c.dim() == 1:
            return F.linear(a, b, c)
        y = F.linear(a, b)
        if alpha != 1.0:
            y = y * alpha
        if c is not None and beta != 0.0:
            y = y + (c if beta == 1.0 else beta * c)
        return y

    return fn


@op("Einsum", since=12)
def einsum(node):
    equation = node.attr("equation", "").replace(" ", "")
    if not equation:
        raise node.fail("the equation attribute is required")
    return lambda *xs: torch.einsum(equation, *xs)


# --- convolution and pooling -----------------------------------------------------------------


def _spatial(node, name: str, nd: int, default: int) -> list[int]:
    value = node.attr(name)
    return [default] * nd if value is None else [int(v) for v in value]


def _trunc_div(a: int, b: int) -> int:
    """C++ integer division (toward zero), which onnxruntime's shape arithmetic uses."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _same_pads(in_sizes, kernels, strides, dilations, lower: bool, clamp: bool) -> list[int]:
    """auto_pad SAME_*: output = ceil(in / stride), the odd pad at the end (UPPER) or the
    start (LOWER). A stride longer than the kernel gives a negative pad: onnxruntime's Conv
    drops it (`clamp`), its pools keep it and crop, halving it with C++ division."""
    begins, ends = [], []
    for size, k, s, d in zip(in_sizes, kernels, strides, dilations, strict=True):
        out = (size + s - 1) // s
        total = (out - 1) * s + (k - 1) * d + 1 - size
        if clamp:
            total = max(0, total)
        head = _trunc_div(total + 1, 2) if lower else _trunc_div(total, 2)
        begins.append(head)
        ends.append(total - head)
    return begins + ends


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@op("Conv")
def conv(node):
    group = int(node.attr("group", 1))
    auto_pad = node.attr("auto_pad", "NOTSET") or "NOTSET"
    kernel_attr = node.attr("kernel_shape")
    weight = node.const(1)

    def geometry(nd: int):
        strides = _spatial(node, "strides", nd, 1)
        dilations = _spatial(node, "dilations", nd, 1)
        pads = _spatial(node, "pads", 2 * nd, 0)
        return strides, dilations, pads

    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise node.fail(f"auto_pad {auto_pad!r} is not supported")

    def build(nd: int):
        if nd not in _CONV:
            raise node.fail(f"{nd}-D convolution is not supported")
        conv_nd = _CONV[nd]
        strides, dilations, pads = geometry(nd)
        if auto_pad == "VALID":
            pads = [0] * (2 * nd)
        if auto_pad in ("NOTSET", "VALID"):
            if pads[:nd] == pads[nd:]:
                sym = pads[:nd]
                return lambda x, w, b=None: conv_nd(x, w, b, strides, sym, dilations, group)
            tpads = _torch_pads(pads, nd)
            return lambda x, w, b=None: conv_nd(F.pad(x, tpads), w, b, strides, 0, dilations, group)

        lower = auto_pad == "SAME_LOWER"
        cache: dict[tuple, list[int]] = {}

        def same(x, w, b=None):
            key = tuple(x.shape[2:]) + tuple(w.shape[2:])
            tpads = cache.get(key)
            if tpads is None:
                kernels = kernel_attr or list(w.shape[2:])
                p = _same_pads(x.shape[2:], kernels, strides, dilations, lower, True)
                tpads = cache[key] = _torch_pads(p, nd)
            return conv_nd(F.pad(x, tpads), w, b, strides, 0, dilations, group)

        return same

    if kernel_attr is not None or weight is not None:
        nd = len(kernel_attr) if kernel_attr is not None else weight.dim() - 2
        return build(nd)

    built: dict[int, Callable] = {}

    def dynamic(x, w, b=None):  # weight computed at run time: rank known only then
        nd = w.dim() - 2
        if nd not in built:
            built[nd] = build(nd)
        return built[nd](x, w, b)

    return dynamic


def _pool_out_size(size, k, s, d, pb, pe, ceil_mode) -> int:
    """onnxruntime's output length of a pool along one axis, explicit pads."""
    span = (k - 1) * d + 1
    if ceil_mode:
        out = -((span - size - pb - pe) // s) + 1
        # A last window starting past the input and the left pad is dropped (as torch).
        if (out - 1) * s >= size + pb:
            out -= 1
        return out
    # Truncating division: a window longer than the padded input still gives one output.
    return _trunc_div(size + pb + pe - span, s) + 1


class _PoolGeometry:
    """Per-input-shape pads and output sizes of a pool, cached: shapes repeat across calls."""

    def __init__(self, node, nd: int, kernels: list[int], dilations: list[int]):
        self.nd = nd
        self.kernels = kernels
        self.dilations = dilations
        self.strides = _spatial(node, "strides", nd, 1)
        self.pads = _spatial(node, "pads", 2 * nd, 0)
        self.ceil_mode = bool(node.attr("ceil_mode", 0))
        self.auto_pad = node.attr("auto_pad", "NOTSET") or "NOTSET"
        if self.auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
            raise node.fail(f"auto_pad {self.auto_pad!r} is not supported")
        self._cache: dict[tuple, tuple] = {}

    def __call__(self, sizes: tuple) -> tuple[list[int], list[int]]:
        """(pads [b..., e...] as onnxruntime uses them, output sizes)."""
        hit = self._cache.get(sizes)
        if hit is None:
            nd = self.nd
            if self.auto_pad == "VALID":
                pads = [0] * (2 * nd)
            elif self.auto_pad.startswith("SAME"):
                # onnxruntime sizes SAME pads of pools with the undilated kernel.
                pads = _same_pads(
                    sizes,
                    self.kernels,
                    self.strides,
                    [1] * nd,
                    self.auto_pad == "SAME_LOWER",
                    False,
                )
            else:
                pads = self.pads
            outs = [
                _pool_out_size(
                    sizes[i],
                    self.kernels[i],
                    self.strides[i],
                    self.dilations[i],
                    pads[i],
                    pads[i + nd],
                    self.ceil_mode,
                )
                for i in range(nd)
            ]
            hit = self._cache[sizes] = (pads, outs)
        return hit

    def explicit_pads(self, sizes: tuple) -> list[int]:
        """F.pad pads that make a floor-mode, unpadded pool give exactly the onnxruntime windows."""
        pads, outs = self(sizes)
        nd = self.nd
        ends = []
        for i in range(nd):
            need = (outs[i] - 1) * self.strides[i] + (self.kernels[i] - 1) * self.dilations[i] + 1
            ends.append(max(pads[i + nd], need - pads[i] - sizes[i]))
        return _torch_pads(pads[:nd] + ends, nd)


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _torch_out_sizes(sizes, kernels, strides, dilations, pads, ceil_mode) -> list[int]:
    """What torch's own pooling gives with symmetric `pads` (floor division, not trunc)."""
    outs = []
    for n, k, s, d, p in zip(sizes, kernels, strides, dilations, pads, strict=True):
        span = (k - 1) * d + 1
        if ceil_mode:
            out = -((span - n - 2 * p) // s) + 1
            out -= (out - 1) * s >= n + p
        else:
            out = (n + 2 * p - span) // s + 1
        outs.append(out)
    return outs


def _pool_nd(node) -> int:
    kernels = node.attr("kernel_shape")
    if kernels is None:
        raise node.fail("kernel_shape is required")
    nd = len(kernels)
    if nd not in (1, 2, 3):
        raise node.fail(f"{nd}-D pooling is not supported")
    return nd


@op("MaxPool")
def max_pool(node):
    if node.num_outputs > 1 and node.outputs[1]:
        raise node.fail("the Indices output is not supported")
    nd = _pool_nd(node)
    kernels = [int(k) for k in node.attr("kernel_shape")]
    dilations = _spatial(node, "dilations", nd, 1)
    geo = _PoolGeometry(node, nd, kernels, dilations)
    pool = _MAXPOOL[nd]
    strides = geo.strides
    plans: dict[tuple, tuple] = {}

    def plan(sizes):
        pads, outs = geo(sizes)
        if min(outs) <= 0:
            return "empty", outs
        # torch's own padding (symmetric, at most half the kernel) gives the same windows as
        # onnxruntime, ceil_mode included (both drop a last window starting in the pad),
        # unless a window is longer than the padded input.
        if (
            pads[:nd] == pads[nd:]
            and all(0 <= 2 * p <= k for p, k in zip(pads[:nd], kernels, strict=True))
            and outs
            == _torch_out_sizes(sizes, kernels, strides, dilations, pads[:nd], geo.ceil_mode)
        ):
            return "native", pads[:nd]
        return "explicit", geo.explicit_pads(sizes)

    def fn(x):
        sizes = tuple(x.shape[2:])
        hit = plans.get(sizes)
        if hit is None:
            hit = plans[sizes] = plan(sizes)
        kind, arg = hit
        if kind == "native":
            return pool(x, kernels, strides, arg, dilations, ceil_mode=geo.ceil_mode)
        if kind == "explicit":
            return pool(F.pad(x, arg, value=-math.inf), kernels, strides, 0, dilations)
        return x.new_zeros((*x.shape[:2], *(max(o, 0) for o in arg)))

    return fn


@op("AveragePool")
def average_pool(node):
    """Sum over windows of the explicitly padded input, divided by a cached count map.

    The count map is a pool of ones over the positions that count: the input alone, or the
    input and its declared pads (count_include_pad) but never the extra cells a ceil_mode
    window runs past the pads, which onnxruntime does not count.
    """
    nd = _pool_nd(node)
    kernels = [int(k) for k in node.attr("kernel_shape")]
    dilations = _spatial(node, "dilations", nd, 1)
    geo = _PoolGeometry(node, nd, kernels, dilations)
    include_pad = bool(node.attr("count_include_pad", 0))
    strides = geo.strides
    window = math.prod(kernels)
    counts: dict[tuple, tuple] = {}

    def window_sum(x):
        # Depthwise convolution with ones: handles 1-3 D and dilation alike.
        c = x.shape[1]
        w = torch.ones((c, 1, *kernels), dtype=x.dtype, device=x.device)
        return _CONV[nd](x, w, None, strides, 0, dilations, c)

    def plan(sizes, x):
        pads, outs = geo(sizes)
        if min(outs) <= 0:
            return "empty", outs, None
        if (
            not geo.ceil_mode
            and all(d == 1 for d in dilations)
            and pads[:nd] == pads[nd:]
            and all(0 <= 2 * p <= k for p, k in zip(pads[:nd], kernels, strict=True))
            and outs == _torch_out_sizes(sizes, kernels, strides, dilations, pads[:nd], False)
        ):
            return "native", pads[:nd], None  # torch's own padding counts the same cells
        tpads = geo.explicit_pads(sizes)
        declared = _torch_pads(pads, nd)
        ones = torch.ones((1, 1, *sizes), dtype=x.dtype, device=x.device)
        if include_pad:
            ones = F.pad(ones, declared, value=1.0)
            ones = F.pad(ones, [t - p for t, p in zip(tpads, declared, strict=True)], value=0.0)
        else:
            ones = F.pad(ones, tpads, value=0.0)
        return "explicit", tpads, window / window_sum(ones).clamp_min(1.0)

    def fn(x):
        key = (tuple(x.shape[2:]), x.device, x.dtype)
        hit = counts.get(key)
        if hit is None:
            hit = counts[key] = plan(key[0], x)
        kind, arg, scale = hit
        if kind == "native":
            return _AVGPOOL[nd](x, kernels, strides, arg, False, include_pad)
        if kind == "empty":
            return x.new_zeros((*x.shape[:2], *(max(o, 0) for o in arg)))
        xp = F.pad(x, arg)
        if all(d == 1 for d in dilations):
            return _AVGPOOL[nd](xp, kernels, strides) * scale
        return window_sum(xp) / window * scale

    return fn


_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@op("GlobalAveragePool")
def global_average_pool(node):
    return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@op("GlobalMaxPool")
def global_max_pool(node):
    return lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


@op("BatchNormalization")
def batch_norm(node):
    if node.attr("training_mode", 0):
        raise node.fail("training_mode=1 is not supported (inference only)")
    eps = float(node.attr("epsilon", 1e-5))
    n_out = node.num_outputs

    def fn(x, scale, bias, mean, var):
        y = F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
        # Extra outputs of old opsets: running statistics, unchanged in inference.
        return y if n_out == 1 else (y, mean, var, mean, var)[:n_out]

    return fn


@op("LayerNormalization", since=17)
def layer_norm(node):
    """Normalise over the dims from `axis` on; the optional Mean and InvStdDev outputs keep
    those dims as 1. Statistics compute in the engine's dtype (stash_type is moot)."""
    axis = int(node.attr("axis", -1))
    eps = float(node.attr("epsilon", 1e-5))
    n_out = node.num_outputs
    stats = any(node.outputs[1:])

    def fn(x, scale, bias=None):
        ax = axis + x.dim() if axis < 0 else axis
        shape = tuple(x.shape[ax:])
        if not stats:
            if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
                return F.layer_norm(x, shape, scale, bias, eps)
            y = F.layer_norm(x, shape, None, None, eps) * scale  # scale broadcasts
            return y if bias is None else y + bias
        dims = tuple(range(ax, x.dim()))
        mean = x.mean(dims, keepdim=True)
        centred = x - mean
        inv_std = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
        y = centred * inv_std * scale
        if bias is not None:
            y = y + bias
        return (y, mean, inv_std)[:n_out]

    return fn


@op("InstanceNormalization")
def instance_norm(node):
    eps = float(node.attr("epsilon", 1e-5))
    return lambda x, scale, bias: F.instance_norm(x, weight=scale, bias=bias, eps=eps)


@op("GroupNormalization", since=18)
def group_norm(node):
    """Opset 18 gives scale and bias per group, opset 21 per channel; a per-channel pair in
    an opset 18 model (as some exporters wrote it) is taken as such."""
    groups = int(node.attr("num_groups"))
    eps = float(node.attr("epsilon", 1e-5))

    def fn(x, scale, bias):
        c = x.shape[1]
        if scale.numel() == c and bias.numel() == c:
            return F.group_norm(x, groups, scale.reshape(c), bias.reshape(c), eps)
        if c % groups or scale.numel() != groups or bias.numel() != groups:
            raise node.fail(
                f"{c} channels, {groups} groups: scale and bias need {groups} or {c} values"
            )
        per = c // groups
        scale = scale.reshape(groups).repeat_interleave(per)
        bias = bias.reshape(groups).repeat_interleave(per)
        return F.group_norm(x, groups, scale, bias, eps)

    return fn


@op("LRN")
def lrn(node):
    """ONNX LRN: window of `size` channels, floor((size-1)/2) before and ceil after.

    torch's local_response_norm centres even windows the other way, so it is not used.
    """
    size = int(node.attr("size"))
    alpha = float(node.attr("alpha", 1e-4))
    beta = float(node.attr("beta", 0.75))
    bias = float(node.attr("bias", 1.0))
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2

    def fn(x):
        n, c = x.shape[:2]
        sq = (x * x).reshape(n, 1, c, -1)
        mean = F.avg_pool2d(F.pad(sq, [0, 0, before, after]), (size, 1), stride=1)
        return x / (bias + alpha * mean.reshape(x.shape)).pow(beta)

    return fn


@op("Dropout")
def dropout(node):
    if node.opset >= 12 and node.has_input(2):
        mode = node.const(2)
        if mode is None or bool(mode.item()):
            raise node.fail("training_mode must be a constant false (inference only)")
    n_out = node.num_outputs
    # onnxruntime's inference mask: all false (zeros before opset 10) up to opset 11, all true
    # from opset 12 on.
    dtype = torch.bool if node.opset >= 10 else None
    fill = node.opset >= 12

    def fn(x, *_):
        if n_out == 1:
            return x
        mask = torch.ones_like(x, dtype=dtype) if fill else torch.zeros_like(x, dtype=dtype)
        return x, mask

    return fn


# --- shape and indexing ----------------------------------------------------------------------


@op("Flatten")
def flatten(node):
    axis = int(node.attr("axis", 1))

    def fn(x):
        ax = axis + x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:ax]), -1)

    return fn


def rebatch(target: list[int], x: torch.Tensor, rt: Runtime) -> list[int]:
    """A constant target shape that bakes in the model's fixed batch N, for a larger batch.

    Exporters fold `x.view(x.size(0), -1)` of a batch-N model into the constant [N, -1]; where
    the reshaped tensor leads with the batch B of the running call (a multiple of N), the
    shape's N becomes B. The Engine checks the result against runs of N (`Engine.batching`).
    """
    n, b = rt.fixed_batch, rt.batch
    if b is None or b == n or not target or target[0] != n or x.dim() == 0 or x.shape[0] != b:
        return target
    return [b, *target[1:]]


def _reshape_fn(static: list[int] | None, allowzero: bool, rt: Runtime) -> Callable:
    batch_free = static is None or not static or static[0] != rt.fixed_batch
    if static is not None and (allowzero or 0 not in static) and batch_free:
        return lambda x, *_: x.reshape(static)

    def fn(x, shape=None):
        target = static if static is not None else _as_ints(shape)
        if not allowzero:
            target = [x.shape[i] if v == 0 else v for i, v in enumerate(target)]
        if static is not None:
            target = rebatch(target, x, rt)
        return x.reshape(target)

    return fn


@op("Reshape")
def reshape_attr(node):
    return _reshape_fn([int(v) for v in node.attr("shape")], False, node.rt)


@op("Reshape", since=5)
def reshape(node):
    return _reshape_fn(node.const_ints(1), bool(node.attr("allowzero", 0)), node.rt)


@op("Transpose")
def transpose(node):
    perm = node.attr("perm")
    if perm is not None:
        perm = [int(p) for p in perm]
        return lambda x: x.permute(perm)
    return lambda x: x.permute(*reversed(range(x.dim())))


@op("Concat")
def concat(node):
    axis = int(node.attr("axis", 0))
    cat = _device_safe(lambda *xs: torch.cat(xs, axis))
    return cat


def _split_fn(axis: int, static: list[int] | None, n: int, uneven: bool) -> Callable:
    def fn(x, sizes=None):
        if static is not None:
            return torch.split(x, static, axis)
        if sizes is not None:
            return torch.split(x, _as_ints(sizes), axis)
        dim = x.shape[axis]
        # opset 18 num_outputs: chunks of ceil(dim / n), the last smaller; before: equal parts.
        return torch.split(x, -(-dim // n) if uneven else dim // n, axis)

    return fn


@op("Split")
def split_attr(node):
    static = node.attr("split")
    static = [int(v) for v in static] if static else node.const_ints(1)
    return _split_fn(int(node.attr("axis", 0)), static, node.num_outputs, False)


@op("Split", since=13)
def split_input(node):
    n = int(node.attr("num_outputs", node.num_outputs))
    return _split_fn(int(node.attr("axis", 0)), node.const_ints(1), n, node.opset >= 18)


def _slice(x, starts, ends, axes, steps):
    rank = x.dim()
    index = [slice(None)] * rank
    flips = []
    for i, (start, end) in enumerate(zip(starts, ends, strict=True)):
        axis = axes[i] if axes is not None else i
        axis = axis + rank if axis < 0 else axis
        step = steps[i] if steps is not None else 1
        # Python slices clamp exactly as ONNX Slice does (numpy semantics), huge ends included.
        s, e, st = slice(start, end, step).indices(x.shape[axis])
        if st > 0:
            index[axis] = slice(s, e, st)
        else:
            flips.append((axis, s, len(range(s, e, st)), -st))
    if any(isinstance(i, slice) and i != slice(None) for i in index):
        x = x[tuple(index)]
    for axis, s, count, step in flips:
        # Negative steps: flip, then walk forward from the mirrored start.
        if count == 0:
            x = x.narrow(axis, 0, 0)
            continue
        first = x.shape[axis] - 1 - s
        tail = [slice(None)] * axis + [slice(first, first + (count - 1) * step + 1, step)]
        x = x.flip(axis)[tuple(tail)]
    return x


@op("Slice")
def slice_attr(node):
    starts = [int(v) for v in node.attr("starts")]
    ends = [int(v) for v in node.attr("ends")]
    axes = node.attr("axes")
    axes = [int(v) for v in axes] if axes is not None else None
    return lambda x: _slice(x, starts, ends, axes, None)


@op("Slice", since=10)
def slice_inputs(node):
    static = [node.const_ints(i) for i in range(1, 5)]
    if all(node.is_static(i) for i in range(1, 5)):
        starts, ends, axes, steps = static
        return lambda x, *_: _slice(x, starts, ends, axes, steps)

    def fn(x, starts, ends, axes=None, steps=None):
        values = [
            s if s is not None else (None if t is None else _as_ints(t))
            for s, t in zip(static, (starts, ends, axes, steps), strict=True)
        ]
        return _slice(x, *values)

    return fn


def _squeeze_fn(static: list[int] | None, from_input: bool) -> Callable:
    if static is not None:
        axes = tuple(static)
        return lambda x, *_: x.squeeze(axes)
    if not from_input:
        return lambda x: x.squeeze()

    def fn(x, axes=None):
        return x.squeeze() if axes is None else x.squeeze(tuple(_as_ints(axes)))

    return fn


@op("Squeeze")
def squeeze_attr(node):
    axes = node.attr("axes")
    return _squeeze_fn(None if axes is None else [int(a) for a in axes], False)


@op("Squeeze", since=13)
def squeeze_input(node):
    return _squeeze_fn(node.const_ints(1), True)


def _unsqueeze(x, axes: list[int]):
    rank = x.dim() + len(axes)
    for axis in sorted(a + rank if a < 0 else a for a in axes):
        x = x.unsqueeze(axis)
    return x


@op("Unsqueeze")
def unsqueeze_attr(node):
    axes = [int(a) for a in node.attr("axes")]
    return lambda x: _unsqueeze(x, axes)


@op("Unsqueeze", since=13)
def unsqueeze_input(node):
    static = node.const_ints(1)
    if static is not None:
        return lambda x, *_: _unsqueeze(x, static)
    return lambda x, axes: _unsqueeze(x, _as_ints(axes))


@op("Shape")
def shape(node):
    start = node.attr("start", 0)
    end = node.attr("end")
    return lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64)


@op("Gather")
def gather(node):
    axis = int(node.attr("axis", 0))
    static = node.const(1)
    if static is not None and static.dim() == 0:
        i = int(static)
        return lambda x, _: x.select(axis, i)
    on_device: dict[tuple, torch.Tensor] = {}

    def fn(x, indices):
        ax = axis + x.dim() if axis < 0 else axis
        dim = x.shape[ax]
        if static is not None:
            key = (dim, x.device)
            idx = on_device.get(key)
            if idx is None:
                idx = on_device[key] = torch.where(static < 0, static + dim, static).to(x.device)
        else:
            idx = torch.where(indices < 0, indices + dim, indices).to(x.device)
        if idx.dim() == 0:
            return x.select(ax, int(idx))
        y = x.index_select(ax, idx.reshape(-1))
        return y.reshape(x.shape[:ax] + idx.shape + x.shape[ax + 1 :])

    return fn


@op("Expand")
def expand(node):
    static = node.const_ints(1)

    def fn(x, shape):
        target = static if static is not None else _as_ints(shape)
        return x.expand(torch.broadcast_shapes(x.shape, tuple(target)))

    return fn


@op("Tile", since=6)
def tile(node):
    static = node.const_ints(1)
    if static is not None:
        return lambda x, *_: x.repeat(static)
    return lambda x, repeats: x.repeat(_as_ints(repeats))


@op("Range", since=11)
def range_(node):
    """start + i * delta for i < max(ceil((limit - start) / delta), 0), as onnxruntime counts."""

    def fn(start, limit, delta):
        if not start.is_floating_point():
            return torch.arange(int(start), int(limit), int(delta), dtype=torch.int64)
        s, lim, d = float(start), float(limit), float(delta)
        n = max(math.ceil((lim - s) / d), 0)
        steps = torch.arange(n, dtype=node.rt.dtype, device=node.rt.device)
        return s + steps * d

    return fn


@op("Trilu", since=14)
def trilu(node):
    """The upper (or lower) triangle of the last two dims, from diagonal k."""
    f = torch.triu if node.attr("upper", 1) else torch.tril
    if node.is_static(1):
        k = node.const(1)
        k = 0 if k is None else int(k.reshape(-1)[0])
        return lambda x, *_: f(x, k)
    return lambda x, k=None: f(x, 0 if k is None else int(k.reshape(-1)[0]))


@op("Constant")
def constant(node):
    a = node.attrs
    if "value" in a:
        value = node.tensor(a["value"])
    elif "value_float" in a:
        value = node.tensor(np.array(a["value_float"], dtype=np.float32))
    elif "value_floats" in a:
        value = node.tensor(np.array(a["value_floats"], dtype=np.float32))
    elif "value_int" in a:
        value = node.tensor(np.array(a["value_int"], dtype=np.int64))
    elif "value_ints" in a:
        value = node.tensor(np.array(a["value_ints"], dtype=np.int64))
    else:
        raise node.fail(f"unsupported value attribute ({', '.join(a) or 'none'})")
    return lambda: value


@op("ConstantOfShape")
def constant_of_shape(node):
    value = node.attr("value")
    value = node.tensor(np.zeros(1, np.float32) if value is None else value).reshape(-1)
    fill = value[0].item()
    dtype = value.dtype

    def fn(shape):
        target = _as_ints(shape)
        if dtype.is_floating_point:
            return torch.full(target, fill, dtype=node.rt.dtype, device=node.rt.device)
        return torch.full(target, fill, dtype=dtype)

    return fn


@op("Pad", since=2)
def pad_attrs(node):
    pads = [int(p) for p in node.attr("pads")]
    return _pad_fn(node, pads, float(node.attr("value", 0.0)), None, static_value=True)


@op("Pad", since=11)
def pad_inputs(node):
    value = node.const(2)
    static_value = node.is_static(2)
    fill = 0.0 if value is None else value.item()
    axes = node.const_ints(3)
    if node.has_input(3) and axes is None:
        raise node.fail("a computed axes input is not supported")
    return _pad_fn(node, node.const_ints(1), fill, axes, static_value)


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad_fn(node, static_pads, fill, axes, static_value: bool) -> Callable:
    mode = node.attr("mode", "constant")
    if mode not in _PAD_MODES:
        raise node.fail(f"pad mode {mode!r} is not supported")
    torch_mode = _PAD_MODES[mode]

    def full_pads(x, pads):
        rank = x.dim()
        if axes is None:
            return pads
        out = [0] * (2 * rank)
        n = len(axes)
        for i, a in enumerate(axes):
            a = a + rank if a < 0 else a
            out[a], out[a + rank] = pads[i], pads[i + n]
        return out

    def fn(x, pads=None, value=None, *_):
        p = full_pads(x, static_pads if static_pads is not None else _as_ints(pads))
        rank = x.dim()
        if torch_mode == "constant":
            v = fill if static_value else (0.0 if value is None else value.item())
            return F.pad(x, _torch_pads(p, rank), value=v)
        # reflect / edge / wrap: crop negative pads, then pad one axis at a time through a
        # 3-D view, the layout every torch padding mode accepts.
        crop = [min(v, 0) for v in p]
        if any(crop):
            x = F.pad(x, _torch_pads(crop, rank))
        for axis in range(rank):
            before, after = max(p[axis], 0), max(p[axis + rank], 0)
            if before or after:
                moved = x.movedim(axis, -1)
                shape = moved.shape
                y = F.pad(moved.reshape(-1, 1, shape[-1]), [before, after], mode=torch_mode)
                x = y.reshape(*shape[:-1], y.shape[-1]).movedim(-1, axis)
        return x

    return fn


# --- resampling ------------------------------------------------------------------------------
#
# Resize (and the older Upsample) is separable: along each resized axis, an output index maps
# to a source coordinate, then to one input index (nearest), two (linear) or four (cubic)
# with weights. Those maps depend only on the shapes, so they are built once per shape in
# numpy with onnxruntime's float32 arithmetic (which decides the ties of nearest rounding),
# and the run-time work is index_select and multiply-add: differentiable in the input.

_F32 = np.float32


def _source_coords(mode: str, out_len: int, in_len: int, scale) -> np.ndarray:
    """onnxruntime's source coordinate of every output index along one axis (float32)."""
    x = np.arange(out_len, dtype=_F32)
    scale = _F32(scale)
    half = _F32(0.5)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel":
        return (x + half) / scale - half
    if mode == "pytorch_half_pixel":
        return (x + half) / scale - half if out_len > 1 else np.zeros_like(x)
    if mode == "tf_half_pixel_for_nn":
        return (x + half) / scale
    if mode == "align_corners":
        if out_len == 1:
            return np.zeros_like(x)
        return x * _F32(in_len - 1) / _F32(out_len - 1)
    if mode == "half_pixel_symmetric":
        adjustment = _F32(out_len) / (scale * _F32(in_len))
        offset = _F32(in_len) / _F32(2) * (_F32(1) - adjustment)
        return (offset + (x.astype(np.float64) + 0.5) / scale - 0.5).astype(_F32)
    raise AssertionError(mode)


_COORDINATE_MODES = (
    "asymmetric",
    "half_pixel",
    "pytorch_half_pixel",
    "tf_half_pixel_for_nn",
    "align_corners",
    "half_pixel_symmetric",
)
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def _nearest_index(c: np.ndarray, mode: str, downsample: bool) -> np.ndarray:
    c = c.astype(np.float64)  # exact for float32 values: the tie test below stays exact
    if mode == "floor":
        i = np.floor(c)
    elif mode == "ceil":
        i = np.ceil(c)
    elif mode == "simple":  # Resize-10 and Upsample: ceil when shrinking, truncate otherwise
        i = np.ceil(c) if downsample else np.trunc(c)
    else:
        away = np.where(c >= 0, np.floor(c + 0.5), np.ceil(c - 0.5))  # std::round
        if mode == "round_prefer_floor":
            i = np.where(c == np.trunc(c) + 0.5, np.floor(c), away)
        else:
            i = away
    return i.astype(np.int64)


def _cubic_coeffs(s: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic weights of the taps at floor - 1 .. floor + 2, for fractions s ([n, 4])."""
    s = np.abs(s.astype(np.float64))
    a = float(_F32(a))
    d0, d1, d2, d3 = s + 1, s, 1 - s, 2 - s
    return np.stack(
        [
            ((a * d0 - 5 * a) * d0 + 8 * a) * d0 - 4 * a,
            ((a + 2) * d1 - (a + 3)) * d1 * d1 + 1,
            ((a + 2) * d2 - (a + 3)) * d2 * d2 + 1,
            ((a * d3 - 5 * a) * d3 + 8 * a) * d3 - 4 * a,
        ],
        axis=1,
    ).astype(_F32)


def _axis_taps(kind, coord, nearest, cubic_a, exclude, in_len, out_len, scale):
    """(indices [taps, out_len], weights [taps, out_len] or None) for one resized axis."""
    c = _source_coords(coord, out_len, in_len, scale)
    if kind == "nearest":
        i = np.clip(_nearest_index(c, nearest, _F32(scale) < 1), 0, in_len - 1)
        return i[None], None
    if kind == "linear":
        c = np.clip(c, _F32(0), _F32(in_len - 1))
        i0 = np.minimum(c.astype(np.int64), in_len - 1)
        i1 = np.minimum(i0 + 1, in_len - 1)
        w0 = np.abs(c - i1.astype(_F32))  # the far neighbour's distance weighs the near one
        w1 = np.abs(c - i0.astype(_F32))
        same = i0 == i1
        w0[same] = w1[same] = 0.5
        return np.stack([i0, i1]), np.stack([w0, w1])
    base = np.floor(c).astype(np.int64)
    w = _cubic_coeffs(c - np.floor(c), cubic_a).T.astype(np.float64)  # [4, out_len]
    taps = base[None] + np.arange(-1, 3)[:, None]
    if exclude:
        w = np.where((taps < 0) | (taps >= in_len), 0.0, w)
        w = w / w.sum(axis=0, keepdims=True)
    return np.clip(taps, 0, in_len - 1), w


class _ResizePlan:
    """Output sizes and per-axis maps of one Resize node, cached per input shape."""

    def __init__(self, node):
        self.node = node
        resize = node.op_type == "Resize"
        # The op's own version, as onnxruntime reads its attributes (Resize-10: asymmetric).
        version = node.opset if resize else min(node.opset, 9)
        self.mode = node.attr("mode", "nearest")
        if self.mode not in ("nearest", "linear", "cubic"):
            raise node.fail(f"mode {self.mode!r} is not supported")
        self.coord = (
            node.attr("coordinate_transformation_mode", "half_pixel")
            if resize and version >= 11
            else "asymmetric"
        )
        if self.coord == "tf_crop_and_resize":
            raise node.fail("coordinate_transformation_mode 'tf_crop_and_resize' is not supported")
        if self.coord not in _COORDINATE_MODES:
            raise node.fail(f"coordinate_transformation_mode {self.coord!r} is not supported")
        self.nearest = "simple"  # before Resize-11: onnxruntime's own rounding, no attribute
        if version >= 11:
            self.nearest = node.attr("nearest_mode", "round_prefer_floor")
            if self.nearest not in _NEAREST_MODES:
                raise node.fail(f"nearest_mode {self.nearest!r} is not supported")
        if node.attr("antialias", 0):
            raise node.fail("antialias=1 is not supported")
        self.cubic_a = float(node.attr("cubic_coeff_a", -0.75))
        self.exclude = bool(node.attr("exclude_outside", 0))
        self.policy = node.attr("keep_aspect_ratio_policy", "stretch")
        if self.policy not in ("stretch", "not_larger", "not_smaller"):
            raise node.fail(f"keep_aspect_ratio_policy {self.policy!r} is not supported")
        axes = node.attr("axes")
        self.axes = None if axes is None else [int(a) for a in axes]
        self._cache: dict[tuple, list] = {}

    def _full(self, values, rank: int, fill) -> list:
        if self.axes is None:
            if len(values) != rank:
                raise self.node.fail(f"{len(values)} scales or sizes for a rank-{rank} input")
            return list(values)
        full = [fill[i] for i in range(rank)]
        for a, v in zip(self.axes, values, strict=True):
            full[a % rank] = v
        return full

    def shapes(self, in_shape: tuple, scales, sizes) -> tuple[list[int], list]:
        """(output sizes, float32 scales) as onnxruntime derives them."""
        rank = len(in_shape)
        if sizes is not None:
            out = self._full(sizes, rank, in_shape)
            scales = [
                _F32(o) / _F32(n) if n else _F32(1) for o, n in zip(out, in_shape, strict=True)
            ]
            if self.policy != "stretch":
                chosen = self.axes if self.axes is not None else range(rank)
                chosen = {a % rank for a in chosen}
                pick = min if self.policy == "not_larger" else max
                s = pick(scales[a] for a in chosen)
                scales = [s if a in chosen else _F32(1) for a in range(rank)]
                out = [
                    int(math.floor(float(s * _F32(n)) + 0.5)) if a in chosen else n  # std::round
                    for a, n in enumerate(in_shape)
                ]
            return out, scales
        if scales is None:
            raise self.node.fail("neither scales nor sizes is given")
        scales = [_F32(v) for v in self._full(scales, rank, [1.0] * rank)]
        return [int(s * _F32(n)) for s, n in zip(scales, in_shape, strict=True)], scales

    def taps(self, in_shape: tuple, scales, sizes) -> list:
        key = (in_shape, scales, sizes)
        hit = self._cache.get(key)
        if hit is None:
            out, scales = self.shapes(in_shape, scales, sizes)
            hit = []
            if out != list(in_shape):
                for axis, (n, m, s) in enumerate(zip(in_shape, out, scales, strict=True)):
                    if s == 1 and n == m:
                        continue
                    idx, w = _axis_taps(
                        self.mode, self.coord, self.nearest, self.cubic_a, self.exclude, n, m, s
                    )
                    hit.append(
                        (axis, torch.from_numpy(idx), None if w is None else torch.from_numpy(w))
                    )
            self._cache[key] = hit
        return hit


def _resample(x: torch.Tensor, taps: list, on_device: dict) -> torch.Tensor:
    for axis, idx, w in taps:
        key = (id(idx), x.device, x.dtype)
        moved = on_device.get(key)
        if moved is None:
            shape = [1] * x.dim()
            shape[axis] = -1
            moved = on_device[key] = (
                idx.to(x.device),
                None if w is None else w.to(x.device, x.dtype).reshape(len(w), *shape),
            )
        idx, w = moved
        if w is None:
            x = x.index_select(axis, idx[0])
            continue
        y = x.index_select(axis, idx[0]) * w[0]
        for t in range(1, len(idx)):
            y = y + x.index_select(axis, idx[t]) * w[t]
        x = y
    return x


@op("Upsample", since=7)
@op("Resize", since=10)
def resize(node):
    plan = _ResizePlan(node)
    if node.op_type == "Upsample" and node.opset < 9:
        scales_at, sizes_at = None, None
        static_scales = tuple(float(v) for v in node.attr("scales"))
    else:
        scales_at, sizes_at = (2, 3) if node.op_type == "Resize" and node.opset >= 11 else (1, None)
        static_scales = None
    on_device: dict[tuple, tuple] = {}

    def read(t, cast):
        if t is None or t.numel() == 0:
            return None
        return tuple(cast(v) for v in t.reshape(-1).tolist())

    def targets(rest) -> tuple:
        """(scales, sizes) from the node's inputs; sizes win when both are given."""
        scales, sizes = static_scales, None
        if sizes_at is not None and len(rest) >= sizes_at:
            sizes = read(rest[sizes_at - 1], int)
        if sizes is None and scales_at is not None and len(rest) >= scales_at:
            scales = read(rest[scales_at - 1], float)
        return scales, sizes

    inputs = [i for i in (scales_at, sizes_at) if i is not None]
    if all(node.is_static(i) for i in inputs):
        fixed = targets([node.const(i) for i in range(1, max(inputs, default=0) + 1)])
        return lambda x, *_: _resample(x, plan.taps(tuple(x.shape), *fixed), on_device)

    def fn(x, *rest):
        return _resample(x, plan.taps(tuple(x.shape), *targets(rest)), on_device)

    return fn


# --- reductions ------------------------------------------------------------------------------


def _reduce_prod(x, dims, keep):
    for d in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, dim=d, keepdim=keep)
    return x


_REDUCE = {
    "ReduceMean": lambda x, dims, keep: torch.mean(x, dim=dims, keepdim=keep),
    "ReduceSum": lambda x, dims, keep: torch.sum(x, dim=dims, keepdim=keep),
    "ReduceMax": lambda x, dims, keep: torch.amax(x, dim=dims, keepdim=keep),
    "ReduceMin": lambda x, dims, keep: torch.amin(x, dim=dims, keepdim=keep),
    "ReduceProd": _reduce_prod,
    # vector_norm: a zero subgradient at 0 where sqrt(sum(x^2)) would give NaN
    "ReduceL1": lambda x, dims, keep: torch.linalg.vector_norm(x, 1, dim=dims, keepdim=keep),
    "ReduceL2": lambda x, dims, keep: torch.linalg.vector_norm(x, 2, dim=dims, keepdim=keep),
    "ReduceSumSquare": lambda x, dims, keep: torch.sum(x * x, dim=dims, keepdim=keep),
    "ReduceLogSum": lambda x, dims, keep: torch.log(torch.sum(x, dim=dims, keepdim=keep)),
    "ReduceLogSumExp": lambda x, dims, keep: torch.logsumexp(x, dim=dims, keepdim=keep),
}


def _reduce_fn(node, static_axes, from_input: bool) -> Callable:
    f = _REDUCE[node.op_type]
    keep = bool(node.attr("keepdims", 1))
    noop = bool(node.attr("noop_with_empty_axes", 0))

    def run(x, axes):
        if not axes:
            if noop and from_input:
                return x
            axes = range(x.dim())
        return f(x, tuple(axes), keep)

    if static_axes is not None or not from_input:
        axes = static_axes or []
        return lambda x, *_: run(x, axes)
    return lambda x, axes=None: run(x, [] if axes is None else _as_ints(axes))


@op(*_REDUCE)
def reduce_attr(node):
    axes = node.attr("axes")
    return _reduce_fn(node, None if axes is None else [int(a) for a in axes], False)


def _reduce_input(node):
    if node.has_input(1) and not node.is_static(1):
        return _reduce_fn(node, None, True)
    return _reduce_fn(node, node.const_ints(1) or [], True)


op("ReduceSum", since=13)(_reduce_input)
op(*(name for name in _REDUCE if name != "ReduceSum"), since=18)(_reduce_input)
