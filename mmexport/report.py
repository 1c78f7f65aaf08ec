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
