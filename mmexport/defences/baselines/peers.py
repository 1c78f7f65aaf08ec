"""Peer backdoor defences for bench_defences.py, each written from its paper's description.

- activation_clipping: the authors' earlier activation clipping, the baseline that MMAC (Wang, Xiang, Miller &
  Kesidis, arXiv 2308.04617) improves on: bounds as small as D's logits allow, no margin term.
- fine_pruning: Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
  Networks", RAID 2018.
- clp: Zheng, Zhang, Wang & Zou, "Data-free Backdoor Removal based on Channel Lipschitzness", ECCV 2022.
- fine_tuning: plain fine-tuning of every float weight on D with cross-entropy.
- anp: Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021.
- adversarial_unlearning: after Zeng et al., "Adversarial Unlearning of Backdoors via Implicit
  Hypergradient" (i-BAU), ICLR 2022: its minimax, solved by alternating steps (no hypergradient).

Every peer takes the ONNX model and the same small clean labelled set D (x, y) and returns a new
`onnx.ModelProto` that runs in plain onnxruntime, plus a small dict of what it chose. All are
deterministic given `seed`. Weights are trained in mmexport's Engine (the ONNX graph as a torch
Module) and written back into the same initializers, so the graph itself never changes.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ...core.bounds import Bounds
from ...core.model import Model, replace_initializers
from ...engine.executor import ChannelScale
from ...graph.rewrite import apply_bounds
from ..common.search import descend, initial_bounds
from .anp import anp
from .common import (
    FT_BATCH,
    FT_EPOCHS,
    accuracy,
    engine_of,
    largest_prefix,
    prune_channels,
    tensors,
    train,
    zero_rows,
)

# --- 1. activation clipping (no margin term) ----------------------------------------------------


def activation_clipping(
    proto: onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    max_epochs: int = 150,
    lr: float = 0.02,
    lambda0: float = 0.1,
    lambda_up: float = 1.3,
    check_every: int = 2,
    acc_floor: float = 0.98,
) -> tuple[onnx.ModelProto, dict]:
    """Per-channel upper bounds on every ReLU, shrunk as far as D's logits allow.

    Backdoor triggers drive a few activations far above anything clean inputs produce, so
    bounding every channel near its clean range cuts the trigger's path while clean inputs
    pass unchanged. Minimises  mean_D ||g(x;Z) - g(x)||^2 / scale + lambda * mean_sites mean_c Z_c/Z0_c
    over relative bounds s = Z/Z0 in [0, 1] (Z0: largest activation on D), full batch, Adam.
    lambda grows x`lambda_up` every `check_every` epochs while D's originally-correct samples stay
    >= `acc_floor` correct; on a miss the bounds go back to the last feasible ones and lambda is
    halved. The last feasible bounds are written.
    """
    torch.manual_seed(seed)
    xt, yt = tensors(x, y)
    _, engine = engine_of(proto)
    with torch.no_grad():
        ref = engine(xt)
    scale = ref.var(dim=0).sum().clamp_min(1e-8)
    correct = ref.argmax(1) == yt
    if not correct.any():
        correct = torch.ones_like(correct)

    z0 = initial_bounds(engine, xt, "channel")
    rel = {k: torch.ones_like(v, requires_grad=True) for k, v in z0.items()}
    opt = torch.optim.Adam(list(rel.values()), lr=lr)

    def bounds_now() -> dict:
        return {k: z0[k] * rel[k] for k in z0}

    last_ok = {k: v.detach().clone() for k, v in rel.items()}
    lam, last_lam, misses, epoch = lambda0, 0.0, 0, 0
    for epoch in range(1, max_epochs + 1):
        fit = ((engine(xt, bounds_now()) - ref) ** 2).sum(dim=1).mean() / scale
        size = torch.stack([s.mean() for s in rel.values()]).mean()
        descend(opt, fit + lam * size, rel)
        if epoch % check_every == 0 or epoch == max_epochs:
            with torch.no_grad():
                pred = engine(xt, bounds_now()).argmax(1)
            acc = float((pred[correct] == yt[correct]).float().mean())
            if acc >= acc_floor:
                last_ok = {k: v.detach().clone() for k, v in rel.items()}
                last_lam = lam
                lam *= lambda_up
            else:
                misses += 1
                with torch.no_grad():
                    for k, s in rel.items():
                        s.copy_(last_ok[k])
                opt = torch.optim.Adam(list(rel.values()), lr=lr)
                lam /= 2.0

    z = {k: (z0[k] * last_ok[k]).cpu().numpy().astype(np.float32) for k in z0}
    out = apply_bounds(proto, Bounds(z))
    _, check = engine_of(out)
    info = {
        "epochs": epoch,
        "lambda": round(last_lam, 6),
        "backoffs": misses,
        "mean_relative_bound": round(float(torch.cat([v.flatten() for v in last_ok.values()]).mean()), 4),
        "accuracy_D": round(accuracy(check, xt, yt), 4),
    }
    return out, info


# --- 2. fine-pruning --------------------------------------------------------------------------


def last_conv_site(model: Model) -> str:
    """The first site after the graph's last Conv; with no Conv, the last hidden site."""
    nodes = list(model.proto.graph.node)
    site_names = {s.name for s in model.sites}
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    if convs:
        for node in nodes[convs[-1] + 1 :]:
            if node.output and node.output[0] in site_names:
                return node.output[0]
    return model.sites[-1].name


