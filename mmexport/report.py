"""Human-readable tables for the CLI (rich); JSON output lives in the callers."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

_out = Console(highlight=False)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def print_inspect(info: dict) -> None:
    _out.print(f"[bold]{info['path'] or 'model'}[/]  opset {info['opset']}  IR {info['ir_version']}  "
               f"nodes {info['nodes']}  classes {info['num_classes']}")
    for kind in ("inputs", "outputs"):
        for io in info[kind]:
            mark = " (chosen)" if io["name"] in (info["input"], info["output"]) else ""
            _out.print(f"  {kind[:-1]:6} {io['name']}  {io['shape']}{mark}")
    if info["unsupported_ops"]:
        ops = ", ".join(f"{u['op']} (node {u['node']!r})" for u in info["unsupported_ops"])
        _out.print(f"[red]unsupported ops:[/] {ops}")
    t = Table(title=f"{len(info['sites'])} clipping sites", title_justify="left")
    for col in ("site", "op", "channels"):
        t.add_column(col)
    for s in info["sites"]:
        t.add_row(s["name"], s["op"], str(s["channels"]))
    _out.print(t)
    v = info.get("verify")
    if v:
        for o in v["outputs"]:
            if "error" in o:
                _out.print(f"  verify {o['name']}: [red]{o['error']}[/]")
            else:
                _out.print(f"  verify {o['name']}: max abs diff {o['max_abs_diff']:.3g}, "
                           f"max rel diff {o['max_rel_diff']:.3g}")
        verdict = "[green]PASSED[/]" if v["passed"] else "[red]FAILED[/]"
        _out.print(f"{verdict} engine vs onnxruntime ({v['provider']}, {v['samples']} inputs in "
                   f"{v['input_range']}, atol {v['atol']:g}, rtol {v['rtol']:g})")


def print_harden(summary: dict) -> None:
    mb, ma = summary["max_margins_before"], summary["max_margins_after"]
    t = Table(title="per-class max margin (fresh search)", title_justify="left")
    t.add_column("class")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    for c, (b, a) in enumerate(zip(mb, ma)):
        t.add_row(str(c), f"{b:.2f}", f"{a:.2f}")
    _out.print(t)
    _out.print(f"{summary['method'].upper()}: {summary['sites']} sites bounded, lambda {summary['lambda']:.3g}, "
               f"clean-set accuracy kept {_pct(summary['clean_set_accuracy'])}, {summary['epochs']} epochs, "
               f"{summary['seconds']:.1f} s on {summary['device']}")
    forms = summary.get("site_forms") or {}
    for site in forms.get("sites", []):
        why = f" ({site['reason']})" if site.get("reason") else ""
        _out.print(f"  {site['site']}: {site['form']}{why}")
    for kind, path in summary["written"].items():
        _out.print(f"wrote {kind}: {path}")


def print_validation(rep, *, title: str = "") -> None:
    t = Table(title=f"{title}  ({rep.provider} provider, {rep.images_per_s:.0f} images/s)", title_justify="left")
    t.add_column("class")
    t.add_column("accuracy", justify="right")
    for c, a in enumerate(rep.per_class_accuracy):
        t.add_row(str(c), _pct(a))
    _out.print(t)
    _out.print(f"accuracy {_pct(rep.accuracy)}  balanced {_pct(rep.balanced_accuracy)}  (n={rep.n})")
    if rep.asr is not None:
        _out.print(f"ASR {_pct(rep.asr)}  RA {_pct(rep.ra)}  (n_attack={rep.n_attack})")
    if getattr(rep, "detection_rate", None) is not None:
        _out.print(f"detection {_pct(rep.detection_rate)}  false positives {_pct(rep.false_positive_rate)}")


_VERDICT_STYLE = {"better": "green", "same": "", "worse": "red", "n/a": "dim"}


def print_compare(rep) -> None:
    """PRE vs POST: a summary table, a per-class table, then one verdict line per metric."""
    a, b = rep.pre, rep.post
    va, vb = a.validation, b.validation
    t = Table(title=f"{a.path or 'PRE'} vs {b.path or 'POST'}  ({rep.provider} provider, n={rep.n})",
              title_justify="left")
    for col in ("metric", "PRE", "POST"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    t.add_row("accuracy", _pct(va["accuracy"]), _pct(vb["accuracy"]))
    t.add_row("balanced accuracy", _pct(va["balanced_accuracy"]), _pct(vb["balanced_accuracy"]))
    if va.get("asr") is not None:
        t.add_row("ASR", _pct(va["asr"]), _pct(vb["asr"]))
        t.add_row("RA", _pct(va["ra"]), _pct(vb["ra"]))
    if a.max_margins is not None and b.max_margins is not None:
        t.add_row("largest max margin", f"{max(a.max_margins):.2f}", f"{max(b.max_margins):.2f}")
    for k, la in a.latency.items():
        lb = b.latency.get(k)
        if lb is not None:
            t.add_row(f"latency b{k} median / p95 (ms)", f"{la['median_ms']:.3f} / {la['p95_ms']:.3f}",
                      f"{lb['median_ms']:.3f} / {lb['p95_ms']:.3f}  (x{rep.latency_ratio.get(k, float('nan')):.2f})")
    t.add_row("file size", f"{a.size_bytes:,} B", f"{b.size_bytes:,} B")
    t.add_row("bounded sites", str(a.bounded_sites), str(b.bounded_sites))
    _out.print(t)

    c = Table(title="per class", title_justify="left")
    for col in ("class", "accuracy PRE", "accuracy POST", "max margin PRE", "max margin POST"):
        c.add_column(col, justify="right")
    for k, (x, y) in enumerate(zip(va["per_class_accuracy"], vb["per_class_accuracy"])):
        c.add_row(str(k), _pct(x), _pct(y),
                  f"{a.max_margins[k]:.2f}" if a.max_margins else "-",
                  f"{b.max_margins[k]:.2f}" if b.max_margins else "-")
    _out.print(c)
    ops = ", ".join(f"{op} {d:+d}" for op, d in rep.node_type_diff.items()) or "none"
    _out.print(f"prediction agreement {_pct(rep.agreement)}, max abs logit difference "
               f"{rep.max_abs_logit_diff:.4g}; node types POST - PRE: {ops}")
    if rep.margins_note:
        _out.print(f"[yellow]{rep.margins_note}[/]")
    for metric, v in rep.verdicts.items():
        style = _VERDICT_STYLE.get(v, "")
        shown = f"[{style}]{v}[/]" if style else v
        _out.print(f"{metric}: {shown}")
