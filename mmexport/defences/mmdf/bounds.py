"""Clean-range bounds: each channel bounded at the top of its range on D and D's shifts."""

from __future__ import annotations

import numpy as np
import onnx

from ...core.bounds import Bounds


def shifted(x: np.ndarray, channel_axis: int | None = 1) -> np.ndarray:
    """x and its four 1-pixel shifts (edges replicated), [5N, ...], for image batches
    [N, C, H, W] (or [N, H, W, C] with `channel_axis` 3); other inputs come back as they are.
    Copy j of sample i is row j*N + i."""
    if x.ndim != 4:
        return x
    if channel_axis not in (None, 1):
        return np.moveaxis(shifted(np.moveaxis(x, channel_axis, 1)), 1, channel_axis)
    pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = x.shape[2], x.shape[3]
    moves = ((-1, 0), (1, 0), (0, -1), (0, 1))
    return np.concatenate([x] + [pad[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]
                                 for dy, dx in moves])


def site_maxima(proto: onnx.ModelProto, sites, x: np.ndarray, *, input_name: str,
                provider: str = "cpu", batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per sample, the largest activation of every channel of every site: {site: [N, C]}.

    A site without a known channel axis gets one value per sample ([N, 1] -> a scalar bound).
    Run by onnxruntime with the sites added as graph outputs.
    """
    from ...runtime.sessions import tensor_summaries

    axes = {s.name: s.axis for s in sites if s.channels is not None}

    def per_channel_max(name, a):
        if name in axes and a.ndim >= 2:
            a = np.moveaxis(a, axes[name], 1)  # channels on axis 1 (a token tensor's last)
            return a.reshape(a.shape[0], a.shape[1], -1).max(axis=2)
        return a.reshape(a.shape[0], -1).max(axis=1, keepdims=True)

    return tensor_summaries(proto, [s.name for s in sites], x, per_channel_max,
                            input_name=input_name, provider=provider, batch_size=batch_size)


def clean_max_bounds(maxima: dict[str, np.ndarray], index=None) -> Bounds:
    """The upper end of each channel's clean range, from per-sample maxima {site: [N, C]}.

    x_(n) + (x_(n) - x_(n-1)) per channel (the two largest values): the largest clean value
    seen plus the last gap, an estimate of the range's endpoint that a new clean input rarely
    passes and a trigger, which drives a few channels well outside it, does. `index` picks
    the samples to use. Sites without a channel axis ([N, 1]) get a scalar bound.

    Bounds are at least 0: a channel of a GELU or SiLU that stays negative on D gets 0,
    which leaves every clean value it had and cuts whatever a trigger drives above 0 (every
    site's activation reaches values <= 0, so 0 never clips below its whole range).
    """
    values = {}
    for name, m in maxima.items():
        m = m if index is None else m[index]
        top = np.sort(m, axis=0)[-2:] if len(m) > 1 else np.concatenate([m, m])
        z = np.maximum(2 * top[-1] - top[-2], 0.0).astype(np.float32)
        values[name] = z.reshape(()) if z.shape == (1,) else z
    return Bounds(values, {"method": "clean-max"})


def screen_scales(z: np.ndarray) -> np.ndarray:
    """What a channel's excess over its bound is divided by in the screen: its bound, or the
    site's mean bound where that is larger (a channel bounded at 0, dead or negative on D,
    would otherwise weigh any positive value without limit)."""
    z = np.asarray(z, np.float64)
    mean = float(z.mean()) if z.size else 0.0
    return np.maximum(z, mean if mean > 0 else 1.0)


def exceedance(maxima: dict[str, np.ndarray], bounds: Bounds, index=None) -> np.ndarray:
    """How far each sample's activations pass the bounds: sum over sites and channels of
    max(0, m - z) / scale (`screen_scales`), [N]; 0 exactly where no channel passes its bound,
    and then the bounded branch equals the original (d = 0)."""
    total = None
    for name, z in bounds.values.items():
        m = np.asarray(maxima[name] if index is None else maxima[name][index], np.float64)
        zz = np.asarray(z, np.float64).reshape(-1)
        e = (np.maximum(m - zz, 0.0) / screen_scales(zz)).sum(axis=1)
        total = e if total is None else total + e
    return total


def fit_screen(screen: float, fold: np.ndarray, plan: dict, maxima, d: np.ndarray,
               threshold: float) -> tuple[dict, np.ndarray | None]:
    """The screen's threshold: the 1 - `screen` quantile of D's cross-fitted exceedance.

    Without a focus class the bounded branch runs on every input, doubling the model's cost,
    yet d > 0 needs some channel past its bound, and d above the threshold needs it far past:
    on the real tier, D's cross-fitted inputs over the margin threshold all lie in the top
    fifth of exceedance (docs/experiments.md, MMDF's screen). Returns its report and D's inputs
    past it (None where there is no screen). `fold`: each calibration row's cross-fitting fold.
    """
    if plan["class"] is not None:
        return {"reason": "focus class set"}, None
    if screen >= 1.0:
        return {"reason": "screen 1: every input"}, None
    if maxima is None:
        return {"reason": "bounds not clean-max: no cross-fitted exceedance"}, None
    e = np.empty(len(fold), np.float64)
    for k in np.unique(fold):
        rows = np.flatnonzero(fold == k)
        if len(rows):
            e[rows] = exceedance(maxima, clean_max_bounds(maxima, np.flatnonzero(fold != k)), rows)
    t = float(np.quantile(e, 1.0 - screen))
    passed = e > t
    over = d > threshold
    return {"threshold": t, "share": float(passed.mean()),
            "margin_flags_kept": float(passed[over].mean()) if over.any() else None,
            "margin_flags": int(over.sum())}, passed
