"""What every method's config shares: documented fields, keyword overrides, checks by name.

A method's defaults live once, in its frozen config dataclass. Each field carries its help
text (and the choices it takes), so the CLI builds its options from the same place and the
library names the parameter at fault (`ParameterError`), which the CLI maps to its flag.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, field, fields, replace
from typing import Any, TypeVar

from .errors import ParameterError

C = TypeVar("C")


def param(default: Any, help: str, *, choices: tuple | None = None, cli: bool = True):  # noqa: A002
    """A config field with its help text; `choices` are checked on every config built."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli})


def check_choices(config) -> None:
    """Raise ParameterError for any field outside its declared choices."""
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if choices and value not in choices:
            raise ParameterError(f.name, f"{value!r}: expected one of {', '.join(map(str, choices))}")


def with_overrides(config: C, overrides: dict, *, what: str) -> C:
    """`config` with some fields replaced; an unknown name is an error naming it."""
    known = {f.name for f in fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ParameterError(unknown[0], f"not a parameter of {what} (has: {', '.join(sorted(known))})")
    return replace(config, **overrides) if overrides else config


def to_json(config) -> dict:
    return asdict(config)


def is_config(obj) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)
