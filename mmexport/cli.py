"""The `mmexport` command: a thin shell over the Python API (parse, call, print)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import MmexportError


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


class _Group(click.Group):
    """Turns MmexportError into one line on stderr and exit 1: never a traceback for bad input."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MmexportError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)


def _range(_ctx, _param, value):
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected LO,HI (e.g. 0,1), got {value!r}") from None
    if not lo < hi:
        raise click.BadParameter(f"LO must be below HI, got {value!r}")
    return lo, hi


def _avoid(_ctx, _param, value):
    if value == "none":
        return None
    if value == "scan":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected scan, none or a class number, got {value!r}") from None


def _print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=float))


def _write_outputs(result, out: Path, bounds_path, report_path, *, force: bool, inputs) -> dict:
    """Write the model, its bounds file and the full report (each atomically); returns the paths."""
    from .model import atomic_write_bytes, save_model

    save_model(result.model, out, force=force, inputs=inputs)
    written = {"model": str(out)}
    if bounds_path is not None:
        atomic_write_bytes(bounds_path, result.bounds.dumps().encode())
        written["bounds"] = str(bounds_path)
    if report_path is not None:
        atomic_write_bytes(report_path, json.dumps(result.report, indent=1).encode())
        written["report"] = str(report_path)
    return written


def model_options(f):
    f = click.option("--output", "output_name", metavar="NAME", help="Logits output (when the graph has several).")(f)
    f = click.option("--input", "input_name", metavar="NAME", help="Model input (when the graph has several).")(f)
    return f


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmexport")
def main():
    """Harden ONNX classifiers against backdoors and overfitting.

    Maximum-margin activation clipping (Wang, Miller, Kesidis, arXiv 2309.16827): put an
    upper bound on every ReLU output, chosen on a small clean labelled set so the model's
    largest classification margins shrink while its clean predictions stay put. The bounds
    are written into the ONNX graph, which then runs in plain onnxruntime.
    """


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--verify", is_flag=True, help="Run our engine and onnxruntime on the same random inputs and compare.")
@click.option("--input-range", callback=_range, default="0,1", show_default=True, metavar="LO,HI",
              help="Range of the random inputs for --verify.")
@click.option("--atol", default=1e-4, show_default=True, help="Absolute tolerance for --verify.")
@click.option("--rtol", default=1e-3, show_default=True, help="Relative tolerance for --verify.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="onnxruntime provider for --verify.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@model_options
def inspect(model, verify, input_range, atol, rtol, provider, as_json, input_name, output_name):
    """Show a model's inputs, outputs, opset, classes and clipping sites.

    Sites are every Relu and every Clip with min 0, named by their output tensor. With
    --verify, exit 1 unless the engine matches onnxruntime within the tolerances.
    """
    from .inspect import describe
    from .inspect import verify as run_verify
    from .model import load_model

    m = load_model(model, input_name=input_name, output_name=output_name)
    info = describe(m)
    if verify:
        if info["unsupported_ops"]:
            ops = ", ".join(f"{u['op']} (node {u['node']!r})" for u in info["unsupported_ops"])
            raise MmexportError(f"{model}: cannot verify, unsupported ops: {ops}")
        info["verify"] = run_verify(m, input_range=input_range, atol=atol, rtol=rtol, provider=provider)
    if as_json:
        _print_json(info)
    else:
        from .report import print_inspect

        print_inspect(info)
    if verify and not info["verify"]["passed"]:
        sys.exit(1)


def _search_options(f):
    opts = [
        click.option("--seed", default=0, show_default=True, help="Seed: same seed, same bounds (on CPU)."),
        click.option("--reduction", type=click.Choice(["mean", "max", "excess", "softmax"]), default=None,
                     help="How per-class max margins combine into the objective [default: max]."),
        click.option("--lambda0", type=float, default=None, help="Starting weight of the margin term."),
        click.option("--maximisers", type=click.Choice(["universal", "points", "both", "masked", "universal+masked"]),
                     default=None,
                     help="Where margins are maximised: one norm-bounded perturbation per class shared by "
                          "the clean images (universal), free points in the input box (points, the paper's "
                          "choice), both of those, one stamped pattern of bounded area per class (masked), or "
                          "universal and masked together [default: universal+masked]."),
        click.option("--budget", type=float, default=None,
                     help="L2 radius of the universal perturbations, as a fraction of the input box's norm "
                          "[default: 0.2]."),
        click.option("--mask-area", type=float, default=None,
                     help="Largest area of the masked maximisers' patterns, as a fraction of the image "
                          "[default: 0.05]; the pattern concentrates on a patch of about that size."),
        click.option("--unlearn", type=click.Choice(["auto", "off"]), default=None,
                     help="MMAC: first look for a stamped trigger on the original model (one pattern of "
                          "--mask-area per class); if one class's stamp stands out, fit the bounds to send "
                          "D's stamped images back to their labels instead of the max-margin search "
                          "(auto), or always run the max-margin search alone (off) [default: auto]."),
        click.option("--acc-floor", type=float, default=None,
                     help="Fraction of the clean set's originally-correct samples that must stay correct "
                          "(checked on D and its 1-pixel shifts) [default: 0.98]."),
        click.option("--max-epochs", type=int, default=None,
                     help="Upper limit on bound-update epochs [default: 150; mmom: 60]."),
        click.option("--steps", type=int, default=None, help="Ascent steps per epoch on the maximisers [default: 5]."),
        click.option("--restarts", type=int, default=None,
                     help="Ascent points (universal: clean images per class) [default: 10]."),
    ]
    for opt in opts:
        f = opt(f)
    return f


def _overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Clean labelled set D (.npz with x, y): tens of images per class.")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output model [default: <model>.<method>.onnx beside the input].")
@click.option("--method", type=click.Choice(["mmac", "mmom", "mmom-refit"]), default="mmac", show_default=True,
              help="mmac: keep D's logits (backdoors); mmom: cross-entropy on D (imbalance, over-training); "
                   "mmom-refit: MMOM, then the last linear layer re-fitted on D (long-tailed models).")
