"""The `mmexport` command group: user errors become one line and exit 1, never a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from .. import __version__
from ..core.errors import MmexportError, OutputExistsError, ParameterError
from ..core.launch import leader
from .launch import process_group
from .options import flag


def console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


class Group(click.Group):
    """Turns MmexportError into one line on stderr and exit 1; a ParameterError names the flag.

    Under torchrun each command runs in one process group (`launch.process_group`); every rank
    meets the same user error, which rank 0 alone prints."""

    def invoke(self, ctx):
        with process_group():
            try:
                return super().invoke(ctx)
            except ParameterError as exc:
                sub = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
                opts = {p.name: p.opts[0] for p in (sub.params if sub else []) if isinstance(p, click.Option)}
                shown = opts.get(exc.param, flag(exc.param) if exc.param in opts else exc.param)
                fail(f"error: {shown}: {exc.detail}")
            except OutputExistsError as exc:
                fail(f"error: {exc}; use --force to overwrite")
            except MmexportError as exc:
                fail(f"error: {exc}")


def fail(line: str) -> None:
    if leader():
        click.echo(line, err=True)
    sys.exit(1)


def print_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=float))


def write_outputs(result, out: Path, bounds_path, report_path, *, force: bool, inputs) -> dict:
    """Write the model, its bounds file and the full report (each atomically); returns the
    report's summary (no history) with the paths written under `written`."""
    from ..core.model import save_model
    from ..core.provenance import atomic_write_bytes

    save_model(result.model, out, force=force, inputs=inputs)
    written = {"model": str(out)}
    if bounds_path is not None:
        atomic_write_bytes(bounds_path, result.bounds.dumps().encode())
        written["bounds"] = str(bounds_path)
    report = result.report.to_json()
    if report_path is not None:
        atomic_write_bytes(report_path, json.dumps(report, indent=1).encode())
        written["report"] = str(report_path)
    return {k: v for k, v in report.items() if k != "history"} | {"written": written}


def show(summary: dict, as_json: bool, table: str) -> None:
    """One JSON object, or the rich table `render.<table>` draws of it."""
    if as_json:
        print_json(summary)
        return
    from . import render

    getattr(render, table)(summary)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mmexport")
def main():
    """Harden ONNX classifiers against backdoors and overfitting.

    Maximum-margin activation clipping (Wang, Miller, Kesidis, arXiv 2309.16827): put an
    upper bound on every ReLU output (and every other activation unbounded above: GELU, SiLU,
    LeakyRelu, ...), chosen on a small clean labelled set so the model's
    largest classification margins shrink while its clean predictions stay put. The bounds
    are written into the ONNX graph, which then runs in plain onnxruntime.
    """
