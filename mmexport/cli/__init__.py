"""The `mmexport` command line: a thin shell over the Python API."""

from . import commands  # noqa: F401  (registers the commands on the group)
from .main import main

__all__ = ["main"]
