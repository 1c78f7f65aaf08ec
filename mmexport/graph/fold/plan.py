"""Which channels can carry a scale, and which scale each site's bounds give them.

The analysis half of folding (`mmexport.graph.fold`): classes of (tensor, channel) pairs
that share one scale, the role every node plays, and one decision per bounded site.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...core.bounds import Bounds
from ...core.model import onnx_opset
from ...core.sites import FOLDABLE
from ..edit import is_relu_node, site_node
from .roles import Role, RoleAnalysis, clip_max, outer_scope_names

# Positively homogeneous activations other than ReLU: a site of theirs folds with a scalar
# Min after it (min(leaky(a / s), k) = min(leaky(a), k s) / s for s > 0).
_HOMOGENEOUS_OPS = ("LeakyRelu", "PRelu")
# Scales within this many ulps-ish of each other count as equal: bounds are float32.
_RTOL = 1e-6
# Folded weights are w / s * s': keep s far from float32 under/overflow.
_SCALE_RANGE = (1e-30, 1e30)

# --------------------------------------------------------------------------- analysis


class Classes:
    """Union-find over (tensor, channel) pairs; the members of a class share one scale."""

    def __init__(self, channels: dict[str, int]):
        self.channels = channels
        self.first: dict[str, int] = {}
        self.parent: list[int] = []

    def elems(self, name: str) -> np.ndarray | None:
        c = self.channels.get(name)
        if c is None:
            return None
        if name not in self.first:
            self.first[name] = len(self.parent)
            self.parent.extend(range(len(self.parent), len(self.parent) + c))
        return np.arange(self.first[name], self.first[name] + c)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a, b) -> None:
        for x, y in zip(np.atleast_1d(a), np.atleast_1d(b), strict=True):
            rx, ry = self.find(int(x)), self.find(int(y))
            if rx != ry:
                self.parent[ry] = rx


@dataclass
class Site:
    name: str
    node: gs.Node
    value: np.ndarray | None  # the bound as given ([C] or []), None for an unbounded ReLU6
    z: np.ndarray | None  # effective bound per channel, min(bound, Clip max); None: opaque
    order: int
    numel: int = 0
    fusable: bool = False  # its producer is a weight layer read only by the site
    kind: str = "relu"
    reason: str = ""  # why a site cannot carry a scale (z None)

    @property
    def bounded(self) -> bool:
        return self.value is not None


@dataclass
class Decision:
    """"fold": a scalar Clip(0, k) in scaled units; "min": a Min node; "as_before": the
    site cannot carry a scale (unknown shape, Clip max computed at run time)."""

    site: Site
    form: str
    k: float = 1.0
    reason: str = ""
    dead: np.ndarray | None = None
    zero_rows: tuple | None = None  # (linear node, channels) whose output rows are zeroed
    zeroed: bool = False  # dead channels kept at 0 by zeroed weights (rows or columns)


class Plan(RoleAnalysis):
    """Channel classes of a graph, which of them must keep scale 1, and the chosen scales."""

    def __init__(self, graph: gs.Graph, shapes: dict[str, tuple], proto: onnx.ModelProto):
        self.graph = graph
        self.shapes = shapes
        self.opset = onnx_opset(proto)
        channels = {}
        for name, dims in shapes.items():
            if len(dims) >= 2 and isinstance(dims[1], int) and dims[1] > 0:
                channels[name] = dims[1]
        self.cls = Classes(channels)
        self.roles: dict[int, Role] = {}
        self.fixed: dict[int, str] = {}  # class root -> why it keeps scale 1
        self.assigned: dict[int, tuple[float, str]] = {}  # root -> (scale, who set it)
        self.sink_zero: dict[int, set] = {}  # id(linear node) -> input channels to zero
        self.graph_outputs = {t.name for t in graph.outputs}
        self._build(proto)

    # ---- building the classes

    def _build(self, proto: onnx.ModelProto) -> None:
        fix_requests: list[tuple[str, str]] = []
        inits = {i.name for i in proto.graph.initializer}
        for vi in proto.graph.input:
            if vi.name not in inits:
                fix_requests.append((vi.name, f"graph input {vi.name!r}"))
        for vi in proto.graph.output:
            fix_requests.append((vi.name, f"graph output {vi.name!r}"))
        for name in outer_scope_names(proto.graph):
            fix_requests.append((name, f"a subgraph reading {name!r}"))
        for node in self.graph.nodes:
            role = self._role(node)
            self.roles[id(node)] = role
            if role.kind == "opaque":
                why = f"{node.op} node {node.name!r}" + (f" ({role.why})" if role.why else "")
                for t in list(node.inputs) + list(node.outputs):
                    if isinstance(t, gs.Variable) and t.name:
                        fix_requests.append((t.name, why))
            else:
                self._unite(node, role)
        for name, why in fix_requests:
            e = self.cls.elems(name)
            if e is not None:
                for i in e:
                    self.fixed.setdefault(self.cls.find(int(i)), why)
        for root, why in self.fixed.items():
            self.assigned[root] = (1.0, why)

    def _unite(self, node: gs.Node, role: Role) -> None:
        cls = self.cls
        if role.kind in ("unary", "mulconst"):
            cls.union(cls.elems(node.inputs[role.data].name), cls.elems(node.outputs[0].name))
        elif role.kind == "elementwise":
            out = cls.elems(node.outputs[0].name)
            for i, t in enumerate(node.inputs):
                if i not in role.consts:
                    cls.union(out, cls.elems(t.name))
        elif role.kind == "reshape":
            e_in, e_out = cls.elems(node.inputs[0].name), cls.elems(node.outputs[0].name)
            flat = np.arange(len(e_in) * role.p_in)
            pairs = np.unique(np.stack([flat // role.p_out, flat // role.p_in], 1), axis=0)
            cls.union(e_out[pairs[:, 0]], e_in[pairs[:, 1]])
        elif role.kind in ("concat", "split"):
            whole = node.outputs[0] if role.kind == "concat" else node.inputs[0]
            parts = node.inputs if role.kind == "concat" else node.outputs
            e_whole = cls.elems(whole.name)
            offset = 0
            for t in parts:
                e = cls.elems(t.name)
                if role.axis == 1:
                    cls.union(e_whole[offset : offset + len(e)], e)
                    offset += len(e)
                else:
                    cls.union(e_whole, e)

    # ---- helpers on classes

    def roots(self, name: str) -> list[int] | None:
        e = self.cls.elems(name)
        return None if e is None else [self.cls.find(int(i)) for i in e]

    def scales(self, name: str) -> np.ndarray | None:
        """The scale per channel a tensor carries (its values are the original / scale)."""
        r = self.roots(name)
        if r is None:
            return None
        return np.array([self.assigned.get(x, (1.0, ""))[0] for x in r], dtype=np.float64)

    # ---- choosing the scales

    def solve(self, bounds: Bounds, sites: dict | None = None) -> list[Decision]:
        """One decision per bounded site; `sites` maps a site name to its `core.sites.Site`
        (its kind and channel axis; a ReLU on axis 1 where missing)."""
        sites = self._sites(bounds, sites or {})
        # Unbounded ReLU6 first: their scalar max pins their channels to one scale, as it is.
        # Then sites right after a weight layer, largest activation first.
        order = sorted(sites, key=lambda s: (s.bounded, not s.fusable, -s.numel, s.order))
        decisions = [self._decide(s) for s in order]
        return sorted((d for d in decisions if d.site.bounded), key=lambda d: d.site.order)

    def _sites(self, bounds: Bounds, info: dict) -> list[Site]:
        by_output = {n.outputs[0].name: n for n in self.graph.nodes if n.outputs}
        for name in bounds:
            site_node(by_output, name)  # a clear error for a key that no node writes
        out = []
        for order, node in enumerate(self.graph.nodes):
            if not node.outputs:
                continue
            name = node.outputs[0].name
            kind = info[name].kind if name in info else "relu"
            value = bounds.values.get(name)
            why = ""
            if kind not in FOLDABLE:  # act(a / s) != act(a) / s: its channels keep scale 1
                why = f"a {kind} site: only ReLU, LeakyRelu and PRelu bounds fold"
            elif name in info and info[name].axis != 1 and value is not None and value.ndim:
                why = "its channels are the last axis (token features), where scales do not fold"
            if why:
                if value is not None:
                    out.append(Site(name, node, value, None, order, kind=kind, reason=why))
                continue
            if not (is_relu_node(node) or node.op in _HOMOGENEOUS_OPS):
                continue
            hi = clip_max(node, self.opset) if node.op in ("Clip", "HardSigmoid") else np.inf
            if value is None and not np.isfinite(hi):
                continue  # a plain Relu: passes scales through, nothing to write
            if self.roles[id(node)].kind != "unary":
                if value is not None:
                    out.append(Site(name, node, value, None, order, kind=kind))
                continue
            c = self.cls.channels[name]
            z = np.asarray(value, np.float64) if value is not None else np.float64(np.inf)
            z = np.minimum(np.broadcast_to(z, (c,)), hi).astype(np.float64)
            dims = self.dims(node.outputs[0]) or ()
            numel = int(np.prod([d for d in dims[1:] if isinstance(d, int)] or [c]))
            a = node.inputs[0]
            fusable = (
                len(a.inputs) == 1
                and len(a.outputs) == 1
                and self.roles[id(a.inputs[0])].kind == "linear"
            )
            out.append(Site(name, node, value, z, order, numel, fusable, kind))
        return out

    def _decide(self, site: Site) -> Decision:
        if site.z is None:
            return Decision(site, "as_before", reason=site.reason)
        roots = self.roots(site.name)
        z = site.z
        dead = np.flatnonzero(z == 0)
        if len(dead) and site.node.op in _HOMOGENEOUS_OPS:
            # min(leaky(a), 0) still passes the negative part: no zeroed weights make it.
            return Decision(site, "min", dead=dead, reason=(
                f"{len(dead)} channel(s) bounded at 0: min({site.kind}(a), 0) is not 0"))
        plan, reason = self._ratio_plan(roots, z, range(len(z)))
        if plan is not None:
            return self._commit(site, plan)
        if len(dead):
            plan, why = self._ratio_plan(roots, z, np.flatnonzero(z > 0))
            if plan is not None:
                zeroing, why = self._dead_plan(site, dead)
                if zeroing is not None:
                    return self._commit(site, plan, dead, zeroing)
                why = f"{len(dead)} dead channel(s) cannot be zeroed: {why}"
            reason = why
        return Decision(site, "min", reason=reason, dead=dead if len(dead) else None)

    def _ratio_plan(self, roots, z, channels) -> tuple[tuple | None, str]:
        """(k, {root: scale}) making z / scale == k on `channels`, or (None, why not)."""
        per_root: dict[int, float] = {}
        for c in channels:
            r = roots[c]
            if r in per_root and not close(per_root[r], z[c]):
                return None, "channels with different bounds are tied to one scale"
            per_root[r] = float(z[c])
        if not per_root:
            return (1.0, {}), ""
        ratios = [(zc / self.assigned[r][0], r) for r, zc in per_root.items() if r in self.assigned]
        if ratios:
            k = ratios[0][0]
            if any(not close(q, k) for q, _ in ratios):
                return None, self._conflict({r for _, r in ratios})
        else:
            vals = list(per_root.values())
            k = vals[0] if all(close(v, vals[0]) for v in vals) else 1.0
        new = {}
        for r, zc in per_root.items():
            if r in self.assigned:
                continue
            if k == 0.0:
                if zc != 0.0:
                    return None, "bound 0 and > 0 on one scale"
                new[r] = 1.0
                continue
            s = zc / k if zc != 0.0 else 0.0
            if s == 0.0:
                return None, "dead channels"
            if not _SCALE_RANGE[0] <= s <= _SCALE_RANGE[1]:
                return None, "bounds span too many orders of magnitude for float32 weights"
            new[r] = s
        return (k, new), ""

    def _conflict(self, roots) -> str:
        """Why the scales already on `roots` do not fit a site's bounds."""
        sites = sorted({self.assigned[r][1] for r in roots if r not in self.fixed})
        if sites:
            return (
                f"shares the scale of its channels with {', '.join(sites[:3])} (a residual Add, "
                "Concat or shared producer) and their bounds are not proportional"
            )
        fixed = sorted({self.fixed[r] for r in roots if r in self.fixed})
        return "its channels must keep their scale: read by " + ", ".join(fixed[:3])

    def _commit(self, site, plan, dead=None, zeroing=None) -> Decision:
        k, new = plan
        for r, s in new.items():
            owner = "site" if site.bounded else "the Clip max of"
            self.assigned[r] = (s, f"{owner} {site.name!r}")
        zero_rows = None
        if zeroing is not None:
            kind, payload = zeroing
            if kind == "rows":
                zero_rows = (payload, dead)
            else:
                for node, chans in payload:
                    self.sink_zero.setdefault(id(node), set()).update(chans)
        return Decision(site, "fold", k=k, dead=dead, zero_rows=zero_rows,
                         zeroed=zeroing is not None)

    def _dead_plan(self, site: Site, dead: np.ndarray):
        """How to keep dead channels at 0 with a scalar Clip: ("rows", producer) or
        ("columns", [(consumer, channels)]), or (None, why not)."""
        a = site.node.inputs[0]
        prod = a.inputs[0] if len(a.inputs) == 1 else None
        if (
            prod is not None
            and len(a.outputs) == 1
            and a.name not in self.graph_outputs
            and self.roles[id(prod)].kind == "linear"
        ):
            return ("rows", prod), ""
        # Else the site's output must reach only weight layers, through ops that keep 0 at 0.
        sinks: dict[int, tuple] = {}
        zeros: dict[str, set] = {}  # tensor -> its channels that hold a dead channel's value
        stack = [(site.node.outputs[0], frozenset(int(c) for c in dead))]
        while stack:
            t, zs = stack.pop()
            new = set(zs) - zeros.get(t.name, set())
            if not new:
                continue
            # A tensor reached again (a Concat of two paths) passes on the union.
            zs = frozenset(zeros.setdefault(t.name, set()).union(new))
            zeros[t.name] |= new
            if t.name in self.graph_outputs:
                return None, f"it reaches graph output {t.name!r}"
            for n in t.outputs:
                role = self.roles[id(n)]
                if role.kind == "shape":
                    continue
                passes = role.kind == "concat" or (
                    role.kind in ("unary", "mulconst", "reshape", "split", "linear")
                    and n.inputs[role.data] is t
                )
                if not passes:
                    return None, f"{n.op} node {n.name!r} mixes them with other values"
                if role.kind == "linear":
                    sinks[id(n)] = (n, zs)
                elif role.kind in ("unary", "mulconst"):
                    stack.append((n.outputs[0], zs))
                elif role.kind == "reshape":
                    c_out = self.cls.channels[n.outputs[0].name]
                    # An output channel is 0 when every element it holds came from a dead one.
                    keep = set()
                    for j in range(c_out):
                        lo, hi = j * role.p_out, (j + 1) * role.p_out
                        srcs = set(range(lo // role.p_in, (hi - 1) // role.p_in + 1))
                        if srcs <= zs:
                            keep.add(j)
                    stack.append((n.outputs[0], frozenset(keep)))
                elif role.kind == "concat":
                    if role.axis != 1:
                        return None, f"Concat node {n.name!r} mixes them with other values"
                    off = 0
                    for inp in n.inputs:
                        if inp is t:
                            break
                        off += self.cls.channels[inp.name]
                    stack.append((n.outputs[0], frozenset(c + off for c in zs)))
                else:  # split
                    off = 0
                    for out in n.outputs:
                        c = self.cls.channels[out.name]
                        part = {x - off for x in zs if off <= x < off + c} if role.axis == 1 else zs
                        stack.append((out, frozenset(part)))
                        off += c
        return ("columns", list(sinks.values())), ""


def close(a: float, b: float) -> bool:
    return abs(a - b) <= _RTOL * max(abs(a), abs(b))
