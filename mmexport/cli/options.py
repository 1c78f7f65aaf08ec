"""Option groups, built once: from the config dataclasses (defaults and help live there)."""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path

import click

from ..runtime.sessions import PROVIDERS


def flag(name: str) -> str:
    """The CLI spelling of a parameter: `acc_floor` -> `--acc-floor`."""
    return "--" + name.replace("_", "-")


def _show(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def config_options(*classes, exclude=(), callbacks=None, aliases=None, metavars=None):
    """One click option per CLI field of the config classes, default None (= the config's).

    A field in several classes appears once; where their defaults differ the help says so
    (`[default: 150; MmomConfig: 60]`). The command passes the options the user set as
    keyword overrides, so the defaults live only in the dataclasses.
    """
    callbacks, aliases, metavars = callbacks or {}, aliases or {}, metavars or {}
    seen: dict[str, list] = {}
    for cls in classes:
        for f in fields(cls):
            if f.metadata.get("cli") and f.name not in exclude:
                seen.setdefault(f.name, []).append((cls, f))

    def decorate(func):
        for name, defs in reversed(seen.items()):
            f = defs[0][1]
            default = f.default if f.default is not MISSING else None
            others = [f"{cls.__name__.removesuffix('Config').lower()}: {_show(g.default)}"
                      for cls, g in defs[1:] if g.default != default]
            shown = "; ".join([_show(default) if default is not None or name != "time_limit" else "auto"] + others)
            help_text = f"{f.metadata['help']} [default: {shown}]"
            names = [flag(name)] + list(aliases.get(name, ()))
            if isinstance(default, bool):
                opt = click.option(f"{flag(name)}/--no-{name.replace('_', '-')}", name, default=None,
                                   help=help_text)
            else:
                kind = click.Choice(f.metadata["choices"]) if f.metadata.get("choices") else (
                    type(default) if isinstance(default, (int, float)) else None)
                opt = click.option(*names, name, type=kind, default=None, help=help_text,
                                   callback=callbacks.get(name), metavar=metavars.get(name))
            func = opt(func)
        return func

    return decorate


def set_only(**values) -> dict:
    """The options the user gave: those still None keep the config's default."""
    return {k: v for k, v in values.items() if v is not None}


REPORT_ONLY = ("input_range", "layout")  # what a report's `settings` holds beside the config's fields


def settings_file(_ctx, _param, value) -> dict:
    """--settings FILE: a JSON object of config fields (a report's `settings` will do)."""
    if value is None:
        return {}
    import json

    from ..core.errors import MmexportError

    try:
        obj = json.loads(Path(value).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise MmexportError(f"{value}: cannot read the settings ({exc.__class__.__name__})") from None
    except json.JSONDecodeError as exc:
        raise MmexportError(f"{value}: not JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(obj, dict) and isinstance(obj.get("settings"), dict):
        obj = obj["settings"]  # a whole report
    if not isinstance(obj, dict):
        raise MmexportError(f"{value}: expected a JSON object of settings, got {type(obj).__name__}")
    return {k: v for k, v in obj.items() if k not in REPORT_ONLY}


def settings_option(f):
    return click.option(
        "--settings", "settings_from", type=click.Path(dir_okay=False, path_type=Path), callback=settings_file,
        metavar="FILE",
        help="Start from the settings in a JSON object (field: value), e.g. a report written with --report "
             "(its `settings`, the schedule as run): replays a run, time limit 0 and all. Options given on "
             "the command line win; an unknown field is an error naming it.")(f)


def time_limit(_ctx, _param, value):
    """--time-limit SECONDS or auto (None: the config's default, auto)."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected seconds (a number >= 0) or auto") from None
    if not seconds >= 0:
        raise click.BadParameter(f"{value!r}: expected seconds (a number >= 0) or auto")
    return seconds


def input_range(_ctx, _param, value):
    if value is None:
        return None
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected LO,HI (e.g. 0,1), got {value!r}") from None
    if not lo < hi:
        raise click.BadParameter(f"LO must be below HI, got {value!r}")
    return lo, hi


def avoid_class(_ctx, _param, value):
    if value is None or value == "scan":
        return value
    if value == "none":
        return "none"
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"expected scan, none or a class number, got {value!r}") from None


def model_io(f):
    f = click.option("--output", "output_name", metavar="NAME", help="Logits output (when the graph has several).")(f)
    return click.option("--input", "input_name", metavar="NAME", help="Model input (when the graph has several).")(f)


def path_argument(name: str):
    return click.argument(name, type=click.Path(dir_okay=False, path_type=Path))


def path_option(*names, **kw):
    return click.option(*names, type=click.Path(dir_okay=False, path_type=Path), **kw)


def provider_option(help_text: str = "onnxruntime provider."):
    return click.option("--provider", type=click.Choice(PROVIDERS), default="auto", show_default=True,
                        help=help_text)


def device_option(help_text: str = "Torch device of the search."):
    return click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                        show_default=True, help=help_text)


def output_flags(f, *, what: str = "outputs"):
    """--force, --json, -q: every command that writes or searches has them."""
    f = click.option("-q", "--quiet", is_flag=True, help="No progress display.")(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")(f)
    return click.option("--force", is_flag=True, help=f"Overwrite existing {what}.")(f)


def threads_option(f):
    """--threads N: torch's intra-op threads and onnxruntime's (`mmexport.core.threads`)."""
    from ..core.threads import available_cores

    return click.option(
        "--threads", type=click.IntRange(min=1), default=None, metavar="N",
        help="Threads for torch and onnxruntime; fewer can be faster on a busy machine "
             f"[default: the cores this process may use, {available_cores()} here].")(f)


def layout_option(f):
    """--layout: where the input keeps its channels (`mmexport.core.conventions`)."""
    return click.option(
        "--layout", type=click.Choice(["auto", "nchw", "nhwc"]), default="auto", show_default=True,
        callback=lambda _ctx, _param, v: None if v == "auto" else v,
        help="Channel axis of the input for the per-channel input box, stamps and 1-pixel shifts, and "
             "the array layout image folders are read into; auto: nhwc where the graph starts with a "
             "transpose to NCHW, else nchw.")(f)
