"""The commands: a thin shell over the Python API (parse, call, print)."""

from __future__ import annotations

import json
import sys

import click

from .. import __version__
from ..core.errors import MmexportError
from ..core.launch import leader
from ..defences.mmac.config import MmacConfig
from ..defences.mmbd.scan import ScanConfig
from ..defences.mmdf.config import MmdfConfig
from ..defences.mmom.config import MmomConfig
from ..graph.rewrite import FORMS
from .data import attack_folder_options, data_path_option, preprocess_options, read_sources
from .main import main, print_json, show, write_outputs
from .options import (
    avoid_class,
    config_options,
    device_option,
    input_range,
    layout_option,
    model_io,
    output_flags,
    path_argument,
    path_option,
    provider_option,
    set_only,
    settings_option,
    threads_option,
    time_limit,
)
from .progress import Progress

FORM_HELP = ("auto/fold: fold per-channel bounds into the weights where exact (a fused unit clip), Min "
             "elsewhere; min: always a Min node after the site.")


@main.command()
@path_argument("model")
@click.option("--verify", is_flag=True, help="Run our engine and onnxruntime on the same random inputs and compare.")
@click.option("--input-range", callback=input_range, default="0,1", show_default=True, metavar="LO,HI",
              help="Range of the random inputs for --verify.")
@click.option("--atol", default=1e-4, show_default=True, help="Absolute tolerance for --verify.")
@click.option("--rtol", default=1e-3, show_default=True, help="Relative tolerance for --verify.")
@click.option("--samples", default=16, show_default=True, type=click.IntRange(min=1),
              help="Random inputs for --verify.")
@provider_option("onnxruntime provider for --verify.")
@layout_option
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@model_io
def inspect(model, verify, input_range, atol, rtol, samples, provider, layout, threads, as_json, input_name,
            output_name):
    """Show a model's inputs, outputs, opset, classes and clipping sites.

    Sites are the activations unbounded above (Relu, ReLU6, LeakyRelu, PRelu, ELU, SELU,
    Softplus, HardSwish, SiLU, GELU, Mish, ...), each with its kind, named by their output
    tensor. Also says where the input keeps its channels (NCHW or NHWC), whether its batch is
    fixed, and which tensor holds the logits when the output is a Softmax of them. With
    --verify, exit 1 unless the engine matches onnxruntime within the tolerances (on every
    output, and on the logits behind a Softmax).
    """
    from ..core.model import as_model
    from ..inspection import describe
    from ..inspection import verify as run_verify

    m = as_model(model, input_name=input_name, output_name=output_name)  # an MMDF model: its logits
    info = describe(m, layout=layout)
    if verify:
        if info["unsupported_ops"]:
            ops = ", ".join(f"{u['op']} (node {u['node']!r})" for u in info["unsupported_ops"])
            raise MmexportError(f"{model}: cannot verify, unsupported ops: {ops}")
        info["verify"] = run_verify(m, input_range=input_range, n=samples, atol=atol, rtol=rtol,
                                    provider=provider, threads=threads)
    if as_json:
        print_json(info)
    else:
        from .render import print_inspect

        print_inspect(info)
    if verify and not info["verify"]["passed"]:
        sys.exit(1)


@main.command()
@path_argument("model")
@data_path_option("--data", required=True,
                  help="Clean labelled set D, an .npz (x, y) or an image folder DIR/<class>/*.png: tens of images per "
                       "class.")
@preprocess_options
@path_option("-o", "--out", help="Output model [default: <model>.<method>.onnx beside the input].")
@click.option("--method", type=click.Choice(["mmac", "mmac-ft", "mmom", "mmom-refit"]), default="mmac",
              show_default=True,
              help="mmac: keep D's logits (backdoors); mmac-ft: MMAC, then where a stamp was found the weights "
                   "fine-tuned on D and its triggered copies to unlearn it (changes the weights, not the graph); "
                   "mmom: cross-entropy on D (imbalance, over-training); mmom-refit: MMOM, then the last linear "
                   "layer re-fitted on D (long-tailed models).")
@click.option("--form", type=click.Choice(FORMS), default="auto", show_default=True, help=FORM_HELP)
@config_options(MmacConfig, MmomConfig, callbacks={"time_limit": time_limit}, metavars={"time_limit": "SECONDS|auto"})
@settings_option
@click.option("--input-range", callback=input_range, default=None, metavar="LO,HI",
              help="Valid input range for the margin search [default: per-channel min/max of D].")
@device_option()
@threads_option
@path_option("--report", "report_path", help="Also write the full report (settings, history) as JSON.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Price the model's cost per row and print the schedule a run would use, with its predicted "
                   "time and memory chunk, then stop: nothing is searched or written.")
