"""The score MMDF tests, the margin gap d, and the law of d on clean inputs (the null).

d on clean data is a point mass at 0 plus a short, skewed right tail: a fitted Gaussian (the
paper's choice) puts the threshold far too low. The default is the conformal quantile, which
a new clean score exceeds with probability <= alpha whatever the law.

The unit of that guarantee is the image: D's 1-pixel shifts are copies of its images, not new
ones, and ranking their rows as if they were (5 n scores where there are n images) set the
threshold below what n images support (`fit_image_null` ranks the images). Two tests at alpha / 2
each hold alpha only when D has 2 / alpha - 1 images (399 at alpha = 0.5%): below that each test's
threshold is its largest image score and the guarantee is 2 / (n + 1), which `detect` reports.
Putting both tests on one scale to rank once (guarantee 1 / (n + 1)) was tried and not kept: one
odd clean image in either test then raises both thresholds (docs/experiments.md#mmdf-null).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from ...core.errors import MmexportError, ParameterError

# d is a difference of float32 margins: below this (relative) it is rounding, not clipping.
ROUNDING = 1e-5
LAWS = ("conformal", "exponential-tail", "gaussian")



def margin_gap(logits: np.ndarray, bounded_logits: np.ndarray) -> np.ndarray:
    """d = m_c^(x) - m_c^(x; Z) per row, c^ the original argmax; logits are [N, K], K >= 2."""
    g = np.asarray(logits, dtype=np.float64)
    b = np.asarray(bounded_logits, dtype=np.float64)
    if g.shape != b.shape or g.ndim != 2 or g.shape[1] < 2:
        raise MmexportError(
            f"margin gap: logits shaped {g.shape} and {b.shape}, expected (N, K >= 2)"
        )
    rows = np.arange(len(g))
    c = g.argmax(1)

    def margin(z):
        others = z.copy()
        others[rows, c] = -np.inf
        return z[rows, c] - others.max(1)

    return margin(g) - margin(b)


@dataclass(frozen=True)
class NullFit:
    """The law of d on clean data, the threshold it gives and how it does on that data.

    threshold: d above it is flagged; fpr: the fraction of the calibration scores above it
    (the observed false-positive rate on D); params: the law's fitted parameters.
    """

    law: str
    alpha: float
    threshold: float
    fpr: float
    n: int
    params: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"law": self.law, "alpha": self.alpha, "threshold": self.threshold,
                "fpr": self.fpr, "n": self.n, "params": self.params}


def fit_null(d: np.ndarray, alpha: float = 0.005, *, law: str = "conformal",
             tail: float = 0.1, floor: float = 0.0) -> NullFit:
    """The threshold on d that clean inputs exceed with probability about `alpha`.

    "conformal" (default): the ceil((n + 1)(1 - alpha))-th smallest of the n clean scores.
    For a test score exchangeable with them, P(score > threshold) <= alpha, whatever the
    law; when n + 1 < 1 / alpha the largest score is used and the guarantee is 1 / (n + 1).
    "exponential-tail": peaks over threshold, an exponential law fitted to the excesses over
    the 1 - `tail` quantile u, threshold u + beta ln(p_u / alpha): extrapolates past the
    largest score when n is small. "gaussian": mean + z_(1-alpha) sd, the paper's choice;
    d is right-skewed with a point mass at 0, and this puts the threshold far too low.
    The threshold is at least `floor` (rounding noise: d of an unclipped input is 0 only
    up to float error).
    """
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    if law not in LAWS:
        raise ParameterError("law", f"{law!r}: expected one of {', '.join(LAWS)}")
    if not 0.0 < alpha < 0.5:
        raise ParameterError("alpha", f"must be in (0, 0.5), got {alpha}")
    if len(d) < 10:
        raise MmexportError(f"{len(d)} clean scores: need at least 10 to fit the null law")
    if not np.isfinite(d).all():
        raise MmexportError("clean scores hold NaN or Inf: the model's logits are not finite on D")
    n = len(d)
    if law == "conformal":
        rank = math.ceil((n + 1) * (1 - alpha))
        thr = float(np.sort(d)[min(rank, n) - 1])
        params = {"rank": min(rank, n), "guarantee": max(alpha, 1 / (n + 1))}
    elif law == "exponential-tail":
        u = float(np.quantile(d, 1 - tail))
        excess = d[d > u] - u
        p_u = len(excess) / n
        beta = float(excess.mean()) if len(excess) else 0.0
        thr = u + beta * math.log(p_u / alpha) if p_u > alpha else u
        params = {"u": u, "p_u": p_u, "beta": beta}
    else:
        mu, sd = float(d.mean()), float(d.std())
        thr = mu + NormalDist().inv_cdf(1 - alpha) * sd
        params = {"mean": mu, "std": sd}
    # The graph compares in float32: the threshold is that float32 number.
    thr = float(np.float32(max(float(thr), floor)))
    return NullFit(law=law, alpha=alpha, threshold=thr, fpr=float(np.mean(d > thr)), n=n,
                   params=params)


def image_scores(scores: np.ndarray, images: int, tested: np.ndarray) -> np.ndarray:
    """Each image's largest score over its tested copies (row j * images + i is copy j of
    image i); -inf for an image no copy of which is tested."""
    s = np.where(tested, np.asarray(scores, dtype=np.float64), -np.inf)
    return s.reshape(-1, images).max(axis=0)



def fit_image_null(scores: np.ndarray, images: int, tested: np.ndarray, alpha: float = 0.005, *,
                   floor: float = 0.0) -> NullFit:
    """The conformal threshold with the image as its unit: a new clean image that this test
    may flag exceeds it with probability <= max(alpha, 1 / (images + 1)).

    `scores`: D's rows, copy j of image i at row j * images + i (D and its shifts);
    `tested`: the rows the test may flag (the focus). Each image scores its largest over its
    tested copies, -inf where none is tested (`image_scores`): shifted copies are not new
    images, and an unshifted image scores at most its largest copy, so the rank over the n
    images holds for it. The threshold is the ceil((n + 1)(1 - alpha))-th smallest image
    score (the largest when n + 1 < 1 / alpha); the focus needs no level of its own, as an
    image never sent to the focus class can never be flagged.
    """
    if not 0.0 < alpha < 0.5:
        raise ParameterError("alpha", f"must be in (0, 0.5), got {alpha}")
    tested = np.asarray(tested, dtype=bool)
    rows = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(rows[tested]).all():
        raise MmexportError("clean scores hold NaN or Inf: the model's logits are not finite on D")
    per_image = image_scores(rows, images, tested)
    reached = int(np.isfinite(per_image).sum())
    if reached < 2:
        raise MmexportError(f"{reached} of D's images are tested: need at least 2 to fit the null")
    rank = min(math.ceil((images + 1) * (1 - alpha)), images)
    thr = float(np.sort(per_image)[rank - 1])
    if not np.isfinite(thr):  # alpha leaves room to flag every tested image: flag none below them
        thr = float(per_image[np.isfinite(per_image)].min())
    # The graph compares in float32: the threshold is that float32 number.
    thr = float(np.float32(max(thr, floor)))
    return NullFit(law="conformal", alpha=alpha, threshold=thr, fpr=float(np.mean(rows[tested] > thr)),
                   n=images, params={"unit": "image", "rank": rank, "guarantee": max(alpha, 1 / (images + 1)),
                                     "tested_images": reached})
