"""Judge a model under onnxruntime: clean accuracy, ASR, robust accuracy, detection (`validate`)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields

import numpy as np

from ..core.data import Dataset, as_dataset, check_for_model
from ..core.errors import MmexportError
from ..core.model import MMDF_OUTPUTS, Model, as_model
from ..core.provenance import get_metadata
from ..core.threads import check_threads, using_threads
from .sessions import run_batches, session


@dataclass
class ValidationReport:
    """Clean accuracy and, with an attack set, attack success rate and robust accuracy.

    Rates are fractions in [0, 1]; `images_per_s` counts every image run (clean + attack)
    over the wall time of inference, batching included.
    """

    n: int
    accuracy: float
    balanced_accuracy: float
    per_class_accuracy: list[float | None]
    num_classes: int
    asr: float | None = None
    ra: float | None = None
    n_attack: int | None = None
    images_per_s: float = 0.0
    provider: str = "cpu"
    detection_rate: float | None = None
    false_positive_rate: float | None = None
    # What the MMDF model's thresholds hold on new clean images (its `mmexport.mmdf.guarantee`),
    # and P(at least this many flags | that rate): small means this clean data is not like D.
    false_positive_guarantee: float | None = None
    false_positive_p_value: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> ValidationReport:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in obj.items() if k in known})


def binomial_tail(k: int, n: int, rate: float) -> float:
    """P(X >= k) for X ~ Binomial(n, rate): how surprising k flags in n are at that rate."""
    if k <= 0:
        return 1.0
    if k > n or rate <= 0.0:
        return 0.0
    if rate >= 1.0:
        return 1.0
    j = np.arange(k, n + 1, dtype=np.float64)
    first = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
             + k * math.log(rate) + (n - k) * math.log1p(-rate))
    # log pmf(j + 1) - log pmf(j) = log((n - j) / (j + 1)) + log(rate / (1 - rate))
    steps = np.log((n - j[:-1]) / (j[:-1] + 1)) + math.log(rate) - math.log1p(-rate)
    logs = first + np.concatenate([[0.0], np.cumsum(steps)])
    return float(min(1.0, np.exp(np.logaddexp.reduce(logs))))


def classification_metrics(pred: np.ndarray, y: np.ndarray, num_classes: int):
    """(accuracy, balanced accuracy, per-class recall with None for absent classes)."""
    pred, y = np.asarray(pred), np.asarray(y)
    per_class: list[float | None] = []
    for c in range(num_classes):
        mask = y == c
        per_class.append(float((pred[mask] == c).mean()) if mask.any() else None)
    present = [a for a in per_class if a is not None]
    balanced = float(np.mean(present)) if present else float("nan")
    return float((pred == y).mean()), balanced, per_class


def attack_metrics(pred: np.ndarray, target: np.ndarray, y_true: np.ndarray):
    """(ASR, RA, n) over the attack samples whose true class is not the target.

    ASR: fraction sent to the target; RA: fraction still given their true class.
    """
    pred, target, y_true = np.asarray(pred), np.asarray(target), np.asarray(y_true)
    mask = y_true != target
    n = int(mask.sum())
    if n == 0:
        return None, None, 0
    return float((pred[mask] == target[mask]).mean()), float((pred[mask] == y_true[mask]).mean()), n


def detection_metric(flagged: np.ndarray, target: np.ndarray, y_true: np.ndarray) -> float | None:
    """Fraction of the attack samples whose true class is not the target that were flagged."""
    mask = np.asarray(y_true) != np.asarray(target)
    return float(np.asarray(flagged, bool)[mask].mean()) if mask.any() else None


def _check_data(data: Dataset, m: Model, num_classes: int | None, name: str) -> None:
    try:
        check_for_model(data, m.input_shape, num_classes, name=name)
    except MmexportError as exc:
        if m.path is None:
            raise
        raise MmexportError(f"{exc} (model {m.path})") from None


def validate(
    model,
    data: Dataset,
    *,
    attack: Dataset | None = None,
    provider: str = "auto",
    batch_size: int = 256,
    input_name: str | None = None,
    output_name: str | None = None,
    threads: int | None = None,
) -> ValidationReport:
    """Accuracy on `data` and, given an attack set (with `y_true`), ASR and RA.

    `model` is an ONNX path, an onnx.ModelProto or a mmexport Model; `data` and `attack` are
    Datasets, (x, y) pairs, or paths (.npz, image folder: see `load_data`). For an MMDF model (an
    `mmdf_detected` output) also the false-positive rate (flagged samples of `data`) and the
    detection rate (flagged attack samples whose true class is not the target).
    A model with a fixed batch N runs N samples at a time (the last run padded).
    `threads`: onnxruntime's intra-op threads (default: the cores this process may use).
    """
    check_threads(threads)
    with using_threads(threads):
        return _validate(model, data, attack, provider, batch_size, input_name, output_name)


def _validate(model, data, attack, provider, batch_size, input_name, output_name) -> ValidationReport:
    m = as_model(model, input_name=input_name, output_name=output_name)
    where = str(m.path) if m.path is not None else "model"
    data = as_dataset(data, model=m)
    attack = None if attack is None else as_dataset(attack, attack=True, model=m)
    _check_data(data, m, m.num_classes, "clean set")
    if attack is not None:
        if attack.y_true is None:
            name = attack.path or "attack set"
            raise MmexportError(f"{name}: an attack set needs key 'y_true' (the true labels)")
        _check_data(attack, m, m.num_classes, "attack set")

    sess, used = session(m.path if m.path is not None else m.proto, provider=provider)
    # An MMDF model (mmexport detect) also says which inputs it flagged.
    names = [m.output_name] + [o.name for o in sess.get_outputs() if o.name == MMDF_OUTPUTS[0]]
    kw = dict(input_name=m.input_name, batch_size=batch_size)
    start = time.perf_counter()
    logits, *flags = run_batches(sess, data.x, names, **kw)
    attack_logits, *attack_flags = (
        run_batches(sess, attack.x, names, **kw) if attack is not None else (None,)
    )
    elapsed = time.perf_counter() - start
    logits = logits.astype(np.float32, copy=False)
    n_run = len(data) + (len(attack) if attack is not None else 0)

    if logits.ndim != 2:
        raise MmexportError(
            f"{where}: output {m.output_name!r} has shape {logits.shape}, "
            "expected (N, classes) logits"
        )
    num_classes = m.num_classes or logits.shape[1]
    if m.num_classes is None:  # a free class dim: labels can only be checked now
        _check_data(data, m, num_classes, "clean set")
        if attack is not None:
            _check_data(attack, m, num_classes, "attack set")

    acc, balanced, per_class = classification_metrics(logits.argmax(1), data.y, num_classes)
    asr = ra = n_attack = None
    if attack is not None:
        asr, ra, n_attack = attack_metrics(attack_logits.argmax(1), attack.y, attack.y_true)
        if n_attack == 0:
            name = attack.path or "attack set"
            raise MmexportError(
                f"{name}: every sample's true label equals its target; no ASR to measure"
            )
    detection_rate = false_positive_rate = guarantee = surprise = None
    if flags:
        flagged = np.asarray(flags[0], bool)
        false_positive_rate = float(flagged.mean())
        if attack is not None:
            detection_rate = detection_metric(attack_flags[0], attack.y, attack.y_true)
        held = get_metadata(m.proto).get("mmexport.mmdf.guarantee", "")
        if held:
            guarantee = float(held)
            surprise = binomial_tail(int(flagged.sum()), len(flagged), guarantee)
    return ValidationReport(
        n=len(data),
        accuracy=acc,
        balanced_accuracy=balanced,
        per_class_accuracy=per_class,
        num_classes=int(num_classes),
        asr=asr,
        ra=ra,
        n_attack=n_attack,
        images_per_s=n_run / elapsed if elapsed > 0 else float("inf"),
        provider=used,
        detection_rate=detection_rate,
        false_positive_rate=false_positive_rate,
        false_positive_guarantee=guarantee,
        false_positive_p_value=surprise,
    )