@click.option("--no-bounds-file", is_flag=True, help="Do not write <out>.bounds.json.")
@output_flags
@model_io
def harden(model, data, preprocess, out, method, form, settings_from, input_range, layout, device, threads,
           report_path, plan_only, no_bounds_file, force, as_json, quiet, input_name, output_name, **settings):
    """Search bounds on a clean set and write a hardened ONNX model.

    The model keeps its input/output names, opset and IR version: a drop-in replacement.
    Settings and provenance are stored in its metadata_props; the bounds also go to
    <out>.bounds.json (keyed by site tensor name). Options left unset take the method's
    defaults (MmacConfig, MmomConfig).
    """
    from ..core.errors import ParameterError
    from ..core.provenance import check_output_paths, default_output
    from ..defences.harden import harden as run_harden

    family = settings_from.pop("method", None)  # --method picks the method; the file must be for it
    if family is not None and family != method.split("-")[0]:
        raise ParameterError("settings_from", f"the settings are {family.upper()}'s; run with --method {family}")
    if plan_only:
        from ..defences.harden import plan

        clean, _ = read_sources(data, preprocess=preprocess, model=model, input_name=input_name,
                                output_name=output_name)
        schedule = plan(model, clean, method=method, device=device, threads=threads, input_name=input_name,
                        output_name=output_name, **(settings_from | set_only(**settings)))
        show(schedule.to_json() | {"settings": schedule.config.to_json()}, as_json, "print_plan")
        return
    out = out or default_output(model, method)
    bounds_path = None if no_bounds_file else out.with_name(out.name + ".bounds.json")
    check_output_paths((out, bounds_path, report_path), force=force, inputs=(model, data))
    clean, _ = read_sources(data, preprocess=preprocess, model=model, input_name=input_name, output_name=output_name)
    with Progress(quiet, method.upper()) as progress:
        result = run_harden(model, clean, method=method, form=form, input_range=input_range, layout=layout,
                            device=device, threads=threads, input_name=input_name, output_name=output_name,
                            progress=progress, **(settings_from | set_only(**settings)))
    if not leader():  # under torchrun rank 0 writes
        return
    summary = write_outputs(result, out, bounds_path, report_path, force=force, inputs=(model, data))
    show(summary, as_json, "print_harden")


@main.command()
@path_argument("model")
@path_argument("bounds")
@path_option("-o", "--out", required=True, help="Output model.")
@click.option("--form", type=click.Choice(FORMS), default="auto", show_default=True, help=FORM_HELP)
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
@model_io
def apply(model, bounds, out, form, force, input_name, output_name):
    """Write BOUNDS (a .bounds.json) into MODEL: the graph rewrite alone, no search."""
    from ..core.bounds import load_bounds
    from ..core.model import load_model, save_model
    from ..core.provenance import check_output_paths, set_metadata
    from ..graph.rewrite import apply_bounds

    check_output_paths((out,), force=force, inputs=(model, bounds))
    m = load_model(model, input_name=input_name, output_name=output_name)
    b = load_bounds(bounds)
    unranked = {s.name for s in m.sites if s.rank is None}
    if any(k in unranked and v.ndim == 1 for k, v in b.items()):  # one run tells the ranks
        from ..defences.common.checks import with_site_shapes
        from ..inspection import random_inputs

        m = with_site_shapes(m, random_inputs(m, 1, (0.0, 1.0), 0))
    proto, forms = apply_bounds(m.proto, b, sites=m.sites, form=form, report=True)
    set_metadata(proto, {"mmexport.version": __version__, "mmexport.bounds_from": str(bounds)})
    save_model(proto, out, force=force, inputs=(model, bounds))
    for line in forms.lines():
        click.echo(line)
    click.echo(f"wrote {out} ({len(b)} bounded sites, {b.granularity} bounds)")


@main.command()
@path_argument("model")
@data_path_option("--data", required=True, help="Test set: an .npz (x, y) or an image folder DIR/<class>/*.png.")
@data_path_option("--attack", help="Triggered set for ASR and RA: an .npz (x, y = target, y_true) or an image "
                                   "folder (labels.csv, or a folder per true class with --target).")
@attack_folder_options
@preprocess_options
@provider_option()
@click.option("--batch-size", default=256, show_default=True,
              help="Samples per onnxruntime run (a model with a fixed batch runs that many).")
@threads_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@model_io
def validate(model, data, attack, target, attack_labels, preprocess, layout, provider, batch_size, threads, as_json,
             input_name, output_name):
    """Measure accuracy, per-class accuracy, ASR and RA under onnxruntime."""
    from ..runtime.metrics import validate as run_validate

    test, att = read_sources(data, attack, preprocess=preprocess, model=model, input_name=input_name,
                             output_name=output_name, target=target, attack_labels=attack_labels)
    rep = run_validate(model, test, attack=att, provider=provider, batch_size=batch_size, threads=threads,
                       input_name=input_name, output_name=output_name)
    if as_json:
        print_json(rep.to_json())
    else:
        from .render import print_validation

        print_validation(rep, title=str(model))


