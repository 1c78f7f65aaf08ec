"""Activations that exporters write as several nodes, recognised by their algebra.

torch, tf2onnx and onnxruntime's optimizer write SiLU, GELU, HardSwish and Mish as small
subgraphs whose node order, operand order and constants vary: `x * Sigmoid(x)` or
`Sigmoid(x) * x`, `x / 1.41421` or `x * 0.70711`, `0.5 * (x * (1 + Erf(.)))` or
`(0.5 * x) * (Erf(.) + 1)`, x^3 as `Pow(x, 3)` or `x * (x * x)`, constants as initializers or
Constant nodes. Rather than list those orders, the subgraph behind a candidate output is
expanded into a polynomial in its input x and a few function atoms (Sigmoid, Tanh, Erf,
Softplus, a unit clip, ...), and that polynomial is compared with each activation's own,
coefficients to a relative 1e-3 (exporters round the constants to float32).

Torch-free: onnx and numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx

# A polynomial is {monomial: coefficient}; a monomial a sorted tuple of (atom, power); an
# atom the input x or (function name, argument polynomial as sorted items).
X = ("x",)
# Expansion limits: activations are small subgraphs; anything larger is not one of them.
MAX_NODES = 32
MAX_TERMS = 16
MAX_DEGREE = 4
RTOL = 1e-3

# Ops whose output the expansion follows; anything else is a leaf (and not x: no match).
_ARITHMETIC = {"Add", "Sub", "Mul", "Div", "Neg", "Pow", "Identity"}
_FUNCTIONS = {"Sigmoid", "Tanh", "Erf", "Softplus", "Exp", "Log", "HardSigmoid", "Clip"}
_EXPRESSION = _ARITHMETIC | _FUNCTIONS
# The ops a decomposed activation ends with.
ROOT_OPS = ("Mul", "Div", "Add", "Sub")


class NoMatch(Exception):
    """The subgraph is not a polynomial in x and the known atoms (or is too large)."""


def _sorted(items) -> tuple:
    return tuple(sorted(items, key=repr))


def const(c: float) -> dict:
    return {(): float(c)}


def leaf() -> dict:
    return {((X, 1),): 1.0}


def add(p: dict, q: dict, sign: float = 1.0) -> dict:
    out = dict(p)
    for m, c in q.items():
        out[m] = out.get(m, 0.0) + sign * c
    out = {m: c for m, c in out.items() if c != 0.0}
    if len(out) > MAX_TERMS:
        raise NoMatch("too many terms")
    return out


def scale(p: dict, c: float) -> dict:
    return {m: v * c for m, v in p.items()} if c != 0.0 else {}


def mul(p: dict, q: dict) -> dict:
    out: dict = {}
    for m1, c1 in p.items():
        for m2, c2 in q.items():
            powers = dict(m1)
            for atom, k in m2:
                powers[atom] = powers.get(atom, 0) + k
            if sum(powers.values()) > MAX_DEGREE:
                raise NoMatch("degree too high")
            m = _sorted(powers.items())
            out[m] = out.get(m, 0.0) + c1 * c2
    out = {m: c for m, c in out.items() if c != 0.0}
    if len(out) > MAX_TERMS:
        raise NoMatch("too many terms")
    return out


def constant_of(p: dict) -> float | None:
    """The value of a polynomial that is a constant, else None."""
    if not p:
        return 0.0
    if len(p) == 1 and () in p:
        return p[()]
    return None


def apply(name: str, arg: dict) -> dict:
    """f(arg) as a polynomial: one atom, times a constant where the atom is normalised."""
    if name == "Log":  # log(1 + exp(f)) is softplus(f), as some exporters write it
        exps = [m for m in arg if m]
        if (len(arg) == 2 and arg.get(()) == 1.0 and len(exps) == 1 and arg[exps[0]] == 1.0
                and len(exps[0]) == 1 and exps[0][0][1] == 1 and exps[0][0][0][1] == "Exp"):
            return apply("Softplus", dict(exps[0][0][0][2]))
    c = constant_of(arg)
    if c is not None:
        return const(_evaluate(name, c))
    atom = ("f", name, _sorted(arg.items()))
    return {((atom, 1),): 1.0}


def unit_clip(arg: dict) -> dict:
    """clip(arg, 0, 1), the atom HardSigmoid and Clip(0, hi) normalise to."""
    return apply("UnitClip", arg)


def _evaluate(name: str, c: float) -> float:
    fns: dict[str, Callable[[float], float]] = {
        "Sigmoid": lambda v: 1.0 / (1.0 + math.exp(-v)),
        "Tanh": math.tanh,
        "Erf": math.erf,
        "Softplus": lambda v: math.log1p(math.exp(v)),
        "Exp": math.exp,
        "UnitClip": lambda v: min(max(v, 0.0), 1.0),
    }
    if name not in fns:
        raise NoMatch(f"{name} of a constant")
    return fns[name](c)


# --------------------------------------------------------------------------- graph walk


class Expander:
    """Expands tensors of one graph into polynomials in a chosen input tensor x."""

    def __init__(self, producers: dict, value: Callable[[str], np.ndarray | None], opset: int):
        self.producers = producers
        self.value = value
        self.opset = opset

    def region(self, root: onnx.NodeProto) -> tuple[list[str], bool]:
        """The tensors behind `root` through expression ops, nearest first, each one that
        is read twice within the region (x is, in every activation: inside the function and
        beside it); and whether a function op lies in the region at all."""
        reads: dict[str, int] = {}
        order: list[str] = []
        seen_nodes = {id(root)}
        stack = [root]
        has_function = False
        while stack and len(seen_nodes) <= MAX_NODES:
            node = stack.pop(0)
            has_function |= node.op_type in _FUNCTIONS
            for t in node.input:
                if not t or self.value(t) is not None:
                    continue
                reads[t] = reads.get(t, 0) + 1
                if t not in order:
                    order.append(t)
                producer = self.producers.get(t)
                if producer is not None and producer.op_type in _EXPRESSION and \
                        producer.domain in ("", "ai.onnx") and id(producer) not in seen_nodes:
                    seen_nodes.add(id(producer))
                    stack.append(producer)
        return [t for t in order if reads[t] >= 2], has_function

    def expand(self, tensor: str, x: str) -> tuple[dict, list[onnx.NodeProto]]:
        """(polynomial of `tensor` in x, the nodes it passed through); raises NoMatch."""
        memo: dict[str, dict] = {}
        nodes: list[onnx.NodeProto] = []
        return self._expand(tensor, x, memo, nodes), nodes

    def _scalar(self, name: str) -> float | None:
        v = self.value(name) if name else None
        if v is None:
            return None
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        if v.size == 0 or not np.all(v == v[0]) or not np.isfinite(v[0]):
            raise NoMatch("a constant that varies per element")
        return float(v[0])

    def _expand(self, t: str, x: str, memo: dict, nodes: list) -> dict:
        if t == x:
            return leaf()
        if t in memo:
            return memo[t]
        c = self._scalar(t)
        if c is not None:
            return const(c)
        node = self.producers.get(t)
        if node is None or node.op_type not in _EXPRESSION or node.domain not in ("", "ai.onnx"):
            raise NoMatch(f"{t!r} is neither x nor an expression of it")
        if len(nodes) >= MAX_NODES:
            raise NoMatch("too many nodes")
        nodes.append(node)
        memo[t] = out = self._node(node, x, memo, nodes)
        return out

    def _node(self, node: onnx.NodeProto, x: str, memo: dict, nodes: list) -> dict:
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

        def arg(i: int) -> dict:
            return self._expand(node.input[i], x, memo, nodes)

        if op in ("Identity", "Neg"):
            return arg(0) if op == "Identity" else scale(arg(0), -1.0)
        if op in ("Add", "Sub"):
            return add(arg(0), arg(1), 1.0 if op == "Add" else -1.0)
        if op == "Mul":
            return mul(arg(0), arg(1))
        if op == "Div":
            d = self._scalar(node.input[1])
            if d is None or d == 0.0:
                raise NoMatch("division by a non-constant")
            return scale(arg(0), 1.0 / d)
        if op == "Pow":
            k = self._scalar(node.input[1])
            if k is None or k != int(k) or not 1 <= k <= MAX_DEGREE:
                raise NoMatch("Pow with an exponent other than a small integer")
            base = arg(0)
            out = base
            for _ in range(int(k) - 1):
                out = mul(out, base)
            return out
        if op == "HardSigmoid":  # max(0, min(1, alpha x + beta))
            a, b = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
            return unit_clip(add(scale(arg(0), a), const(b)))
        if op == "Clip":
            lo, hi = self._clip_range(node, attrs)
            if lo != 0.0 or not 0.0 < hi < math.inf:
                raise NoMatch("a Clip other than Clip(0, hi)")
            return scale(unit_clip(scale(arg(0), 1.0 / hi)), hi)
        return apply(op, arg(0))

    def _clip_range(self, node: onnx.NodeProto, attrs: dict) -> tuple[float, float]:
        if self.opset < 11:
            return float(attrs.get("min", -math.inf)), float(attrs.get("max", math.inf))
        lo = self._scalar(node.input[1]) if len(node.input) > 1 and node.input[1] else -math.inf
        hi = self._scalar(node.input[2]) if len(node.input) > 2 and node.input[2] else math.inf
        if lo is None or hi is None:
            raise NoMatch("Clip range computed at run time")
        return lo, hi


# --------------------------------------------------------------------------- the activations


def _canonical() -> dict[str, list[dict]]:
    """Each activation as a polynomial in x, written with the same algebra."""
    x = leaf()
    half = const(0.5)
    erf = apply("Erf", scale(x, 1.0 / math.sqrt(2.0)))
    cube = mul(x, mul(x, x))
    tanh = apply("Tanh", scale(add(x, scale(cube, 0.044715)), math.sqrt(2.0 / math.pi)))
    return {
        "silu": [mul(x, apply("Sigmoid", x))],
        "gelu": [mul(mul(half, x), add(const(1.0), erf)),
                 mul(mul(half, x), add(const(1.0), tanh))],
        "hard_swish": [mul(x, unit_clip(add(scale(x, 1.0 / 6.0), half)))],
        "mish": [mul(x, apply("Tanh", apply("Softplus", x)))],
    }


CANONICAL = _canonical()


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b))


def _close_items(p: tuple, q: tuple, close_key: Callable) -> bool:
    """Two sets of (key, value) pairs that match one to one with close keys and values."""
    if len(p) != len(q):
        return False
    used: set[int] = set()
    for k1, v1 in p:
        for j, (k2, v2) in enumerate(q):
            if j not in used and close_key(k1, k2) and (
                    v1 == v2 if isinstance(v1, int) else _close(v1, v2)):
                used.add(j)
                break
        else:
            return False
    return True


def _close_atom(a: tuple, b: tuple) -> bool:
    if a == X or b == X:
        return a == b
    return a[1] == b[1] and _close_items(a[2], b[2], _close_monomial)


def _close_monomial(m1: tuple, m2: tuple) -> bool:
    return _close_items(m1, m2, _close_atom)


def close_poly(p: dict, q: dict) -> bool:
    return _close_items(tuple(p.items()), tuple(q.items()), _close_monomial)


def _swish_beta(p: dict) -> float | None:
    """beta where p is x * sigmoid(beta x) with beta > 0, else None."""
    if len(p) != 1:
        return None
    (mono, c), = p.items()
    if not _close(c, 1.0) or len(mono) != 2:
        return None
    atoms = dict(mono)
    if atoms.pop(X, None) != 1 or len(atoms) != 1:
        return None
    (atom, k), = atoms.items()
    if k != 1 or atom[1] != "Sigmoid":
        return None
    arg = dict(atom[2])
    if len(arg) != 1 or ((X, 1),) not in arg or arg[((X, 1),)] <= 0:
        return None
    return arg[((X, 1),)]


def classify(p: dict) -> str | None:
    """The activation kind a polynomial in x is, else None."""
    for kind, forms in CANONICAL.items():
        if any(close_poly(p, f) for f in forms):
            return kind
    beta = _swish_beta(p)
    if beta is not None:
        return "silu" if _close(beta, 1.0) else "swish"
    return None


def match(expander: Expander, root: onnx.NodeProto) -> tuple[str, str, list] | None:
    """(kind, input tensor x, the pattern's other nodes) when `root`'s output is a decomposed
    activation of one tensor x, else None. The nearest x that matches wins."""
    if root.op_type not in ROOT_OPS or root.domain not in ("", "ai.onnx") or not root.output:
        return None
    candidates, has_function = expander.region(root)
    if not has_function:
        return None
    for x in candidates:
        try:
            poly, nodes = expander.expand(root.output[0], x)
        except (NoMatch, ArithmeticError, IndexError, ValueError):
            continue  # not an activation of x (or constants no float can hold)
        kind = classify(poly)
        if kind is not None:
            return kind, x, [n for n in nodes if n is not root]
    return None
