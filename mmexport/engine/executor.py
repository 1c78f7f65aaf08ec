"""Run an ONNX graph in PyTorch, differentiably, with a bound hook at every site.

The graph is compiled once: every node becomes a closure from `ops`, nodes whose inputs
are all static are folded into constants, and tensor names become slots of a list. A call
is then one loop over the compiled nodes. At a site (the output of an activation unbounded
above, `mmexport.core.sites`: a Relu, a ReLU6, a GELU's last Mul, ...) the loop applies
`torch.minimum(act, z)` when the caller gives a bound `z`, so the gradient reaches both the
input and the bounds: what the bound search differentiates. A caller may give a callable
instead, `f(act, axis) -> act'`: the peers' channel masks (`ChannelScale`) ride the same hook.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping, Sequence

import onnx
import torch
from onnx import numpy_helper

from ..core.conventions import fixed_batch, logits_of
from ..core.errors import MmexportError
from ..core.model import Model, Site, onnx_opset
from . import ops

SUPPORTED_OPS: frozenset[str] = ops.supported_ops()

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _op_label(node: onnx.NodeProto) -> str:
    if node.domain in _DEFAULT_DOMAINS:
        return node.op_type
    return f"{node.domain}.{node.op_type}"


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index} -> {node.output[0] if node.output else '?'}"


def unsupported_ops(proto: onnx.ModelProto) -> dict[str, str]:
    """op_type -> name of its first node, for every op the engine cannot run.

    Ops of other domains are named `domain.OpType`.
    """
    opset = onnx_opset(proto)
    missing: dict[str, str] = {}
    for index, node in enumerate(proto.graph.node):
        label = _op_label(node)
        if label in missing:
            continue
        if node.domain not in _DEFAULT_DOMAINS or ops.builder_for(node.op_type, opset) is None:
            missing[label] = _node_label(node, index)
    return missing


def _bound(a: torch.Tensor, z: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """min(a, z): z is a scalar, or per channel [C] broadcast over `axis` of a (1, or -1:
    the last, where it broadcasts as it is)."""
    if z.dtype != a.dtype:  # float64 bounds must not promote a float32 graph
        z = z.to(a.dtype)
    if z.dim() == 1 and a.dim() > 2 and axis == 1:
        z = z.view(-1, *([1] * (a.dim() - 2)))
    return torch.minimum(a, z)


class ChannelScale:
    """A site transform act * s, s per channel [C] on the site's channel axis: a neuron mask.

    Given in place of a bound (`engine(x, {site: ChannelScale(s)})`), it multiplies instead of
    clipping; gradients reach `s`.
    """

    def __init__(self, scale: torch.Tensor):
        self.scale = scale

    def __call__(self, a: torch.Tensor, axis: int = 1) -> torch.Tensor:
        s = self.scale.to(a.dtype)
        if s.dim() == 1 and a.dim() > 2 and axis == 1:
            s = s.view(-1, *([1] * (a.dim() - 2)))
        return a * s


class _Plan:
    """The compiled nodes needed for some outputs, in graph order."""

    def __init__(self, steps: list[tuple], targets: list[int]):
        self.steps = steps
        self.targets = targets


def _same(a, b) -> bool:
    """Two results of one graph, batched and in chunks, equal up to float reordering."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.shape != b.shape:
        return False
    a, b = a.detach(), b.detach()
    if not a.is_floating_point():
        return bool(torch.equal(a, b))
    finite = b[torch.isfinite(b)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-5 * max(scale, 1.0), equal_nan=True))


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def _large_images(shape: tuple) -> bool:
    """A 4-D input with at least 32x32 pixels on two of its last three axes (NCHW or NHWC)."""
    if len(shape) != 4:
        return False
    sides = sorted(d for d in shape[1:] if isinstance(d, int))
    return len(sides) >= 2 and sides[-2] >= 32