@click.option("--granularity", type=click.Choice(["channel", "layer"]), default="channel", show_default=True,
              help="One bound per channel, or one per site.")
@click.option("--form", type=click.Choice(["auto", "fold", "min"]), default="auto", show_default=True,
              help="auto/fold: fold per-channel bounds into the weights where exact (a fused unit clip), "
                   "Min elsewhere; min: always a Min node after the site.")
@_search_options
@click.option("--input-range", callback=_range, default=None, metavar="LO,HI",
              help="Valid input range for the margin search [default: per-channel min/max of D].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the full report (settings, history) as JSON.")
@click.option("--no-bounds-file", is_flag=True, help="Do not write <out>.bounds.json.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@model_options
def harden(model, data, out, method, granularity, form, seed, reduction, budget, mask_area, maximisers, lambda0,
           unlearn, acc_floor, max_epochs, steps, restarts, input_range, device, report_path, no_bounds_file, force,
           as_json, quiet, input_name, output_name):
    """Search bounds on a clean set and write a hardened ONNX model.

    The model keeps its input/output names, opset and IR version: a drop-in replacement.
    Settings and provenance are stored in its metadata_props; the bounds also go to
    <out>.bounds.json (keyed by site tensor name).
    """
    from .model import check_output_path
    from .pipeline import default_output
    from .pipeline import harden as run_harden

    out = out or default_output(model, method)
    bounds_path = None if no_bounds_file else out.with_name(out.name + ".bounds.json")
    for p in (out, bounds_path, report_path):
        if p is not None:
            check_output_path(p, force=force, inputs=(model, data))
    overrides = _overrides(seed=seed, reduction=reduction, budget=budget, mask_area=mask_area,
                           maximisers=maximisers, lambda0=lambda0, unlearn=unlearn, acc_floor=acc_floor,
                           max_epochs=max_epochs, steps=steps, restarts=restarts)
    with _progress(quiet, method) as progress:
        result = run_harden(model, data, method=method, granularity=granularity, form=form, input_range=input_range,
                            device=device, input_name=input_name, output_name=output_name,
                            progress=progress, **overrides)
    written = _write_outputs(result, out, bounds_path, report_path, force=force, inputs=(model, data))
    summary = {k: v for k, v in result.report.items() if k != "history"} | {"written": written}
    if as_json:
        _print_json(summary)
    else:
        from .report import print_harden

        print_harden(summary)


class _stages:
    """A rich progress bar over named stages (compare) or search steps (scan); None when quiet."""

    transient = True

    def __init__(self, quiet: bool, title: str):
        self.quiet = quiet
        self.title = title

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                           TimeElapsedColumn(), console=_console(), transient=self.transient)
        self._p.__enter__()
        self._task = self._p.add_task(self.title, total=None, info="")
        return self._update

    def _update(self, info: str, done: int | None = None, total: int | None = None) -> None:
        self._p.update(self._task, info=info, completed=done, total=total)

    def __exit__(self, *exc):
        if not self.quiet:
            self._p.__exit__(*exc)
        return False


