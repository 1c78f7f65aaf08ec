"""What the peer defences share: running a model in the engine, fine-tuning its weights on D,
and pruning channels for good."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ...core.bounds import Bounds
from ...core.model import Model, Site, from_proto, replace_initializers
from ...engine.executor import Engine
from ...graph.rewrite import apply_bounds
from ..common.weights import epochs_of, trainable

# A bound that never clips a finite activation: how "not pruned" is written beside a pruned channel.
NO_BOUND = float(np.finfo(np.float32).max)
FT_EPOCHS = 20
FT_LRS = (1e-3, 1e-4, 1e-5)  # Adam's learning rates, tried in turn (`train`)
FT_BATCH = 32


def engine_of(proto: onnx.ModelProto) -> tuple[Model, Engine]:
    model = from_proto(proto)
    return model, Engine(model)


def predict(engine: Engine, x: torch.Tensor, bounds=None) -> torch.Tensor:
    with torch.no_grad():
        return engine(x, bounds).argmax(1)


def accuracy(engine: Engine, x: torch.Tensor, y: torch.Tensor, bounds=None) -> float:
    return float((predict(engine, x, bounds) == y).float().mean())


def train(
    engine: Engine,
    proto: onnx.ModelProto,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    bounds=None,
    epochs: int = FT_EPOCHS,
    lr: float | None = None,
    batch_size: int = FT_BATCH,
    batch_loss=None,
) -> tuple[onnx.ModelProto, dict]:
    """Adam on every float initializer the graph reads, cross-entropy on (x, y), in minibatches.

    `bounds` (site -> tensor) stay applied throughout, so a pruned channel stays at zero and its
    weights see no gradient. Returns `proto` with the trained initializers written back.

    `lr` None tries FT_LRS in turn and keeps the first whose fine-tune ends with D's loss below
    where it started (else the last): Adam at 1e-3 suits the 16x16 samples but sends a PreAct-ResNet-18 (BatchNorm
    in inference mode) to chance within an epoch, which D's own loss shows; a user would lower it.
    `batch_loss(xb, yb)`: a minibatch's loss other than its cross-entropy (`epochs_of`); D's clean
    loss still chooses the rate.
    """
    live = engine.constants()
    params = trainable(engine, proto)
    stats = {n.input[i] for n in proto.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)
             if len(n.input) > i}
    start = {name: t.detach().clone() for name, t in params.items()}

    def d_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(engine(x, bounds), y))

    before = d_loss()
    tried = []
    for rate in (lr,) if lr is not None else FT_LRS:
        with torch.no_grad():
            for name, t in params.items():
                t.copy_(start[name])
        losses = epochs_of(engine, params, x, y, seed=seed, bounds=bounds, epochs=epochs, lr=rate,
                           batch_size=batch_size, batch_loss=batch_loss)
        after = d_loss()
        tried.append({"lr": rate, "loss_D_after": round(after, 4)})
        if after < before:
            break
    trained = replace_initializers(proto, {name: t.detach().cpu().numpy() for name, t in params.items()})
    info = {"epochs": epochs, "lr": rate, "batch_size": batch_size, "tensors": len(params),
            "loss_D_before": round(before, 4)}
    if lr is None:
        info["lr_tried"] = tried
    if losses:
        info.update(loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4))
    frozen = sorted(set(live) - set(params) - stats)  # computed from constants at load (e.g. folded Transposes)
    if frozen:
        info["frozen"] = frozen
    return trained, info


def tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(np.asarray(x, np.float32)), torch.as_tensor(np.asarray(y, np.int64))


def largest_prefix(accuracy_at, n: int, floor: float) -> tuple[int, float]:
    """(k, accuracy_at(k)): the most of n ordered candidates to prune while accuracy_at(k) >= floor.

    Pruning one candidate at a time costs a pass over D per candidate (512 on a ResNet-18's
    last layer); accuracy falls with k all but monotonically, so bisection finds the same k
    in log2(n) passes where it does.
    """
    floor -= 1e-9
    lo, acc_lo = 0, accuracy_at(0)
    hi = n
    if n:
        acc_hi = accuracy_at(n)
        if acc_hi >= floor:
            return n, acc_hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        acc = accuracy_at(mid)
        if acc >= floor:
            lo, acc_lo = mid, acc
        else:
            hi = mid
    return lo, acc_lo


def producer_rows(proto: onnx.ModelProto, site: Site) -> tuple[str, str | None, bool] | None:
    """(weight, bias, transposed) of the Conv or Gemm that writes the site's input, where both
    are initializers: zeroing a channel's row there zeroes the activation's input."""
    inits = {init.name for init in proto.graph.initializer}
    for node in proto.graph.node:
        if site.input not in node.output:
            continue
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 2 or node.input[1] not in inits:
            return None
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias is not None and bias not in inits:
            return None
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        return node.input[1], bias, node.op_type == "Gemm" and not trans_b
    return None


def zero_rows(new: dict, inits: dict, w_name: str, b_name: str | None, channels, *, transposed=False) -> None:
    """Zero output channels `channels` of a weight (rows, or columns when `transposed`, as a Gemm
    without transB stores them) and its bias, into `new` (name -> array; read from `inits` the
    first time a tensor is touched)."""
    w = new.get(w_name, numpy_helper.to_array(inits[w_name])).copy()
    if transposed:
        w[:, channels] = 0
    else:
        w[channels] = 0
    new[w_name] = w
    if b_name is not None:
        b = new.get(b_name, numpy_helper.to_array(inits[b_name])).copy()
        b[channels] = 0
        new[b_name] = b


def prune_channels(proto: onnx.ModelProto, model: Model, pruned: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict]:
    """Channels set to zero for good, as exactly as the graph allows; `pruned`: site -> a
    boolean per channel, True where the channel goes.

    A positively homogeneous site (ReLU family) gets a bound 0 on the channel, which
    `apply_bounds` folds into the weights. Any other activation here is 0 at 0 (SiLU, GELU, ELU,
    HardSwish, Mish; not Softplus), so the rows of the Conv or Gemm feeding it are zeroed
    instead. Where neither applies the bound 0 clips the positive part only: such sites are
    listed under "approximate".
    """
    sites = {s.name: s for s in model.sites}
    bounds: dict[str, np.ndarray] = {}
    weights: dict[str, np.ndarray] = {}
    approximate = []
    inits = {init.name: init for init in proto.graph.initializer}
    for name, mask in pruned.items():
        mask = np.asarray(mask, bool).reshape(-1)
        if not mask.any():
            continue
        channels = np.flatnonzero(mask)
        site = sites[name]
        rows = None if site.foldable or site.kind == "softplus" else producer_rows(proto, site)
        if rows is None:
            if not site.foldable:
                approximate.append(name)
            z = np.where(mask, np.float32(0.0), np.float32(NO_BOUND)).astype(np.float32)
            bounds[name] = z
            continue
        w_name, b_name, transposed = rows
        zero_rows(weights, inits, w_name, b_name, channels, transposed=transposed)
    out = replace_initializers(proto, weights) if weights else proto
    if bounds:
        out = apply_bounds(out, Bounds(bounds))
    return out, ({"approximate": approximate} if approximate else {})