class Engine(torch.nn.Module):
    """An ONNX classifier as a torch Module: logits = engine(x, bounds).

    Float initializers become buffers in `dtype` on `device`; integer ones stay int64 on the
    host (shapes, axes, indices), where the shape arithmetic of a dynamic-batch graph runs
    without device syncs, and `.to()` leaves them there.

    A model exported with a fixed batch N still takes any batch (see `batching`): shapes that
    bake N in are scaled to the batch, and the first call at each batch size is checked
    against runs of N samples at a time; where they differ (or the batched run fails), the
    graph at batch N is vectorised over the batch's groups of N (`torch.func.vmap`: one pass
    for the whole batch, each group seeing the shapes it was exported with), checked the same
    way; where that fails too, the engine runs N at a time from then on. A batch that is not a
    multiple of N is padded with copies of its last sample, and the padding dropped.
    """

    def __init__(
        self, model: Model, *, device="cpu", dtype: torch.dtype = torch.float32, memory_format: str = "contiguous"
    ):
        super().__init__()
        if memory_format not in MEMORY_FORMATS:
            raise ValueError(f"memory_format {memory_format!r}: expected one of {', '.join(MEMORY_FORMATS)}")
        self.model = model
        self.sites: list[Site] = list(model.sites)
        self.input_name = model.input_name
        # The logits: behind a final Softmax where the model outputs probabilities.
        self.output_name = logits_of(model).name
        self._where = str(model.path) if model.path is not None else "model"
        self._rt = ops.Runtime(torch.device("cpu"), dtype, fixed_batch(model))
        self._chunked = False  # a fixed-batch graph found to need runs of its batch size
        self._vmapped = False  # ... found to run as one vectorised pass over groups of that size
        self._checked: set[int] = set()  # batch sizes found to run batched as in chunks
        self._site_names = frozenset(s.name for s in self.sites)
        self._site_axes = {s.name: s.axis for s in self.sites}
        self._host_buffers: list[str] = []
        self._plans: dict[tuple, _Plan] = {}
        self._compile(model.proto)
        # Channels-last 4-D tensors run oneDNN's convolutions 1.1-2x faster on CPU, forward and
        # backward (docs/experiments.md, "Real-size models"); the ONNX semantics are logical,
        # so only strides change, and the sums' order. The default keeps onnxruntime's order,
        # which `inspect --verify` compares against; "auto" (the searches) takes channels last
        # for conv nets on images of 32x32 and up, where it pays most, and leaves the 16x16
        # samples' documented results as they were: the floor controller turns rounding into a
        # different path (digits-cnn-clean kept 98.0% of its test accuracy one way, 96.8% the other).
        self._channels_last = memory_format == "channels_last" or (
            memory_format == "auto" and _large_images(model.input_shape)
            and any(b.dim() == 4 and b.is_floating_point() for b in self._buffers.values())
        )
        if self._channels_last:
            for name, value in self._buffers.items():
                if value.dim() == 4 and value.is_floating_point():
                    self._buffers[name] = value.contiguous(memory_format=torch.channels_last)
        self.to(device)  # also builds the slot template (see _apply)

    # --- compilation ---------------------------------------------------------------------

    def _compile(self, proto: onnx.ModelProto) -> None:
        graph = proto.graph
        missing = unsupported_ops(proto)
        if missing:
            listed = ", ".join(f"{op} (node {name!r})" for op, name in missing.items())
            raise MmexportError(f"{self._where}: unsupported ops: {listed}")

        dtype = self._rt.dtype
        static: dict[str, torch.Tensor] = {}
        for init in graph.initializer:
            static[init.name] = ops.to_torch(
                numpy_helper.to_array(init),
                dtype,
                lambda m, n=init.name: MmexportError(f"{self._where}: initializer {n!r}: {m}"),
            )
        for vi in graph.input:
            if vi.name not in static and vi.name != self.input_name:
                raise MmexportError(
                    f"{self._where}: graph input {vi.name!r} has no value; "
                    f"the engine feeds only {self.input_name!r}"
                )

        opset = onnx_opset(proto)
        self._slots: dict[str, int] = {"": 0}  # slot 0 always holds None: absent inputs

        def slot(name: str) -> int:
            if name not in self._slots:
                self._slots[name] = len(self._slots)
            return self._slots[name]

        self._input_slot = slot(self.input_name)
        steps = []
        for index, node in enumerate(graph.node):
            op_node = ops.OpNode(node, opset, static, self._rt, self._where)
            fn = ops.builder_for(node.op_type, opset)(op_node)
            is_site = bool(node.output) and node.output[0] in self._site_names
            present = [name for name in node.input if name]
            if not is_site and all(name in static for name in present):
                self._fold(fn, node, index, static)
                continue
            for name in node.input:
                if name and name not in static and name not in self._slots:
                    raise MmexportError(
                        f"{self._where}: node {_node_label(node, index)!r} reads {name!r}, "
                        "which no earlier node produces"
                    )
            ins = tuple(slot(name) if name else 0 for name in node.input)
            outs = tuple(slot(name) if name else -1 for name in node.output)
            site = node.output[0] if is_site else None
            steps.append((fn, ins, outs, site))

        # Static tensors that run-time nodes or callers read become buffers.
        used = {i for _, ins, _, _ in steps for i in ins}
        wanted = {vi.name for vi in graph.output}
        self._const_slots: list[tuple[int, str]] = []
        self._const_names: dict[str, str] = {}
        for name, value in static.items():
            if name in wanted:
                slot(name)
            elif name not in self._slots or self._slots[name] not in used:
                continue  # read only by folded nodes
            buffer = f"c{len(self._const_slots)}"
            self.register_buffer(buffer, value)
            if not value.is_floating_point():
                self._host_buffers.append(buffer)
            self._const_slots.append((self._slots[name], buffer))
            self._const_names[name] = buffer
        for vi in graph.output:
            if vi.name not in self._slots:
                raise MmexportError(f"{self._where}: graph output {vi.name!r} is never produced")
        self._graph_outputs = tuple(vi.name for vi in graph.output)
        static.clear()  # builders took what they need; do not pin host copies of weights
        # Scratch slot for absent optional outputs.
        self._scratch = len(self._slots)
        self._steps = [
            (fn, ins, tuple(o if o >= 0 else self._scratch for o in outs), site)
            for fn, ins, outs, site in steps
        ]

    def _fold(self, fn, node: onnx.NodeProto, index: int, static: dict) -> None:
        args = [static[name] if name else None for name in node.input]
        try:
            with torch.no_grad():
                result = fn(*args)
        except MmexportError:
            raise
        except Exception as exc:
            raise MmexportError(
                f"{self._where}: node {_node_label(node, index)!r} ({node.op_type}) "
                f"fails on its constant inputs: {exc}"
            ) from None
        results = (result,) if len(node.output) == 1 else tuple(result)
        for name, value in zip(node.output, results, strict=True):
            if name:
                static[name] = value.detach().cpu()

    def _apply(self, fn, recurse=True):
        # Integer constants stay on the host; the runtime follows the float buffers.
        host = {name: self._buffers.pop(name) for name in self._host_buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(host)
        probe = fn(torch.empty(0, dtype=self._rt.dtype, device=self._rt.device))
        self._rt.device, self._rt.dtype = probe.device, probe.dtype
        self._template = [None] * (self._scratch + 1)
        for slot, buffer in self._const_slots:
            self._template[slot] = self._buffers[buffer]
        return self

    def constants(self) -> dict[str, torch.Tensor]:
        """The float tensors the graph reads at run time, by ONNX name, as live buffers.

        Fine-tuning a weight means setting `requires_grad` on its entry and stepping it in
        place; `rewrite.replace_initializers` writes the result back. Tensors that only feed
        constant-folded nodes are not here (their folded results are, under their own names).
        """
        return {
            name: self._buffers[buffer]
            for name, buffer in self._const_names.items()
            if self._buffers[buffer].is_floating_point()
        }

    @property
    def batching(self) -> str:
        """How a batch of any size runs: "free" (the model's batch is free); for a batch fixed
        at N, "fixed" (no other batch size run yet), "scaled" (batched, constant shapes that
        hold N following the batch: checked equal to runs of N at every size met), "vmapped"
        (the graph at batch N vectorised over groups of N, where scaling does not reach: an
        attention block that folds the batch into its heads) or "chunks" (N samples at a
        time: neither reaches)."""
        if self._rt.fixed_batch is None:
            return "free"
        if self._chunked:
            return "chunks"
        if self._vmapped:
            return "vmapped"
        return "scaled" if self._checked else "fixed"

    @property
    def fixed_batch(self) -> int | None:
        return self._rt.fixed_batch

    @property
    def device(self) -> torch.device:
        return self._rt.device

    @property
    def dtype(self) -> torch.dtype:
        return self._rt.dtype

    # --- execution -----------------------------------------------------------------------

    def _plan(self, outputs: tuple[str, ...], record: tuple[str, ...]) -> _Plan:
        key = (outputs, record)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        for name in outputs + record:
            if name not in self._slots:
                kind = "output" if name in outputs else "recorded tensor"
                raise MmexportError(f"{self._where}: no tensor named {name!r} ({kind})")
        needed = {self._slots[name] for name in outputs + record}
        chosen = []
        for step in reversed(self._steps):
            if needed.intersection(step[2]):
                chosen.append(step)
                needed.update(step[1])
        plan = self._plans[key] = _Plan(chosen[::-1], [self._slots[n] for n in outputs + record])
        return plan

    def _execute(self, x, bounds: Mapping[str, torch.Tensor] | None, plan: _Plan) -> list:
        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(x)
        rt = self._rt
        if x.is_floating_point() and (x.dtype != rt.dtype or x.device != rt.device):
            x = x.to(rt.device, rt.dtype)
        if self._channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if bounds is not None:
            if not bounds:
                bounds = None
            elif not self._site_names.issuperset(bounds):
                unknown = sorted(set(bounds) - self._site_names)
                raise MmexportError(
                    f"{self._where}: bounds for unknown sites: {', '.join(unknown)}"
                )
        n = self._rt.fixed_batch
        if n is None or x.dim() == 0 or x.shape[0] == n:
            return self._pass(x, bounds, plan)
        size = x.shape[0]
        pad = -size % n
        if pad:
            x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
        if x.shape[0] == n:  # fewer samples than the fixed batch: one padded run
            values = self._pass(x, bounds, plan)
        elif self._chunked:
            values = self._chunks(x, bounds, plan)
        elif self._vmapped:
            try:
                values = self._vmap_pass(x, bounds, plan)
            except Exception:  # another plan (recorded tensors) that does not vectorise
                self._vmapped, self._chunked = False, True
                values = self._chunks(x, bounds, plan)
        elif x.shape[0] in self._checked:
            values = self._pass(x, bounds, plan)
        else:
            values = self._checked_pass(x, bounds, plan)
        return [v[:size] for v in values] if pad else values

    def _chunks(self, x, bounds, plan: _Plan) -> list:
        n = self._rt.fixed_batch
        parts = [self._pass(x[i : i + n], bounds, plan) for i in range(0, x.shape[0], n)]
        return [torch.cat(values) for values in zip(*parts, strict=True)]

    def _checked_pass(self, x, bounds, plan: _Plan) -> list:
        """The batched run where it equals runs of the fixed batch size, else those runs."""
        try:
            values = self._pass(x, bounds, plan)
        except Exception:  # a shape the batch cannot follow: runs of N it is
            values = None
        with torch.no_grad():
            reference = self._chunks(x, bounds, plan)
        if values is not None and all(_same(a, b) for a, b in zip(values, reference, strict=True)):
            self._checked.add(x.shape[0])
            return values
        try:
            values = self._vmap_pass(x, bounds, plan)
        except Exception:  # an op without a rule for vectorising (data-dependent shapes)
            values = None
        if values is not None and all(_same(a, b) for a, b in zip(values, reference, strict=True)):
            self._vmapped = True
            return values
        self._chunked = True
        return self._chunks(x, bounds, plan) if torch.is_grad_enabled() else reference

    def _vmap_pass(self, x, bounds, plan: _Plan) -> list:
        """The graph at its fixed batch N, vectorised over x's groups of N rows."""
        n = self._rt.fixed_batch
        groups = x.reshape(x.shape[0] // n, n, *x.shape[1:])
        with warnings.catch_warnings():  # ops without a batching rule run looped, correctly
            warnings.simplefilter("ignore", UserWarning)
            values = torch.func.vmap(lambda g: tuple(self._pass(g, bounds, plan)))(groups)
        return [v.reshape(-1, *v.shape[2:]) for v in values]

    def _pass(self, x, bounds, plan: _Plan) -> list:
        """One run of the compiled steps on the whole of x."""
        self._rt.batch = x.shape[0] if x.dim() else None
        try:
            return self._steps_on(x, bounds, plan)
        finally:
            self._rt.batch = None

    def _steps_on(self, x, bounds, plan: _Plan) -> list:
        env = self._template.copy()
        env[self._input_slot] = x
        for fn, ins, outs, site in plan.steps:
            value = fn(*[env[i] for i in ins])
            if len(outs) == 1:
                if site is not None and bounds is not None:
                    z = bounds.get(site)
                    if callable(z):
                        value = z(value, self._site_axes[site])
                    elif z is not None:
                        value = _bound(value, z, self._site_axes[site])
                env[outs[0]] = value
            else:
                for o, v in zip(outs, value, strict=True):
                    env[o] = v
        return [env[i] for i in plan.targets]

    def forward(self, x: torch.Tensor, bounds: Mapping[str, torch.Tensor] | None = None):
        """Logits for a batch x, sites bounded by `bounds`: the model's output, or the input of
        its final Softmax / LogSoftmax (`mmexport.core.conventions.logits_of`)."""
        return self._execute(x, bounds, self._plan((self.output_name,), ()))[0]

    def run(
        self,
        x: torch.Tensor,
        bounds: Mapping[str, torch.Tensor] | None = None,
        *,
        outputs: Sequence[str] | None = None,
        record: Collection[str] = (),
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """({output: tensor}, {recorded site: activation after its bound}).

        `outputs` defaults to every graph output; `record` takes site names (any tensor
        computed at run time works too; constants folded at init are not kept).
        """
        outputs = self._graph_outputs if outputs is None else tuple(outputs)
        record = tuple(record)
        values = self._execute(x, bounds, self._plan(outputs, record))
        n = len(outputs)
        return dict(zip(outputs, values[:n], strict=True)), dict(
            zip(record, values[n:], strict=True)
        )
