"""Data as users hold it: the options every command that reads --data/--attack shares, and the
`data` commands (`pack` an image folder into an .npz, `show` what a source holds)."""

from __future__ import annotations

import functools
import inspect
from dataclasses import fields
from pathlib import Path

import click

from ..core.errors import MmexportError, ParameterError
from ..core.images import Preprocess
from .main import Group, main, print_json
from .options import flag, layout_option, model_io, path_option

_METAVARS = {"resize": "H,W", "channels": "1|3", "layout": "nchw|nhwc", "scale": "S", "mean": "M[,M,M]",
             "std": "S[,S,S]"}


def data_path_option(*names, **kw):
    """--data / --attack: an .npz file or an image folder (load_data tells them apart)."""
    return click.option(*names, type=click.Path(path_type=Path), **kw)


def preprocess_options(func):
    """--preprocess JSON and one option per Preprocess field (help from the dataclass).

    The command receives `preprocess`: a Preprocess, or None when no option was given (then
    `load_data`'s defaults apply). Options given on the command line win over the JSON's keys.
    """

    # --layout is shared with the defences (the input's channel axis, `layout_option`): one
    # option says both how folders are read and where the box and shifts take channels.
    takes_layout = "layout" in inspect.signature(func).parameters

    @functools.wraps(func)
    def wrapper(*args, **kw):
        values = {f.name: kw.pop(f.name) for f in fields(Preprocess) if f.name != "layout"}
        values["layout"] = kw["layout"] if takes_layout else kw.pop("layout")
        json_path = kw.pop("preprocess_file")
        if json_path is not None:
            kw["preprocess"] = Preprocess.from_json(json_path, values)
        elif any(v is not None for v in values.values()):
            kw["preprocess"] = Preprocess.parse(values)
        else:
            kw["preprocess"] = None
        return func(*args, **kw)

    for f in reversed([f for f in fields(Preprocess) if f.name != "layout"]):
        wrapper = click.option(flag(f.name), f.name, default=None, metavar=_METAVARS.get(f.name),
                               help=f"{f.metadata['help']} [image folders]")(wrapper)
    keys = ", ".join(f.name for f in fields(Preprocess))
    wrapper = layout_option(wrapper)
    return path_option("--preprocess", "preprocess_file", metavar="JSON",
                       help=f"Read the image folders' preprocessing from a JSON object with the keys {keys} (the "
                            "options below win over it).")(wrapper)


def attack_folder_options(func):
    """--target and --attack-labels: an attack image folder's labels."""
    func = path_option("--attack-labels", "attack_labels", metavar="CSV",
                       help="Attack folder: the CSV naming its images (file,target,y_true or file,y_true with "
                            "--target) [default: labels.csv in the folder].")(func)
    return click.option("--target", type=int, default=None, metavar="CLASS",
                        help="Attack folder: the attacker's target class (a folder per true class, or a CSV "
                             "without a target column).")(func)


def read_sources(data, attack=None, *, preprocess=None, model=None, input_name=None, output_name=None,
                 target=None, attack_labels=None):
    """(clean set, attack set), each None where its path is, read from .npz files or image folders.

    The model is read at most once, and only for a folder (its input shape fills the unset
    preprocessing). Options that apply to folders only are refused where no source is one,
    rather than silently ignored.
    """
    from ..core.sources import load_data

    given = [p for p in (data, attack) if p is not None]
    folders = [p for p in given if Path(p).is_dir()]
    for name, value in (("target", target), ("attack_labels", attack_labels)):
        if value is None:
            continue
        if attack is None:
            raise ParameterError(name, "applies to an attack image folder (--attack DIR) only")
        if not Path(attack).is_dir():
            raise ParameterError(name, f"{attack}: an .npz attack set holds its targets and true labels already")
    if preprocess is not None and given and not folders:
        raise MmexportError(f"the preprocessing options apply to image folders; {given[0]} holds model inputs already")
    m = None
    if folders and model is not None:
        from ..core.model import load_model

        m = load_model(model, input_name=input_name, output_name=output_name)

    def one(path, is_attack):
        if path is None:
            return None
        if not Path(path).is_dir():
            return load_data(path, attack=is_attack)
        return load_data(path, attack=is_attack, preprocess=preprocess, model=m,
                         target=target if is_attack else None, labels=attack_labels if is_attack else None)

    return one(data, False), one(attack, True)


