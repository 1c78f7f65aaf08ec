"""ANP: Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021."""

from __future__ import annotations

import time

import numpy as np
import onnx
import torch

from ...engine.executor import ChannelScale
from ..common.search import descend
from .common import accuracy, engine_of, largest_prefix, prune_channels, tensors


def anp(
    proto: onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    eps: float = 0.4,
    alpha: float = 0.2,
    lr: float = 0.2,
    iterations: int = 2000,
    batch_size: int = 128,
    threshold: float = 0.2,
    max_drop: float = 0.05,
    max_seconds: float | None = None,
) -> tuple[onnx.ModelProto, dict]:
    """Prune the channels whose mask, trained under adversarial neuron perturbation, falls low.

    Wu & Wang observe that a backdoored network collapses under small perturbations of the
    neurons the trigger uses far sooner than a clean one: masks m in [0, 1] per channel are
    trained (SGD, momentum 0.9) to keep D's cross-entropy low both as they are (weight `alpha`)
    and under the worst perturbation m + delta, delta in [-eps, eps] per channel (one signed
    step from a uniform start), and the channels whose mask ends under `threshold` are pruned,
    lowest mask first and only as many as keep D's accuracy within `max_drop` (as fine-pruning
    does; the paper and BackdoorBench pick the threshold on the test set, which a user has not).
    The paper perturbs each BatchNorm's scale and shift; exported models have BatchNorm folded
    into the convolutions, so here the neuron is a site's channel, scaled after its activation
    (for a ReLU the same as scaling the convolution's weights and bias together). Defaults are
    the paper's (2,000 iterations of 128 rows drawn with replacement); `max_seconds` stops the
    mask training early, said in the result.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = tensors(x, y)
    model, engine = engine_of(proto)
    with torch.no_grad():
        _, acts = engine.run(xt[:2], record=[s.name for s in model.sites], outputs=[engine.output_name])
    axes = {s.name: s.axis for s in model.sites}
    sizes = {k: a.shape[axes[k]] for k, a in acts.items() if a.dim() >= 2}
    masks = {k: torch.ones(c, requires_grad=True) for k, c in sizes.items()}
    opt = torch.optim.SGD(list(masks.values()), lr=lr, momentum=0.9)
    ce = torch.nn.functional.cross_entropy

    start = time.perf_counter()
    done, last_loss = 0, None
    while done < iterations:
        done += 1
        idx = torch.randint(0, xt.shape[0], (batch_size,), generator=gen)
        xb, yb = xt[idx], yt[idx]
        # The worst perturbation one signed step away from a random start.
        noise = {k: (torch.rand(c, generator=gen) * 2 - 1) * eps for k, c in sizes.items()}
        if eps > 0:
            for v in noise.values():
                v.requires_grad_(True)
            perturbed = {k: ChannelScale(masks[k].detach() + noise[k]) for k in sizes}
            grads = torch.autograd.grad(ce(engine(xb, perturbed), yb), list(noise.values()))
            with torch.no_grad():
                noise = {k: (noise[k] + eps * g.sign()).clamp(-eps, eps) for k, g in zip(noise, grads, strict=True)}
            loss_rob = ce(engine(xb, {k: ChannelScale(masks[k] + noise[k]) for k in sizes}), yb)
        else:
            loss_rob = torch.zeros(())
        loss_nat = ce(engine(xb, {k: ChannelScale(masks[k]) for k in sizes}), yb)
        loss = alpha * loss_nat + (1 - alpha) * loss_rob
        descend(opt, loss, masks)  # one SGD step, masks kept in [0, 1]
        last_loss = float(loss.detach())
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break

    seconds_masks = time.perf_counter() - start
    # Candidates under the threshold, lowest mask first; as many as keep D's accuracy.
    acc0 = accuracy(engine, xt, yt)
    flat = [(float(v), k, c) for k, m in masks.items() for c, v in enumerate(m.detach().tolist()) if v < threshold]
    flat.sort(key=lambda t: t[0])

    def first(n: int) -> dict:
        keep = {k: np.zeros(c, bool) for k, c in sizes.items()}
        for _, k, c in flat[:n]:
            keep[k][c] = True
        return keep

    def accuracy_with(n: int) -> float:
        scale = {k: ChannelScale(torch.as_tensor(~v, dtype=torch.float32)) for k, v in first(n).items()}
        return accuracy(engine, xt, yt, scale)

    lo, _ = largest_prefix(accuracy_with, len(flat), acc0 - max_drop)
    out, prune_info = prune_channels(proto, model, first(lo))
    _, check = engine_of(out)
    values = torch.cat([m.detach() for m in masks.values()])
    info = {
        "iterations": done,
        "iterations_planned": iterations,
        "batch_size": batch_size,
        "eps": eps,
        "alpha": alpha,
        "threshold": threshold,
        "channels": int(values.numel()),
        "under_threshold": len(flat),
        "pruned": lo,
        "mask_mean": round(float(values.mean()), 4),
        "loss_last": None if last_loss is None else round(last_loss, 4),
        "seconds_masks": round(seconds_masks, 1),
        "accuracy_D_before": round(acc0, 4),
        "accuracy_D_after": round(accuracy(check, xt, yt), 4),
        **prune_info,
    }
    return out, info