def fine_pruning(
    proto: onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    max_drop: float = 0.05,
    epochs: int = FT_EPOCHS,
) -> tuple[onnx.ModelProto, dict]:
    """Prune the last conv layer's least-active channels on D, then fine-tune on D.

    Liu et al. observe that backdoor behaviour hides in channels that clean inputs leave dormant:
    pruning those (in increasing order of mean activation on D, as many as keep D's accuracy
    within `max_drop`, `largest_prefix`) removes the trigger's path, and fine-tuning repairs what clean
    accuracy the pruning cost. A pruned channel is held at zero during the fine-tune and
    written with `prune_channels`.
    """
    torch.manual_seed(seed)
    xt, yt = tensors(x, y)
    model, engine = engine_of(proto)
    site = last_conv_site(model)
    with torch.no_grad():
        _, acts = engine.run(xt, record=[site], outputs=[engine.output_name])
    a = acts[site]
    mean_act = a.transpose(0, 1).reshape(a.shape[1], -1).mean(dim=1) if a.dim() > 1 else a.mean().reshape(1)
    order = torch.argsort(mean_act, stable=True).tolist()

    acc0 = accuracy(engine, xt, yt)

    def first(n: int) -> dict:
        keep = torch.ones(len(order))
        keep[order[:n]] = 0.0
        return {site: ChannelScale(keep)}

    n, acc_pruned = largest_prefix(lambda k: accuracy(engine, xt, yt, first(k)), len(order), acc0 - max_drop)
    pruned = order[:n]

    tuned, train_info = train(engine, proto, xt, yt, seed=seed, bounds=first(n) if n else None, epochs=epochs)
    gone = np.zeros(len(order), bool)
    gone[pruned] = True
    out, prune_info = prune_channels(tuned, model, {site: gone}) if n else (tuned, {})
    _, check = engine_of(out)
    info = {
        "site": site,
        "channels": len(order),
        "pruned": len(pruned),
        "pruned_channels": sorted(pruned),
        "accuracy_D_before": round(acc0, 4),
        "accuracy_D_pruned": round(acc_pruned, 4),
        "accuracy_D_after": round(accuracy(check, xt, yt), 4),
        **train_info,
        **prune_info,
    }
    return out, info


# --- 3. CLP -----------------------------------------------------------------------------------


def channel_lipschitz(weight: np.ndarray) -> np.ndarray:
    """UCLC per output channel: the largest singular value of W_k reshaped to [C_in, kh*kw]."""
    w = weight.reshape(weight.shape[0], weight.shape[1], -1).astype(np.float64)
    return np.linalg.svd(w, compute_uv=False)[:, 0]


def clp(
    proto: onnx.ModelProto,
    x: np.ndarray | None = None,
    y: np.ndarray | None = None,
    *,
    seed: int = 0,
    u: float = 3.0,
) -> tuple[onnx.ModelProto, dict]:
    """Zero the conv channels whose Lipschitz upper bound is an outlier within their layer.

    Zheng et al. find that the channels a trigger drives are the ones most sensitive to their
    input, which shows in the weights alone: a channel whose UCLC (spectral norm of its kernel,
    BatchNorm scale folded in; the sample models are exported with BN fused) exceeds its layer's
    mean + u * std is pruned by zeroing its weights and bias. Data-free: x, y and seed are unused.
    The std is the population one (ddof=0).
    """
    del x, y, seed
    inits = {init.name: init for init in proto.graph.initializer}
    new: dict[str, np.ndarray] = {}
    layers: dict[str, list[int]] = {}
    skipped: list[str] = []
    for index, node in enumerate(proto.graph.node):
        if node.op_type != "Conv":
            continue
        label = node.name or f"Conv#{index}"
        w_name = node.input[1]
        b_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if w_name not in inits or (b_name is not None and b_name not in inits):
            skipped.append(label)  # weights computed at run time: nothing to prune in place
            continue
        uclc = channel_lipschitz(new.get(w_name, numpy_helper.to_array(inits[w_name])))
        threshold = uclc.mean() + u * uclc.std()
        prune = np.flatnonzero(uclc > threshold)
        layers[label] = prune.tolist()
        if prune.size == 0:
            continue
        zero_rows(new, inits, w_name, b_name, prune)
    out = replace_initializers(proto, new)
    info = {
        "u": u,
        "conv_layers": len(layers),
        "pruned": sum(len(v) for v in layers.values()),
        "pruned_channels": {k: v for k, v in layers.items() if v},
    }
    if skipped:
        info["skipped"] = skipped
    return out, info