def _source(func):
    """SOURCE, --attack, the attack-folder and preprocessing options, --model: what `data` commands read."""
    func = model_io(func)
    func = path_option("--model", metavar="MODEL.onnx",
                       help="Take the unset preprocessing (size, channels, layout) from this model's input.")(func)
    func = preprocess_options(func)
    func = attack_folder_options(func)
    func = click.option("--attack", "is_attack", is_flag=True,
                        help="An attack set (y = target, y_true); implied by --target and --attack-labels.")(func)
    return click.argument("source", type=click.Path(path_type=Path))(func)


def _read(source, *, is_attack, target, attack_labels, **kw):
    if is_attack or target is not None or attack_labels is not None:
        return read_sources(None, source, target=target, attack_labels=attack_labels, **kw)[1]
    return read_sources(source, **kw)[0]


@main.group(cls=Group)
def data():
    """Datasets as users hold them: pack an image folder into an .npz, show what a source holds.

    --data and --attack take an .npz (x, y[, y_true]) or an image folder DIR/<class>/*.png
    (see docs/cli/data.md for the layout, the preprocessing and attack folders).
    """


@data.command()
@_source
@path_option("-o", "--out", required=True, help="Output .npz (x, y[, y_true], classes).")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def pack(source, out, is_attack, target, attack_labels, preprocess, model, input_name, output_name, force):
    """Read SOURCE (an image folder) as the commands would and write it as an .npz for reuse."""
    from ..core.data import npz_bytes
    from ..core.provenance import atomic_write_bytes, check_output_path

    if out.suffix.lower() != ".npz":
        raise MmexportError(f"{out}: the output must be an .npz file")
    check_output_path(out, force=force, inputs=(source, model, attack_labels))
    ds = _read(source, is_attack=is_attack, target=target, attack_labels=attack_labels, preprocess=preprocess,
               model=model, input_name=input_name, output_name=output_name)
    atomic_write_bytes(out, npz_bytes(ds))
    classes = f", {len(ds.classes)} classes" if ds.classes is not None else ""
    click.echo(f"wrote {out} ({len(ds)} samples, x {ds.x.dtype} {tuple(ds.x.shape)}{classes})")


@data.command()
@_source
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show(source, is_attack, target, attack_labels, preprocess, model, input_name, output_name, as_json):
    """Print what SOURCE (an .npz or an image folder) holds: size, shape, value range, classes, counts."""
    from ..core.sources import describe

    ds = _read(source, is_attack=is_attack, target=target, attack_labels=attack_labels, preprocess=preprocess,
               model=model, input_name=input_name, output_name=output_name)
    info = describe(ds)
    if as_json:
        print_json(info)
        return
    click.echo(f"{info['path']}: {info['source']}, {info['n']} {'attack ' if info['attack'] else ''}samples")
    click.echo(f"x: {info['dtype']} {tuple(info['shape'])}, values {info['min']:.4g} .. {info['max']:.4g}")
    if info["attack"]:
        click.echo("targets: " + ", ".join(f"{t} ({n})" for t, n in info["targets"].items()))
    names = info["classes"] or [None] * len(info["counts"])
    click.echo(("true class" if info["attack"] else "class") + " counts:")
    for c, (name, n) in enumerate(zip(names, info["counts"], strict=False)):
        shown = f" {name!r}" if name is not None and name != str(c) else ""
        click.echo(f"  {c}{shown}: {n}")
