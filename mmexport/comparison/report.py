"""A comparison as rows, Markdown and a PNG: the terminal table and the files read the same rows."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..core.errors import MmexportError
from . import CompareReport, smallest


def summary_rows(rep: CompareReport) -> list[tuple[str, str, str, str, str]]:
    """(metric key, label, PRE, POST, verdict) as display strings, in reading order.

    The one list both the terminal table and the Markdown file print, so they never disagree.
    """
    a, b = rep.pre, rep.post
    va, vb = a.validation, b.validation
    v = rep.verdicts
    rows = [
        ("accuracy", "accuracy", _pct(va["accuracy"]), _pct(vb["accuracy"])),
        (
            "balanced_accuracy",
            "balanced accuracy",
            _pct(va["balanced_accuracy"]),
            _pct(vb["balanced_accuracy"]),
        ),
        (
            "worst_class_accuracy",
            "worst class accuracy",
            _pct(smallest(va["per_class_accuracy"])),
            _pct(smallest(vb["per_class_accuracy"])),
        ),
    ]
    if va.get("asr") is not None:
        rows += [
            ("asr", "ASR", _pct(va["asr"]), _pct(vb["asr"])),
            ("ra", "RA", _pct(va["ra"]), _pct(vb["ra"])),
        ]
    if a.max_margins is not None and b.max_margins is not None:
        rows.append(
            (
                "max_margin",
                "largest class max margin",
                f"{max(a.max_margins):.2f}",
                f"{max(b.max_margins):.2f}",
            )
        )
    for k, la in a.latency.items():
        lb = b.latency.get(k)
        if lb is not None:
            rows.append(
                (
                    f"latency_b{k}",
                    f"latency batch {k}, median / p95 (ms)",
                    f"{la['median_ms']:.3f} / {la['p95_ms']:.3f}",
                    f"{lb['median_ms']:.3f} / {lb['p95_ms']:.3f} "
                    f"(x{rep.latency_ratio.get(k, float('nan')):.2f})",
                )
            )
    rows.append(("size", "file size (bytes)", f"{a.size_bytes:,}", f"{b.size_bytes:,}"))
    rows.append(("bounded_sites", "bounded sites", str(a.bounded_sites), str(b.bounded_sites)))
    return [(key, label, x, y, v.get(key, "")) for key, label, x, y in rows]


def to_markdown(rep: CompareReport) -> str:
    """The report as a Markdown document: summary table with verdicts, per-class table."""
    a, b = rep.pre, rep.post
    lines = [
        f"# {a.path or 'PRE'} vs {b.path or 'POST'}",
        "",
        f"onnxruntime provider: {rep.provider}; test samples: {rep.n}",
        "",
        "| metric | PRE | POST | verdict |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {label} | {x} | {y} | {v} |" for _, label, x, y, v in summary_rows(rep)]
    lines += [
        "",
        f"Prediction agreement {_pct(rep.agreement)}; "
        f"max abs logit difference {rep.max_abs_logit_diff:.4g}.",
        "Node types, POST minus PRE: "
        + (", ".join(f"{t} {d:+d}" for t, d in rep.node_type_diff.items()) or "none"),
        "",
        "| class | accuracy PRE | accuracy POST | max margin PRE | max margin POST |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {c} | {x} | {y} | {ma} | {mb} |" for c, x, y, ma, mb in per_class_rows(rep)]
    if rep.margins_note:
        lines += ["", rep.margins_note]
    if rep.latency_note:
        lines += ["", rep.latency_note]
    return "\n".join(lines) + "\n"


def per_class_rows(rep: CompareReport) -> list[tuple[str, str, str, str, str]]:
    """(class, accuracy PRE, accuracy POST, max margin PRE, max margin POST) as strings."""
    a, b = rep.pre, rep.post
    rows = []
    for c, (x, y) in enumerate(
        zip(a.validation["per_class_accuracy"], b.validation["per_class_accuracy"], strict=True)
    ):
        ma = f"{a.max_margins[c]:.2f}" if a.max_margins else "-"
        mb = f"{b.max_margins[c]:.2f}" if b.max_margins else "-"
        rows.append((str(c), _pct(x), _pct(y), ma, mb))
    return rows


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def plot(rep: CompareReport, path: str | os.PathLike) -> None:
    """Per-class max margins and per-class accuracy, PRE vs POST, as one PNG (matplotlib).

    Written through a temporary file in the same folder, then renamed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MmexportError("plotting needs matplotlib: pip install 'mmexport[plot]'") from None
    import tempfile

    k = len(rep.pre.validation["per_class_accuracy"])
    classes = np.arange(k)
    w = 0.4
    panels = 2 if rep.pre.max_margins is not None and rep.post.max_margins is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 3.6), squeeze=False)
    ax = axes[0, 0]
    acc = [
        [np.nan if v is None else 100 * v for v in s.validation["per_class_accuracy"]]
        for s in (rep.pre, rep.post)
    ]
    ax.bar(classes - w / 2, acc[0], w, label="PRE")
    ax.bar(classes + w / 2, acc[1], w, label="POST")
    ax.set(
        xlabel="class",
        ylabel="accuracy (%)",
        title="per-class accuracy",
        xticks=classes,
        ylim=(0, 125),
    )
    ax.legend(loc="upper center", ncol=2)
    if panels == 2:
        ax = axes[0, 1]
        ax.bar(classes - w / 2, rep.pre.max_margins, w, label="PRE")
        ax.bar(classes + w / 2, rep.post.max_margins, w, label="POST")
        ax.set(
            xlabel="class",
            ylabel="max margin (logits)",
            title="per-class max margin",
            xticks=classes,
        )
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
