"""How many threads a call computes with: torch's intra-op pool and onnxruntime's.

On a shared machine the default pools fight over the cores (two torch threads measured 3x
slower than one under load), so every computing call takes `threads`: None means the value of
an enclosing call, else the cores this process may run on (its CPU affinity, which `taskset`
and container limits set, not the machine's core count). The value is held here, free of
torch and onnxruntime: onnxruntime sessions read it when they are made
(`mmexport.runtime.sessions`), the engine's `use_threads` also sets torch's pool.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import ParameterError
from .launch import local_ranks

_in_use: int | None = None


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def threads_in_use() -> int:
    """The thread count of the enclosing call, else the cores this process may use (its share
    where torchrun started several ranks on this machine)."""
    return _in_use if _in_use is not None else max(1, available_cores() // local_ranks())


def check_threads(threads) -> int | None:
    """`threads` if it is None or a whole number >= 1, else ParameterError."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ParameterError("threads", f"must be a whole number >= 1, got {threads!r}")
    return threads


@contextmanager
def using_threads(threads: int | None = None) -> Iterator[int]:
    """Hold `threads` (None: the enclosing call's, else the available cores) for the calls
    inside; yields the count."""
    global _in_use
    count = check_threads(threads) or threads_in_use()
    before, _in_use = _in_use, count
    try:
        yield count
    finally:
        _in_use = before
