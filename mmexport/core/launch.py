"""How this process was started: alone, or as one rank of `torchrun` (its environment variables).

Torch-free, so the CLI and the thread defaults can ask without importing torch; the process
group itself is made in `mmexport.cli.launch` and used in `mmexport.defences.common.ranks`.
"""

from __future__ import annotations

import os

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Was this process started by torchrun (or a launcher that sets the same variables)?"""
    return all(v in os.environ for v in TORCHRUN_VARIABLES)


def _int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def leader() -> bool:
    """Does this process print and write the results (rank 0, or not launched)?"""
    return not launched() or _int("RANK", 0) == 0


def local_ranks() -> int:
    """Ranks torchrun started on this machine (1 where not launched): they share its cores."""
    return max(1, _int("LOCAL_WORLD_SIZE", 1)) if launched() else 1
