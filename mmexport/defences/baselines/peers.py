"""Peer backdoor defences for bench_defences.py, each written from its paper's description.

- activation_clipping: the authors' earlier activation clipping, the baseline that MMAC (Wang, Xiang, Miller &
  Kesidis, arXiv 2308.04617) improves on: bounds as small as D's logits allow, no margin term.
- fine_pruning: Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
  Networks", RAID 2018.
- clp: Zheng, Zhang, Wang & Zou, "Data-free Backdoor Removal based on Channel Lipschitzness", ECCV 2022.
- fine_tuning: plain fine-tuning of every float weight on D with cross-entropy.
- anp: Wu & Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021.

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
from ...core.model import Model, Site, from_proto, replace_initializers
from ...engine.executor import ChannelScale, Engine
from ...graph.rewrite import apply_bounds
from ..common.search import descend, initial_bounds

# A bound that never clips a finite activation: how "not pruned" is written beside a pruned channel.
NO_BOUND = float(np.finfo(np.float32).max)
FT_EPOCHS = 20
FT_LRS = (1e-3, 1e-4, 1e-5)  # Adam's learning rates, tried in turn (`_train`)
FT_BATCH = 32


# --- shared helpers -----------------------------------------------------------------------------


def _engine(proto: onnx.ModelProto) -> tuple[Model, Engine]:
    model = from_proto(proto)
    return model, Engine(model)


def _predict(engine: Engine, x: torch.Tensor, bounds=None) -> torch.Tensor:
    with torch.no_grad():
        return engine(x, bounds).argmax(1)


def _accuracy(engine: Engine, x: torch.Tensor, y: torch.Tensor, bounds=None) -> float:
    return float((_predict(engine, x, bounds) == y).float().mean())


def _train(
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
) -> tuple[onnx.ModelProto, dict]:
    """Adam on every float initializer the graph reads, cross-entropy on (x, y), in minibatches.

    `bounds` (site -> tensor) stay applied throughout, so a pruned channel stays at zero and its
    weights see no gradient. Returns `proto` with the trained initializers written back.

    `lr` None tries FT_LRS in turn and keeps the first whose fine-tune ends with D's loss below
    where it started: Adam at 1e-3 suits the 16x16 samples but sends a PreAct-ResNet-18 (BatchNorm
    in inference mode) to chance within an epoch, which D's own loss shows; a user would lower it.
    """
    inits = {init.name for init in proto.graph.initializer}
    # A BatchNormalization's running mean and variance are statistics of the training data, not weights.
    stats = {n.input[i] for n in proto.graph.node if n.op_type == "BatchNormalization" for i in (3, 4)
             if len(n.input) > i}
    live = engine.constants()
    params = {name: t for name, t in live.items() if name in inits - stats}
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
        losses = _epochs(engine, params, x, y, seed=seed, bounds=bounds, epochs=epochs, lr=rate,
                         batch_size=batch_size)
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


def _epochs(engine, params: dict, x, y, *, seed: int, bounds, epochs: int, lr: float, batch_size: int) -> list:
    """The fine-tune itself: mean loss per epoch, `params` trained in place."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    for t in params.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for i in range(0, x.shape[0], batch_size):
            idx = order[i : i + batch_size]
            loss = torch.nn.functional.cross_entropy(engine(x[idx], bounds), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / x.shape[0])
    for t in params.values():
        t.requires_grad_(False)
    return losses


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(np.asarray(x, np.float32)), torch.as_tensor(np.asarray(y, np.int64))


def largest_prefix(accuracy, n: int, floor: float) -> tuple[int, float]:
    """(k, accuracy(k)): the most of n ordered candidates to prune while accuracy(k) >= floor.

    Pruning one candidate at a time costs a pass over D per candidate (512 on a ResNet-18's
    last layer); accuracy falls with k all but monotonically, so bisection finds the same k
    in log2(n) passes where it does.
    """
    floor -= 1e-9
    lo, acc_lo = 0, accuracy(0)
    hi = n
    if n:
        acc_hi = accuracy(n)
        if acc_hi >= floor:
            return n, acc_hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        acc = accuracy(mid)
        if acc >= floor:
            lo, acc_lo = mid, acc
        else:
            hi = mid
    return lo, acc_lo


