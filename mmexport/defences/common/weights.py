"""Training a model's weights in the engine: which tensors are weights, and the epochs.

Used where a defence goes past the bounds and changes the weights (`mmac-ft`, and the peers'
fine-tunes). The engine runs the ONNX graph's initializers as tensors; training them in place
and writing them back keeps the graph, its names and its opset as they were.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import torch


def trainable(engine, proto: onnx.ModelProto, *, frozen: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The engine's tensors that are the graph's weights: its float initializers, less
    BatchNormalization's running mean and variance (statistics of the training data, not
    weights), less what the engine computed from constants at load (a folded Transpose is not an
    initializer), less `frozen` (e.g. the bounds a hardened graph holds)."""
    inits = {init.name for init in proto.graph.initializer}
    stats = {n.input[i] for n in proto.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)
             if len(n.input) > i}
    keep = inits - stats - set(frozen)
    return {name: t for name, t in engine.constants().items() if name in keep and t.is_floating_point()}


def epochs_of(engine, params: dict, x, y, *, seed: int, bounds, epochs: int, lr: float, batch_size: int,
              progress: Callable[[int, float], None] | None = None, batch_loss=None) -> list:
    """Adam on `params` (trained in place), cross-entropy on (x, y) in shuffled minibatches, with
    `bounds` applied; the mean loss per epoch. `progress(epoch, loss)` after each epoch.
    `batch_loss(xb, yb)`, where given, is the loss of a minibatch instead."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    for t in params.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    losses = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(x.shape[0], generator=gen).to(x.device)
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            idx = order[i : i + batch_size]
            if batch_loss is None:
                loss = torch.nn.functional.cross_entropy(engine(x[idx], bounds), y[idx])
            else:
                loss = batch_loss(x[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / x.shape[0])
        if progress is not None:
            progress(epoch, losses[-1])
    for t in params.values():
        t.requires_grad_(False)
    return losses
