"""mmac-ft: where the bounds alone leave a found stamp working, unlearn it in the weights.

Per-channel bounds cannot remove a backdoor whose trigger rides on activations that clean
images also use (the oracle on the samples says so). Once the stamp search has named a target,
the hardened graph's weights are fine-tuned on D and on D's other-class images stamped with the
reverse-engineered stamp, each labelled with its own class (Neural Cleanse's unlearning, here
after MMAC's bounds); the bounds themselves stay as they are. Measured on the 16x16 samples
(docs/experiments.md#mmac-ft), the bounds are what keep the fine-tune from drifting: from the
original weights the same fine-tune lost 10-15 points of accuracy; and it is the hardened graph
as written, the bounds folded into the weights, that fine-tunes well (the Blended CNN: 93.5%,
against 82.8% for the same weights with the bounds applied beside them).
"""

from __future__ import annotations

from collections.abc import Callable

import onnx
import torch

from ...core.model import replace_initializers
from ..common.weights import epochs_of, trainable
from .config import MmacConfig
from .unlearn import Stamp


def unlearn_weights(
    engine,
    proto: onnx.ModelProto,
    x: torch.Tensor,
    y: torch.Tensor,
    stamp: Stamp,
    bounds: dict[str, torch.Tensor] | None,
    config: MmacConfig,
    *,
    frozen: set[str] = frozenset(),
    progress: Callable[[dict], None] | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """`proto` with its weights fine-tuned (the engine's tensors, trained in place; `frozen`
    initializers kept), and what the fine-tune did: D's accuracy and D's stamped images sent to
    the target, before and after. `bounds`: applied by the engine (None: the graph holds them)."""
    other = y != stamp.target
    stamped = stamp.triggered(x[other])  # a copy per stand-in: the stamp and/or the scan's shift
    tx, ty = torch.cat([x, stamped]), torch.cat([y, y[other].repeat(stamp.copies)])
    params = trainable(engine, proto, frozen=frozen)

    def rates() -> tuple[float, float]:
        with torch.no_grad():
            acc = float((engine(x, bounds).argmax(1) == y).float().mean())
            fooled = float((engine(stamped, bounds).argmax(1) == stamp.target).float().mean())
        return round(acc, 4), round(fooled, 4)

    def tick(epoch: int, loss: float) -> None:
        if progress is not None:
            progress({"epoch": epoch, "max_epochs": config.ft_epochs, "loss": loss, "phase": "fine-tune"})

    acc0, fooled0 = rates()
    losses = epochs_of(engine, params, tx, ty, seed=config.seed, bounds=bounds, epochs=config.ft_epochs,
                       lr=config.ft_lr, batch_size=config.ft_batch, progress=tick)
    acc1, fooled1 = rates()
    tuned = replace_initializers(proto, {name: t.detach().cpu().numpy() for name, t in params.items()})
    info = {
        "epochs": config.ft_epochs, "lr": config.ft_lr, "batch_size": config.ft_batch, "tensors": len(params),
        "rows": int(tx.shape[0]), "stamped_rows": int(stamped.shape[0]),
        "accuracy_D": [acc0, acc1], "stamped_to_target": [fooled0, fooled1],
        "loss": [round(losses[0], 4), round(losses[-1], 4)] if losses else [],
    }
    return tuned, info