def _producer_rows(proto: onnx.ModelProto, site: Site) -> tuple[str, str | None, bool] | None:
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
        rows = None if site.foldable or site.kind == "softplus" else _producer_rows(proto, site)
        if rows is None:
            if not site.foldable:
                approximate.append(name)
            z = np.where(mask, np.float32(0.0), np.float32(NO_BOUND)).astype(np.float32)
            bounds[name] = z
            continue
        w_name, b_name, transposed = rows
        w = weights.get(w_name, numpy_helper.to_array(inits[w_name])).copy()
        if transposed:
            w[:, channels] = 0
        else:
            w[channels] = 0
        weights[w_name] = w
        if b_name is not None:
            b = weights.get(b_name, numpy_helper.to_array(inits[b_name])).copy()
            b[channels] = 0
            weights[b_name] = b
    out = replace_initializers(proto, weights) if weights else proto
    if bounds:
        out = apply_bounds(out, Bounds(bounds))
    return out, ({"approximate": approximate} if approximate else {})


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
    xt, yt = _tensors(x, y)
    _, engine = _engine(proto)
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
    _, check = _engine(out)
    info = {
        "epochs": epoch,
        "lambda": round(last_lam, 6),
        "backoffs": misses,
        "mean_relative_bound": round(float(torch.cat([v.flatten() for v in last_ok.values()]).mean()), 4),
        "accuracy_D": round(_accuracy(check, xt, yt), 4),
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
    xt, yt = _tensors(x, y)
    model, engine = _engine(proto)
    site = last_conv_site(model)
    with torch.no_grad():
        _, acts = engine.run(xt, record=[site], outputs=[engine.output_name])
    a = acts[site]
    mean_act = a.transpose(0, 1).reshape(a.shape[1], -1).mean(dim=1) if a.dim() > 1 else a.mean().reshape(1)
    order = torch.argsort(mean_act, stable=True).tolist()

    acc0 = _accuracy(engine, xt, yt)

    def first(n: int) -> dict:
        keep = torch.ones(len(order))
        keep[order[:n]] = 0.0
        return {site: ChannelScale(keep)}

    n, acc_pruned = largest_prefix(lambda k: _accuracy(engine, xt, yt, first(k)), len(order), acc0 - max_drop)
    pruned = order[:n]

    tuned, train_info = _train(engine, proto, xt, yt, seed=seed, bounds=first(n) if n else None, epochs=epochs)
    gone = np.zeros(len(order), bool)
    gone[pruned] = True
    out, prune_info = prune_channels(tuned, model, {site: gone}) if n else (tuned, {})
    _, check = _engine(out)
    info = {
        "site": site,
        "channels": len(order),
        "pruned": len(pruned),
        "pruned_channels": sorted(pruned),
        "accuracy_D_before": round(acc0, 4),
        "accuracy_D_pruned": round(acc_pruned, 4),
        "accuracy_D_after": round(_accuracy(check, xt, yt), 4),
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
        w = new.get(w_name, numpy_helper.to_array(inits[w_name])).copy()
        uclc = channel_lipschitz(w)
        threshold = uclc.mean() + u * uclc.std()
        prune = np.flatnonzero(uclc > threshold)
        layers[label] = prune.tolist()
        if prune.size == 0:
            continue
        w[prune] = 0
        new[w_name] = w
        if b_name is not None:
            b = new.get(b_name, numpy_helper.to_array(inits[b_name])).copy()
            b[prune] = 0
            new[b_name] = b
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
    xt, yt = _tensors(x, y)
    _, engine = _engine(proto)
    acc0 = _accuracy(engine, xt, yt)
    out, train_info = _train(engine, proto, xt, yt, seed=seed, epochs=epochs)
    _, check = _engine(out)
    acc = _accuracy(check, xt, yt)
    return out, {"accuracy_D_before": round(acc0, 4), "accuracy_D_after": round(acc, 4), **train_info}


# --- 5. ANP -----------------------------------------------------------------------------------


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
    import time

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = _tensors(x, y)
    model, engine = _engine(proto)
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
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for m in masks.values():
                m.clamp_(0.0, 1.0)
        last_loss = float(loss.detach())
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break

    seconds_masks = time.perf_counter() - start
    # Candidates under the threshold, lowest mask first; as many as keep D's accuracy.
    acc0 = _accuracy(engine, xt, yt)
    flat = [(float(v), k, c) for k, m in masks.items() for c, v in enumerate(m.detach().tolist()) if v < threshold]
    flat.sort(key=lambda t: t[0])

    def first(n: int) -> dict:
        keep = {k: np.zeros(c, bool) for k, c in sizes.items()}
        for _, k, c in flat[:n]:
            keep[k][c] = True
        return keep

    def accuracy_with(n: int) -> float:
        scale = {k: ChannelScale(torch.as_tensor(~v, dtype=torch.float32)) for k, v in first(n).items()}
        return _accuracy(engine, xt, yt, scale)

    lo, _ = largest_prefix(accuracy_with, len(flat), acc0 - max_drop)
    out, prune_info = prune_channels(proto, model, first(lo))
    _, check = _engine(out)
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
        "accuracy_D_after": round(_accuracy(check, xt, yt), 4),
        **prune_info,
    }
    return out, info


PEERS = {
    "activation-clipping": activation_clipping,
    "fine-pruning": fine_pruning,
    "clp": clp,
    "fine-tuning": fine_tuning,
    "anp": anp,
}
