"""Feature statistics for MMDF: how far an input's site activations lie from its class on D.

The margin gap of MMDF sees a trigger only where it drives channels past their clean range.
Triggers that stay inside it (a blended image, a global chessboard) still move the
*pattern* of activations: measured on the sample zoo, the per-channel means, spreads and
skews of every site of a triggered input lie far from those of clean inputs of the class it
is sent to. This is the class-conditional Gaussian score of Lee et al. (2018, "A simple
unified framework for detecting out-of-distribution samples and adversarial attacks"), per
site:

    s(x) = (f(x) - mu_c^)^T S^-1 (f(x) - mu_c^),

f = the site's channel statistics ([3C]: each channel's mean, standard deviation and
cube-rooted third central moment over its spatial axes; [C] values where it has none),
c^ = the original model's prediction, mu_c = the mean of f over the clean images of class
c, S = their pooled within-class covariance shrunk towards its mean variance (D holds tens
of images per class). S^-1 is kept as its `rank` leading eigen-directions plus the mean
variance of the rest, so a site costs 3C x rank numbers in the graph, not (3C)^2. Each
site's score is divided by its `SCALE_QUANTILE` quantile on D, and the feature score is the
largest over sites.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from ...core.errors import MmexportError

# Shrinkage of the within-class covariance towards its mean variance, its rank in the graph,
# and the quantile of the cross-fitted clean scores each site is divided by.
SHRINK = 0.1
RANK = 16
SCALE_QUANTILE = 0.9
# The basis is orthonormal, its entries in [-1, 1]: half precision (3 significant digits)
# halves the largest part of the feature test in the file and moves scores by < 0.1%.
BASIS_DTYPE = np.float16


@dataclass(frozen=True)
class SiteGauss:
    """The class-conditional Gaussian of one site's channel statistics.

    means [K, C]; basis [C, r] orthonormal; inv_var [r] on the basis; inv_tail: 1 / the mean
    variance off the basis; scale: what the score is divided by.
    """

    site: str
    means: np.ndarray
    basis: np.ndarray
    inv_var: np.ndarray
    inv_tail: float
    scale: float = 1.0

    def score(self, f: np.ndarray, c: np.ndarray) -> np.ndarray:
        d = np.asarray(f, np.float64) - self.means[c]
        proj = d @ self.basis
        rest = d - proj @ self.basis.T
        return ((proj**2) @ self.inv_var + (rest**2).sum(1) * self.inv_tail) / self.scale

    def to_json(self) -> dict:
        return {"site": self.site, "channels": int(self.means.shape[1]),
                "rank": int(self.basis.shape[1]), "scale": self.scale}


def channel_stats(a: np.ndarray, axis: int = 1) -> np.ndarray:
    """[N, C, ...] -> [N, 3C]: each channel's mean, spatial standard deviation and the cube
    root of its third central moment over its trailing axes; [N, C] (no spatial axes) comes
    back as it is. `axis`: where the channels are (-1 for a transformer's [N, T, C]).

    The shape matters: a blended trigger leaves the channel means of the first conv near a
    clean image's but changes how unevenly, and how lopsidedly, each channel fires across the
    image.
    """
    a = np.asarray(a)
    if a.ndim <= 2:
        return a
    a = np.moveaxis(a, axis, 1)  # a token tensor's channels are its last axis
    f = a.reshape(a.shape[0], a.shape[1], -1).astype(np.float64)
    mean = f.mean(axis=2)
    centred = f - mean[:, :, None]
    squared = centred * centred
    std = np.sqrt(squared.mean(axis=2))
    return np.concatenate([mean, std, np.cbrt((squared * centred).mean(axis=2))], axis=1)


def fit_site(site: str, f: np.ndarray, y: np.ndarray, k: int, *, rank: int = RANK,
             shrink: float = SHRINK) -> SiteGauss:
    """The Gaussian of features f [N, C] with labels y in [0, k)."""
    f = np.asarray(f, np.float64)
    overall = f.mean(axis=0)
    means = np.stack([f[y == c].mean(axis=0) if np.any(y == c) else overall for c in range(k)])
    r = f - means[y]
    cov = r.T @ r / len(f)
    mean_var = float(np.trace(cov)) / cov.shape[0]
    cov = (1 - shrink) * cov + shrink * max(mean_var, 1e-12) * np.eye(cov.shape[0])
    values, vectors = np.linalg.eigh(cov)
    values, vectors = values[::-1], vectors[:, ::-1]
    keep = min(rank, len(values))
    tail = float(values[keep:].mean()) if keep < len(values) else float(values[-1])
    # The graph stores the basis in half precision; scoring with the rounded basis here too
    # keeps the thresholds set on D those of the graph.
    basis = vectors[:, :keep].astype(BASIS_DTYPE).astype(np.float64)
    return SiteGauss(site, means, np.ascontiguousarray(basis), 1.0 / values[:keep],
                     1.0 / max(tail, 1e-30))


@dataclass(frozen=True)
class FeatureFit:
    """Every site's Gaussian (fitted on all of D) and the cross-fitted clean scores."""

    sites: list[SiteGauss]
    null: np.ndarray  # the feature score (max over sites) of each D image, cross-fitted


def fit_features(feats: dict[str, np.ndarray], y: np.ndarray, predicted: np.ndarray, k: int,
                 folds: np.ndarray, *, rank: int = RANK, shrink: float = SHRINK) -> FeatureFit:
    """Fit per-site Gaussians on D and score every D image with those of the other folds.

    `feats`: {site: [N, F]} channel statistics on D; `y` its labels; `predicted` the original
    model's classes on D (what the graph conditions on); `folds`: a fold number per image.
    """
    if not feats:
        raise MmexportError("MMDF features: no site with a known channel axis")
    fitted, normalised = [], []
    for site, f in feats.items():
        null = np.empty(len(y))
        for j in np.unique(folds):
            out = folds == j
            g = fit_site(site, f[~out], y[~out], k, rank=rank, shrink=shrink)
            null[out] = g.score(f[out], predicted[out])
        scale = float(np.quantile(null, SCALE_QUANTILE))
        if not np.isfinite(scale) or scale <= 0:
            scale = 1.0
        g = fit_site(site, f, y, k, rank=rank, shrink=shrink)
        fitted.append(SiteGauss(g.site, g.means, g.basis, g.inv_var, g.inv_tail, scale))
        normalised.append(null / scale)
    return FeatureFit(fitted, np.max(normalised, axis=0))


# --------------------------------------------------------------------------- the graph


def write_feature_score(graph, site_tensors: dict, ranks: dict, predicted, fit: FeatureFit, dtype,
                        opset, node, var, const, *, focus: int | None = None):
    """Append the feature score (max over sites of s / scale) as a [N, 1] tensor.

    `site_tensors`: {site: gs tensor of the original branch, channels on axis 1}; `ranks`:
    {site: its rank}; `predicted`: [N] int64 classes; `focus`: where only inputs sent to one
    class can be flagged, every input is scored against that class and only its means are
    stored (a tenth of them for ten classes).
    `node`, `var`, `const` build nodes, tensors and initializers with MMDF's names.

    Per site only its moments (three pools) and its projection and rest run; the roots, the
    class means, the weighting and the max run once on all sites' statistics side by side: at
    batch 1 a node costs about as much as its arithmetic on most sites.
    """
    def reduce(op, x, name):
        out = var(name)
        if opset >= 18 or (op == "ReduceSum" and opset >= 13):
            return node(op, [x, const(name + "/axes", np.array([1], np.int64))], [out], keepdims=1)
        return node(op, [x], [out], axes=[1], keepdims=1)

    def concat(parts, name):
        return parts[0] if len(parts) == 1 else node("Concat", parts, [var(name)], axis=1)

    def split(x, sizes, names):
        """x cut along axis 1 into `sizes` (an attribute before opset 13, an input from it)."""
        outs = [var(n) for n in names]
        if opset >= 13:
            node("Split", [x, const(names[0] + "/sizes", np.array(sizes, np.int64))], outs, axis=1)
        else:
            node("Split", [x], outs, axis=1, split=list(sizes))
        return outs

    def on_all(parts, sizes, name, fn):
        """fn applied once to the parts side by side, handed back cut as they came."""
        if len(parts) == 1:
            return [fn(parts[0])]
        return split(fn(concat(parts, f"features/{name}_in")), sizes,
                     [f"features/{name}{j}" for j in range(len(parts))])

    def std(x):
        return node("Sqrt", [x], [var("features/std")])

    def cube_root(x):  # of a third central moment, which may be negative
        root = node("Pow", [node("Abs", [x], [var("features/m3_abs")]),
                            const("features/third", np.array(1.0 / 3.0, dtype))], [var("features/m3_root")])
        return node("Mul", [node("Sign", [x], [var("features/m3_sign")]), root], [var("features/skew")])

    # Each site's [mean, variance, third central moment] per channel (or its values where it
    # has no spatial axes), grouped by rank so that one Concat per rank joins them.
    groups: dict[int, list] = {}
    for i, g in enumerate(fit.sites):
        tag = f"f{i}"  # short names: a site name can be long
        t = site_tensors[g.site]
        if ranks[g.site] == 2:
            groups.setdefault(2, []).append((i, [t]))
            continue
        mean = node("GlobalAveragePool", [t], [var(tag + "/mean")])
        centred = node("Sub", [t, mean], [var(tag + "/centred")])
        squared = node("Mul", [centred, centred], [var(tag + "/d2")])
        variance = node("GlobalAveragePool", [squared], [var(tag + "/var")])
        m3 = node("GlobalAveragePool", [node("Mul", [squared, centred], [var(tag + "/d3")])],
                  [var(tag + "/m3")])
        groups.setdefault(ranks[g.site], []).append((i, [mean, variance, m3]))
    # Spatial sites' features are [mean, std, cube root of the third moment] (`channel_stats`);
    # the roots run on the variances and third moments only, each kind once for all sites.
    order, columns = [], []
    for rank, members in sorted(groups.items()):
        order += [i for i, _ in members]
        if rank == 2:
            parts = [ts[0] for _, ts in members]
        else:
            sizes = [fit.sites[i].means.shape[1] // 3 for i, _ in members]
            stds = on_all([ts[1] for _, ts in members], sizes, f"std{rank}_", std)
            skews = on_all([ts[2] for _, ts in members], sizes, f"skew{rank}_", cube_root)
            parts = [t for (_, ts), a, b in zip(members, stds, skews, strict=True) for t in (ts[0], a, b)]
        stats = concat(parts, f"features/stats{rank}")
        columns.append(stats if rank == 2 else
                       node("Flatten", [stats], [var(f"features/stats{rank}/flat")], axis=1))
    f = concat(columns, "features/stats")
    sites = [fit.sites[i] for i in order]

    means = np.concatenate([g.means for g in sites], axis=1)
    if focus is None:
        mu = node("Gather", [const("features/class_means", means.astype(dtype)), predicted],
                  [var("features/mu")], axis=0)
    else:
        mu = const("features/focus_means", means[focus : focus + 1].astype(dtype))
    d = node("Sub", [f, mu], [var("features/d")])
    pieces = [d] if len(sites) == 1 else split(d, [g.means.shape[1] for g in sites], [f"f{i}/d" for i in order])

    projections, rests = [], []
    for i, g, piece in zip(order, sites, pieces, strict=True):
        tag = f"f{i}"
        basis = const(tag + "/basis", g.basis.astype(BASIS_DTYPE))
        if np.dtype(dtype) != np.dtype(BASIS_DTYPE):
            basis = node("Cast", [basis], [var(tag + "/basis_cast")],
                         to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
        proj = node("MatMul", [piece, basis], [var(tag + "/proj")])
        no_bias = [] if opset >= 11 else [const(tag + "/no_bias", np.zeros(1, dtype))]  # C optional from 11
        back = node("Gemm", [proj, basis, *no_bias], [var(tag + "/back")], transB=1)
        rest = node("Sub", [piece, back], [var(tag + "/rest")])
        projections.append(proj)
        rests.append(reduce("ReduceSumSquare", rest, tag + "/rest2"))

    # [sum of ranks, sites]: site j's squared projections, weighted, summed into column j.
    weights = np.zeros((sum(g.basis.shape[1] for g in sites), len(sites)), dtype)
    row = 0
    for j, g in enumerate(sites):
        weights[row : row + len(g.inv_var), j] = g.inv_var / g.scale
        row += len(g.inv_var)
    inv_tail = np.array([[g.inv_tail / g.scale for g in sites]], dtype)

    proj = concat(projections, "features/proj")
    on = node("MatMul", [node("Mul", [proj, proj], [var("features/proj2")]),
                         const("features/inv_var", weights)], [var("features/on_basis")])
    off = node("Mul", [concat(rests, "features/rest2"), const("features/inv_tail", inv_tail)],
               [var("features/off_basis")])
    scores = node("Add", [on, off], [var("features/site_scores")])
    return scores if len(sites) == 1 else reduce("ReduceMax", scores, "features/score")


def site_feature_arrays(proto: onnx.ModelProto, sites, x: np.ndarray, *, input_name: str,
                        output_name: str, provider: str = "cpu",
                        batch_size: int = 256) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({site: [N, F] channel statistics}, logits [N, K]) of x, run by onnxruntime; sites without
    a known channel axis are left out."""
    from ...runtime.sessions import tensor_summaries

    use = [s.name for s in sites if s.channels is not None and (s.rank or 0) >= 2]
    axes = {s.name: s.axis for s in sites}
    out = tensor_summaries(proto, [output_name, *use], x,
                           lambda n, a: a if n == output_name else channel_stats(a, axes[n]),
                           input_name=input_name, provider=provider, batch_size=batch_size)
    logits = out.pop(output_name)
    return out, logits