class _progress(_stages):
    """One line per accuracy check of the bound search: epoch, lambda, accuracy on D, objective."""

    transient = False

    def __init__(self, quiet: bool, method: str):
        super().__init__(quiet, method.upper())

    def _update(self, row: dict) -> None:
        if "cv" in row:
            cv = row["cv"]
            self._p.console.print(f"cross-validation: lambda {cv['lambda']:g} -> held-out balanced "
                                  f"accuracy {cv['balanced_accuracy']:.3f}")
            return
        if "stamp" in row:
            st = row["stamp"]
            verdict = "unlearning it" if st["found"] else "below the gate: max-margin search"
            self._p.console.print(f"stamp search: class {st['target']} stands out by {st['outlier']:.1f} "
                                  f"(sends {100 * st['fooled'][st['target']]:.0f}% of D's other classes to it); "
                                  f"{verdict}")
            return
        if row.get("phase") == "unlearn":
            info = (f"epoch {row['epoch']}  weight {row['lambda']:.3g}  acc(D) {row['accuracy']:.3f}  "
                    f"stamped held-out to class {100 * row['objective']:.1f}%")
        else:
            info = (f"epoch {row['epoch']}  lambda {row['lambda']:.3g}  acc(D) {row['accuracy']:.3f}  "
                    f"margin objective {row['objective']:.2f}")
        super()._update(info, row["epoch"], row.get("max_epochs"))


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("bounds", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output model.")
@click.option("--form", type=click.Choice(["auto", "fold", "min"]), default="auto", show_default=True,
              help="auto/fold: fold per-channel bounds into the weights where exact; min: Min nodes.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@model_options
def apply(model, bounds, out, form, force, input_name, output_name):
    """Write BOUNDS (a .bounds.json) into MODEL: the graph rewrite alone, no search."""
    from .bounds import load_bounds
    from .model import check_output_path, load_model, save_model, set_metadata
    from .rewrite import apply_bounds

    check_output_path(out, force=force, inputs=(model, bounds))
    m = load_model(model, input_name=input_name, output_name=output_name)
    b = load_bounds(bounds)
    proto, forms = apply_bounds(m.proto, b, sites=m.sites, form=form, report=True)
    set_metadata(proto, {"mmexport.version": __version__, "mmexport.bounds_from": str(bounds)})
    save_model(proto, out, force=force, inputs=(model, bounds))
    for line in forms.lines():
        click.echo(line)
    click.echo(f"wrote {out} ({len(b)} bounded sites, {b.granularity} bounds)")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Test set (.npz: x, y).")
@click.option("--attack", type=click.Path(dir_okay=False, path_type=Path),
              help="Triggered set (.npz: x, y = target, y_true) for ASR and RA.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--batch-size", default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@model_options
def validate(model, data, attack, provider, batch_size, as_json, input_name, output_name):
    """Measure accuracy, per-class accuracy, ASR and RA under onnxruntime."""
    from .data import load_npz
    from .runtime import validate as run_validate

    test = load_npz(data)
    att = load_npz(attack, attack=True) if attack else None
    rep = run_validate(model, test, attack=att, provider=provider, batch_size=batch_size,
                       input_name=input_name, output_name=output_name)
    if as_json:
        _print_json(rep.to_json())
    else:
        from .report import print_validation

        print_validation(rep, title=str(model))


def _check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MmexportError("--plot needs matplotlib: pip install 'mmexport[plot]'") from None


@main.command()
@click.argument("pre", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("post", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Test set (.npz: x, y).")
@click.option("--attack", type=click.Path(dir_okay=False, path_type=Path),
              help="Triggered set (.npz: x, y = target, y_true) for ASR and RA.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True,
              help="onnxruntime provider; both models run on the one PRE gets.")
@click.option("--seed", default=0, show_default=True, help="Seed of the max-margin search (the same for both).")
@click.option("--restarts", default=10, show_default=True, help="Max-margin ascent starts per class.")
@click.option("--steps", default=200, show_default=True, help="Max-margin ascent steps.")
@click.option("--no-margins", is_flag=True, help="Skip the max-margin search (no torch needed).")
@click.option("--input-range", callback=_range, default=None, metavar="LO,HI",
              help="Input box of the margin search [default: per-channel min/max of --data].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Torch device of the margin search.")
@click.option("--runs", default=100, show_default=True, help="Timed runs per model and batch size (1 and 64).")
@click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the comparison as a Markdown file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw per-class max margins and accuracy, PRE vs POST (needs mmexport[plot]).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@model_options
def compare(pre, post, data, attack, provider, seed, restarts, steps, no_margins, input_range, device, runs,
            markdown_path, plot_path, force, as_json, quiet, input_name, output_name):
    """Compare a model (PRE) with its hardened version (POST) side by side.

    Both run under onnxruntime on the same provider: accuracy, balanced and per-class
    accuracy, ASR and RA, prediction agreement and max abs logit difference, latency
    (median, p95, ratio) at batch 1 and 64, file size, node types and bounded sites; and
    per-class max margins from the engine's search with the same seed. Ends with one
    verdict per metric: better, same or worse.
    """
    from .comparison import compare as run_compare
    from .comparison import plot, to_markdown
    from .data import load_npz
    from .model import atomic_write_bytes, check_output_path

    inputs = (pre, post, data, attack)
    for p in (markdown_path, plot_path):
        if p is not None:
            check_output_path(p, force=force, inputs=inputs)
    if plot_path is not None:
        _check_plot_available()
    if restarts < 1 or steps < 0 or runs < 1:
        raise MmexportError("--restarts and --runs must be >= 1, --steps >= 0")
    test = load_npz(data)
    att = load_npz(attack, attack=True) if attack else None
    with _stages(quiet, "compare") as progress:
        rep = run_compare(pre, post, test, attack=att, provider=provider, seed=seed, restarts=restarts,
                          steps=steps, runs=runs, margins=not no_margins, input_range=input_range,
                          device=device, input_name=input_name, output_name=output_name, progress=progress)
    if markdown_path is not None:
        atomic_write_bytes(markdown_path, to_markdown(rep).encode())
    if plot_path is not None:
        plot(rep, plot_path)
    if as_json:
        _print_json(rep.to_json())
    else:
        from .report import print_compare

        print_compare(rep)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Clean labelled set D (.npz with x, y): calibrates the threshold (and the bounds).")
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Output model [default: <model>.mmdf.onnx beside the input].")
@click.option("--bounds", "bounds_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Use these bounds (.bounds.json) instead of computing them.")
@click.option("--hardened", type=click.Path(dir_okay=False, path_type=Path),
              help="Use the bounds of this model, hardened by mmexport from MODEL.")
@click.option("--method", type=click.Choice(["clean-max", "mmac"]), default="clean-max", show_default=True,
              help="Bounds computed on D: clean-max (each channel's clean range endpoint, null "
                   "cross-fitted) or mmac (the harden search; the search options apply).")
@click.option("--statistic", type=click.Choice(["margin+features", "margin"]), default="margin+features",
              show_default=True,
              help="margin: the paper's test (the margin gap d). margin+features: also flag inputs whose "
                   "per-site channel means, spreads and skews lie far from their predicted class on D "
                   "(class-conditional Gaussian, cross-fitted); catches triggers that stay inside the "
                   "clean range "
                   "(blends, global patterns). alpha is split between the two tests.")
@click.option("--alpha", type=float, default=0.005, show_default=True,
              help="Target false-positive rate on clean inputs (significance of the test).")
@click.option("--null", "law", type=click.Choice(["conformal", "exponential-tail", "gaussian"]),
              default="conformal", show_default=True,
              help="Law of d on clean data: conformal quantile, exponential tail, or Gaussian (the paper's).")
@click.option("--folds", default=10, show_default=True,
              help="Cross-fitting folds of the calibration scores (clean-max margin gap and feature test).")
@click.option("--no-augment", is_flag=True, help="Calibrate on D alone, without its 1-pixel shifts.")
@click.option("--avoid", default="scan", show_default=True, callback=_avoid, metavar="scan|none|CLASS",
              help="A class flagged inputs are never sent to. scan: the suspected backdoor target of the "
                   "MM-BD scan on D (as `mmexport scan`), if it finds one; none; or a class number.")
@click.option("--focus/--no-focus", default=True, show_default=True,
              help="Where --avoid names a class, test only inputs the model sends to it (a working "
                   "trigger does), thresholds set on D's inputs sent to it so that the false-positive "
                   "rate over all clean inputs stays --alpha. --no-focus tests every input.")
@_search_options
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Torch device of the mmac search.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="cpu", show_default=True,
              help="onnxruntime provider that computes d for the calibration.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the full report as JSON.")
@click.option("--no-bounds-file", is_flag=True, help="Do not write <out>.bounds.json.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@model_options
def detect(model, data, out, bounds_path, hardened, method, statistic, alpha, law, folds, no_augment, avoid, focus,
           seed, reduction, budget, mask_area, maximisers, lambda0, unlearn, acc_floor, max_epochs, steps, restarts,
           device, provider, report_path, no_bounds_file, force, as_json, quiet, input_name, output_name):
    """Write an MMDF model: test-time backdoor detection and fix in one ONNX graph.

    The graph runs MODEL and a bounded copy of it on the same weights and computes d, the
    margin the bounds take from the predicted class; d above a threshold calibrated on D
    (false-positive rate --alpha) flags the input; by default an input is also flagged
    when its activations lie far from its predicted class on D (--statistic). Outputs: the
    original logits name (for a flagged input, the bounded logits with the predicted class
    suppressed, and never the suspected backdoor target: --avoid), mmdf_detected (bool [N]),
    mmdf_score (d minus its threshold, float [N])
    and, with the feature test, mmdf_feature_score (feature score minus its threshold;
    with --focus, every input is scored against the focus class).
    """
    from .mmdf import detect as run_detect
    from .model import check_output_path

    out = out or model.with_name(f"{model.stem}.mmdf.onnx")
    bounds_out = None if no_bounds_file else out.with_name(out.name + ".bounds.json")
    inputs = (model, data, bounds_path, hardened)
    for p in (out, bounds_out, report_path):
        if p is not None:
            check_output_path(p, force=force, inputs=inputs)
    search = _overrides(reduction=reduction, budget=budget, mask_area=mask_area, maximisers=maximisers,
                        lambda0=lambda0, unlearn=unlearn, acc_floor=acc_floor, max_epochs=max_epochs, steps=steps,
                        restarts=restarts)
    with _progress(quiet, "mmac") as bar:
        def progress(row):
            if "stage" in row:
                _console().print(f"{row['stage']}: {row['n']} inputs")
            else:
                bar(row)

        result = run_detect(model, data, bounds=bounds_path, hardened=hardened, method=method,
                            statistic=statistic, alpha=alpha,
                            law=law, folds=folds, augment=not no_augment, seed=seed, device=device, avoid=avoid,
                            focus=focus,
                            provider=provider, input_name=input_name, output_name=output_name,
                            progress=progress if bar is not None else None, **search)
    written = _write_outputs(result, out, bounds_out, report_path, force=force, inputs=inputs)
    summary = result.report | {"written": written}
    if as_json:
        _print_json(summary)
    else:
        from .report import print_detect

        print_detect(summary)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", "data", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Clean labelled set D (.npz with x, y), every class present.")
@click.option("--alpha", default=0.05, show_default=True, help="Significance level of the test.")
@click.option("--seed", default=0, show_default=True, help="Seed of the searches: same seed, same result (on CPU).")
@click.option("--restarts", type=int, default=None, help="Max-margin ascent starts per class [default: 10].")
@click.option("--steps", type=int, default=None, help="Max-margin ascent steps [default: 200].")
@click.option("--input-range", callback=_range, default=None, metavar="LO,HI",
              help="Valid input range for the searches [default: per-channel min/max of D].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the full result as JSON.")
@click.option("--force", is_flag=True, help="Overwrite an existing --report file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@model_options
def scan(model, data, alpha, seed, restarts, steps, input_range, device, report_path, force, as_json, quiet,
         input_name, output_name):
    """Detect a backdoor without its trigger (MM-BD) from a small clean set.

    Estimates every class's maximum margin, and the margin a small shared perturbation
    buys toward each class from D's other classes; the largest of each is tested against
    a gamma null fitted on the other classes. Verdict `backdoor` (with the target class)
    when the combined p-value is below --alpha, else `clean`. JSON keys: verdict,
    target_class, p_value, max_margins, tests, ...
    """
    from .model import atomic_write_bytes, check_output_path
    from .search.scan import scan as run_scan

    if report_path is not None:
        check_output_path(report_path, force=force, inputs=(model, data))
    overrides = _overrides(alpha=alpha, seed=seed, restarts=restarts, steps=steps)
    with _stages(quiet, "scan") as progress:
        result = run_scan(model, data, input_range=input_range, device=device, input_name=input_name,
                          output_name=output_name, progress=progress, **overrides)
    out = result.to_json()
    if report_path is not None:
        atomic_write_bytes(report_path, json.dumps(out, indent=1).encode())
    if as_json:
        _print_json(out)
    else:
        from .report import print_scan

        print_scan(out)


if __name__ == "__main__":  # pragma: no cover
    main()