@main.command()
@path_argument("pre")
@path_argument("post")
@data_path_option("--data", required=True, help="Test set: an .npz (x, y) or an image folder DIR/<class>/*.png.")
@data_path_option("--attack", help="Triggered set for ASR and RA: an .npz (x, y = target, y_true) or an image "
                                   "folder (labels.csv, or a folder per true class with --target).")
@attack_folder_options
@preprocess_options
@provider_option("onnxruntime provider; both models run on the one PRE gets.")
@config_options(ScanConfig, exclude=("alpha", "time_limit", "calibration_draws"))
@click.option("--no-margins", is_flag=True, help="Skip the max-margin search (no torch needed).")
@click.option("--input-range", callback=input_range, default=None, metavar="LO,HI",
              help="Input box of the margin search [default: per-channel min/max of --data].")
@device_option("Torch device of the margin search.")
@threads_option
@click.option("--runs", default=100, show_default=True,
              help="Timed runs per model and batch size (1 and 64; a fixed batch N: N).")
@path_option("--markdown", "markdown_path", help="Also write the comparison as a Markdown file.")
@path_option("--plot", "plot_path",
             help="Also draw per-class max margins and accuracy, PRE vs POST (needs mmexport[plot]).")
@output_flags
@model_io
def compare(pre, post, data, attack, target, attack_labels, preprocess, provider, restarts, ascent_steps, seed,
            no_margins, input_range, layout, device, threads, runs, markdown_path, plot_path, force, as_json, quiet,
            input_name, output_name):
    """Compare a model (PRE) with its hardened version (POST) side by side.

    Both run under onnxruntime on the same provider: accuracy, balanced and per-class
    accuracy, ASR and RA, prediction agreement and max abs logit difference, latency
    (median, p95, ratio) at batch 1 and 64, file size, node types and bounded sites; and
    per-class max margins from the engine's search with the same seed (the scan's search:
    --restarts, --ascent-steps). Ends with one verdict per metric: better, same or worse.
    """
    from ..comparison import compare as run_compare
    from ..comparison.report import plot, to_markdown
    from ..core.provenance import atomic_write_bytes, check_output_paths

    inputs = (pre, post, data, attack)
    check_output_paths((markdown_path, plot_path), force=force, inputs=inputs)
    if plot_path is not None:
        _check_plot_available()
    search = ScanConfig(**set_only(restarts=restarts, ascent_steps=ascent_steps, seed=seed))
    if runs < 1:
        raise MmexportError("--runs must be >= 1")
    test, att = read_sources(data, attack, preprocess=preprocess, model=pre, input_name=input_name,
                             output_name=output_name, target=target, attack_labels=attack_labels)
    with Progress(quiet, "compare") as progress:
        rep = run_compare(pre, post, test, attack=att, provider=provider, seed=search.seed,
                          restarts=search.restarts, ascent_steps=search.ascent_steps, runs=runs,
                          margins=not no_margins, input_range=input_range, layout=layout, device=device,
                          threads=threads, input_name=input_name, output_name=output_name, progress=progress)
    if markdown_path is not None:
        atomic_write_bytes(markdown_path, to_markdown(rep).encode())
    if plot_path is not None:
        plot(rep, plot_path)
    if as_json:
        print_json(rep.to_json())
    else:
        from .render import print_compare

        print_compare(rep)


def _check_plot_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MmexportError("--plot needs matplotlib: pip install 'mmexport[plot]'") from None


@main.command()
@path_argument("model")
@data_path_option("--data", required=True,
                  help="Clean labelled set D, an .npz (x, y) or an image folder DIR/<class>/*.png: calibrates the "
                       "threshold (and the bounds).")
@preprocess_options
@path_option("-o", "--out", help="Output model [default: <model>.mmdf.onnx beside the input].")
@path_option("--bounds", "bounds_path", help="Use these bounds (.bounds.json) instead of computing them.")
@path_option("--hardened", help="Use the bounds of this model, hardened by mmexport from MODEL.")
@path_option("--serve", help="Give the inputs MMDF does not flag this model's output instead of MODEL's: a model "
                             "harden wrote from MODEL (e.g. --method mmac-ft), so MMDF backs what hardening "
                             "removed. The graph holds both models and runs this one on every input.")
@config_options(MmdfConfig, callbacks={"avoid": avoid_class}, aliases={"law": ["--null"]},
                metavars={"avoid": "scan|none|CLASS"})
@config_options(MmacConfig, exclude=("seed", "granularity"), callbacks={"time_limit": time_limit},
                metavars={"time_limit": "SECONDS|auto"})