# --- 4. fine-tuning ---------------------------------------------------------------------------


def fine_tuning(
    proto: onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    epochs: int = FT_EPOCHS,
) -> tuple[onnx.ModelProto, dict]:
    """Fine-tune every float weight on D with cross-entropy (Adam, lr 1e-3 or lower, batch 32).

    The simplest repair: training on clean data alone may overwrite what the trigger relies on.
    Same optimiser settings as fine-pruning's fine-tune stage, so the two isolate the pruning.
    """
    xt, yt = tensors(x, y)
    _, engine = engine_of(proto)
    acc0 = accuracy(engine, xt, yt)
    out, train_info = train(engine, proto, xt, yt, seed=seed, epochs=epochs)
    _, check = engine_of(out)
    acc = accuracy(check, xt, yt)
    return out, {"accuracy_D_before": round(acc0, 4), "accuracy_D_after": round(acc, 4), **train_info}


# i-BAU bounds its universal perturbation at L2 norm 10 on CIFAR-10 normalised by its channel
# spreads (~0.25): about 0.045 per input dimension on [0, 1] images (2.5 at 3x32x32).
AU_EPS_PER_DIM = 0.045
AU_STEPS = 5


def adversarial_unlearning(
    proto: onnx.ModelProto,
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int = 0,
    epochs: int = FT_EPOCHS,
    steps: int = AU_STEPS,
    eps: float | None = None,
    batch_size: int = FT_BATCH,
) -> tuple[onnx.ModelProto, dict]:
    """i-BAU-like: unlearn the worst universal perturbation D admits, standing in for the trigger.

    Every minibatch: one perturbation for the whole batch (L2 norm <= eps, `steps` normalised
    gradient-ascent steps on the cross-entropy from zero), then an Adam step on the weights
    against the cross-entropy of the clean and the perturbed rows with their true labels. i-BAU
    solves the same minimax with an implicit hypergradient; alternating steps is the plain
    solution it improves on. The rate is chosen as fine-tuning's (`common.train`): the first of
    1e-3, 1e-4, 1e-5 whose run ends with D's clean loss below where it started.
    """
    xt, yt = tensors(x, y)
    _, engine = engine_of(proto)
    acc0 = accuracy(engine, xt, yt)
    eps = AU_EPS_PER_DIM * float(np.sqrt(np.prod(x.shape[1:]))) if eps is None else eps
    ce = torch.nn.functional.cross_entropy
    norms = []

    def worst(xb, yb):
        delta = torch.zeros_like(xb[:1])
        for _ in range(steps):
            delta.requires_grad_(True)
            (g,) = torch.autograd.grad(ce(engine(xb + delta), yb), delta)
            with torch.no_grad():
                delta = delta + (2.5 * eps / steps) * g / g.norm().clamp_min(1e-12)
                delta = delta * min(1.0, eps / float(delta.norm().clamp_min(1e-12)))
        norms.append(float(delta.norm()))
        return delta.detach()

    def batch_loss(xb, yb):
        delta = worst(xb, yb)
        return 0.5 * (ce(engine(xb), yb) + ce(engine(xb + delta), yb))

    out, train_info = train(engine, proto, xt, yt, seed=seed, epochs=epochs, batch_size=batch_size,
                            batch_loss=batch_loss)
    _, check = engine_of(out)
    return out, {"accuracy_D_before": round(acc0, 4), "accuracy_D_after": round(accuracy(check, xt, yt), 4),
                 **train_info, "eps": round(eps, 4), "steps": steps,
                 "perturbation_norm_mean": round(float(np.mean(norms)), 4)}


PEERS = {
    "activation-clipping": activation_clipping,
    "fine-pruning": fine_pruning,
    "clp": clp,
    "fine-tuning": fine_tuning,
    "anp": anp,
    "adversarial-unlearning": adversarial_unlearning,
}
