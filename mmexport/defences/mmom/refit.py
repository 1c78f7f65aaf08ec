"""Re-fit the last linear layer on the clean set: the classifier-retraining baseline of
long-tailed learning (Kang et al. 2020), and MMOM's finishing step.

A model trained on imbalanced data learns usable features but a biased classifier; its
last layer alone can be refitted on a small class-balanced set. Combined with MMOM the
features are those of the clipped model, so the refit sees activations whose extreme
channels the bounds have already tamed.

The refit is softmax regression on the penultimate features, every class weighted
equally, an L2 penalty chosen by stratified cross-validation on D (balanced accuracy),
started from the model's own weights. D's labels are the only information used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ...core.conventions import logits_of
from ...core.errors import MmexportError
from ...core.model import Model, initializer_names, replace_initializers
from ..common.stats import balanced_accuracy, stratified_folds

PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 weight on the refitted matrix, per feature
_PASS_THROUGH = ("Identity",)


@dataclass(frozen=True)
class Classifier:
    """The last layer: logits = features @ W (+ b), W stored [K, F] if `transposed`."""

    features: str  # tensor name of the layer's input
    weight: str  # initializer names
    bias: str | None
    transposed: bool  # Gemm transB=1: weight is [K, F]


def find_classifier(model: Model) -> Classifier:
    """The Gemm, or MatMul (+ Add), that produces the logits from constant weights."""
    graph = model.proto.graph
    inits = initializer_names(graph)
    producer = {o: n for n in graph.node for o in n.output}
    where = model.path or "model"
    name = logits_of(model).name  # behind a final Softmax
    node = producer.get(name)
    while node is not None and node.op_type in _PASS_THROUGH:
        node = producer.get(node.input[0])

    def fail(why: str) -> MmexportError:
        return MmexportError(
            f"{where}: output {model.output_name!r}: {why}; the last-layer refit needs a Gemm or "
            "MatMul (+ Add) with constant weights producing the logits"
        )

    if node is None:
        raise fail("no node produces it")
    bias = None
    if node.op_type == "Add":
        consts = [i for i in node.input if i in inits]
        others = [i for i in node.input if i not in inits]
        if len(consts) != 1 or len(others) != 1:
            raise fail(f"node {node.name!r} (Add) is not a bias addition")
        bias, node = consts[0], producer.get(others[0])
        if node is None or node.op_type != "MatMul":
            raise fail("the bias is not added to a MatMul")
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise fail(f"node {node.name!r} (Gemm) has transA/alpha/beta set")
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if node.input[1] not in inits or (has_bias and node.input[2] not in inits):
            raise fail(f"node {node.name!r} (Gemm) has weights computed at run time")
        bias = node.input[2] if has_bias else None
        return Classifier(node.input[0], node.input[1], bias, bool(attrs.get("transB", 0)))
    if node.op_type == "MatMul":
        if node.input[1] not in inits:
            raise fail(f"node {node.name!r} (MatMul) has weights computed at run time")
        return Classifier(node.input[0], node.input[1], bias, False)
    raise fail(f"it comes from node {node.name!r} ({node.op_type})")


def classifier_weights(model: Model, clf: Classifier) -> tuple[np.ndarray, np.ndarray]:
    """(W [K, F], b [K]) as float64."""
    inits = {i.name: i for i in model.proto.graph.initializer}
    w = numpy_helper.to_array(inits[clf.weight]).astype(np.float64)
    if w.ndim != 2:
        raise MmexportError(f"initializer {clf.weight!r}: expected a matrix, got shape {w.shape}")
    w = w if clf.transposed else w.T
    b = numpy_helper.to_array(inits[clf.bias]).astype(np.float64).reshape(-1) if clf.bias else np.zeros(w.shape[0])
    if b.shape[0] != w.shape[0]:
        raise MmexportError(f"initializer {clf.bias!r}: {b.shape[0]} biases for {w.shape[0]} classes")
    return w, b


def features(engine, x: torch.Tensor, clf: Classifier, bounds: Mapping | None = None) -> torch.Tensor:
    """The classifier's input for a batch, flattened to [N, F], in float64."""
    with torch.no_grad():
        out, _ = engine.run(x, bounds, outputs=[clf.features])
    f = out[clf.features]
    return f.reshape(f.shape[0], -1).double()


def fit_softmax(
    f: torch.Tensor,
    y: torch.Tensor,
    w0: np.ndarray,
    b0: np.ndarray,
    penalty: float,
    *,
    fit_bias: bool = True,
    iterations: int = 200,
) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced softmax regression with an L2 penalty, from (w0, b0), by L-BFGS."""
    k = w0.shape[0]
    counts = torch.bincount(y, minlength=k).double().clamp_min(1)
    sample_w = (1.0 / counts)[y]
    sample_w = sample_w / sample_w.sum()
    # Penalise relative to the feature scale so one grid suits every model.
    scale = f.pow(2).mean().clamp_min(1e-12)
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(b0, dtype=torch.float64, requires_grad=fit_bias)
    opt = torch.optim.LBFGS([w, b] if fit_bias else [w], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = f @ w.T + b
        loss = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * sample_w).sum()
        loss = loss + penalty * scale * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy(), b.detach().numpy()


def refit(
    engine,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    bounds: Mapping | None = None,
    penalties=PENALTIES,
    folds: int = 2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(W [K, F], b [K], CV table): the penalty with the best held-out balanced accuracy,
    or the model's own layer when no refit beats it on held-out data (a clean model)."""
    model = engine.model
    clf = find_classifier(model)
    w0, b0 = classifier_weights(model, clf)
    f = features(engine, x, clf, bounds).cpu()
    y = y.cpu()
    if f.shape[1] != w0.shape[1]:
        raise MmexportError(f"{clf.features!r}: {f.shape[1]} features, but {clf.weight!r} expects {w0.shape[1]}")
    held = stratified_folds(y.numpy(), folds, seed)
    table = []
    for penalty in penalties:
        scores = []
        for out_idx in held:
            mask = torch.ones(len(y), dtype=torch.bool)
            mask[torch.from_numpy(out_idx)] = False
            w, b = fit_softmax(f[mask], y[mask], w0, b0, penalty, fit_bias=clf.bias is not None)
            pred = (f[~mask] @ torch.from_numpy(w).T + torch.from_numpy(b)).argmax(1)
            scores.append(balanced_accuracy(pred, y[~mask], num_classes))
        table.append({"penalty": penalty, "balanced_accuracy": float(np.mean(scores)), "folds": scores})
    pred = (f @ torch.from_numpy(w0).T + torch.from_numpy(b0)).argmax(1)
    base = float(np.mean([balanced_accuracy(pred[i], y[i], num_classes) for i in map(torch.from_numpy, held)]))
    table.append({"penalty": None, "balanced_accuracy": base, "note": "the model's own last layer"})
    best = max(table[:-1], key=lambda r: (r["balanced_accuracy"], r["penalty"]))
    if best["balanced_accuracy"] <= base:
        # No refit beat the layer the model came with on held-out data: keep it.
        return w0, b0, table
    w, b = fit_softmax(f, y, w0, b0, best["penalty"], fit_bias=clf.bias is not None)
    return w, b, table


def write_classifier(model: Model, w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    """The model with its last layer replaced (a bias-free layer gets none)."""
    clf = find_classifier(model)
    values = {clf.weight: w if clf.transposed else w.T}
    if clf.bias:
        inits = {i.name: i for i in model.proto.graph.initializer}
        values[clf.bias] = b.reshape(numpy_helper.to_array(inits[clf.bias]).shape)
    return replace_initializers(model.proto, values)