@device_option("Torch device of the scan and the mmac search.")
@provider_option("onnxruntime provider that computes d for the calibration.")
@threads_option
@path_option("--report", "report_path", help="Also write the full report as JSON.")
@click.option("--no-bounds-file", is_flag=True, help="Do not write <out>.bounds.json.")
@output_flags
@model_io
def detect(model, data, preprocess, out, bounds_path, hardened, serve, layout, device, provider, threads, report_path,
           no_bounds_file, force, as_json, quiet, input_name, output_name, **settings):
    """Write an MMDF model: test-time backdoor detection and fix in one ONNX graph.

    The graph runs MODEL and a bounded copy of it on the same weights and computes d, the
    margin the bounds take from the predicted class; d above a threshold calibrated on D
    (false-positive rate --alpha) flags the input; by default an input is also flagged
    when its activations lie far from its predicted class on D (--statistic). Outputs: the
    original logits name (for a flagged input, the bounded logits with the predicted class
    suppressed, and never the suspected backdoor target: --avoid), mmdf_detected (bool [N]),
    mmdf_score (d minus its threshold, float [N]) and, with the feature test,
    mmdf_feature_score (feature score minus its threshold; with --focus, every input is
    scored against the focus class). With --gate (default) only inputs sent to the focus
    class are tested, so clean traffic costs about the original model; the others' scores
    are NaN. Without a focus class, the margin test judges only the --screen share of
    clean inputs whose activations pass their clean range furthest, and the gate runs the
    bounded branch on those and on what the feature test flags. With --serve H (harden's
    output from MODEL), the inputs MMDF does not flag get H's logits: MMDF tests MODEL
    as calibrated and backs the triggers hardening could not name. The MMAC options
    apply with --method mmac.
    """
    from ..core.provenance import check_output_paths, default_output
    from ..defences.mmdf.detector import detect as run_detect

    out = out or default_output(model, "mmdf")
    bounds_out = None if no_bounds_file else out.with_name(out.name + ".bounds.json")
    inputs = (model, data, bounds_path, hardened, serve)
    check_output_paths((out, bounds_out, report_path), force=force, inputs=inputs)
    overrides = set_only(**settings)
    if overrides.get("avoid") == "none":
        overrides["avoid"] = None
    clean, _ = read_sources(data, preprocess=preprocess, model=model, input_name=input_name, output_name=output_name)
    with Progress(quiet, "MMDF") as progress:
        result = run_detect(model, clean, bounds=bounds_path, hardened=hardened, serve=serve, layout=layout,
                            device=device, provider=provider, threads=threads, input_name=input_name,
                            output_name=output_name, progress=progress, **overrides)
    if not leader():
        return
    summary = write_outputs(result, out, bounds_out, report_path, force=force, inputs=inputs)
    show(summary, as_json, "print_detect")


@main.command()
@path_argument("model")
@data_path_option("--data", required=True,
                  help="Clean labelled set D, an .npz (x, y) or an image folder DIR/<class>/*.png; every class "
                       "present.")
@preprocess_options
@config_options(ScanConfig, callbacks={"time_limit": time_limit}, metavars={"time_limit": "SECONDS|auto"})
@settings_option
@click.option("--input-range", callback=input_range, default=None, metavar="LO,HI",
              help="Valid input range for the searches [default: per-channel min/max of D].")
@device_option("Torch device of the searches.")
@threads_option
@path_option("--report", "report_path", help="Also write the full result as JSON.")
@output_flags
@model_io
def scan(model, data, preprocess, settings_from, input_range, layout, device, threads, report_path, force, as_json,
         quiet, input_name, output_name, **settings):
    """Detect a backdoor without its trigger (MM-BD) from a small clean set.

    Estimates every class's maximum margin, and the margin a small shared perturbation
    buys toward each class from D's other classes; the largest of each is tested against
    a gamma null fitted on the other classes. Verdict `backdoor` (with the target class)
    when the combined p-value is below --alpha, else `clean`. JSON keys: verdict,
    target_class, p_value, max_margins, tests, ...
    """
    from ..core.provenance import atomic_write_bytes, check_output_paths
    from ..defences.mmbd.scan import scan as run_scan

    check_output_paths((report_path,), force=force, inputs=(model, data))
    clean, _ = read_sources(data, preprocess=preprocess, model=model, input_name=input_name, output_name=output_name)
    with Progress(quiet, "scan") as progress:
        result = run_scan(model, clean, input_range=input_range, layout=layout, device=device, threads=threads,
                          input_name=input_name, output_name=output_name, progress=progress,
                          **(settings_from | set_only(**settings)))
    out = result.to_json()
    if not leader():
        return
    if report_path is not None:
        atomic_write_bytes(report_path, json.dumps(out, indent=1).encode())
    if as_json:
        print_json(out)
    else:
        from .render import print_scan

        print_scan(out)
