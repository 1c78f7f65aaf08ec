"""torch's intra-op threads for a call, set together with onnxruntime's (`mmexport.core.threads`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..core.threads import using_threads


@contextmanager
def use_threads(threads: int | None = None) -> Iterator[int]:
    """torch's and onnxruntime's pools at `threads` for the work inside, restored after.

    None: the count of an enclosing call, else the cores this process may run on. The count
    changes speed, not the search: same seed, same bounds at 1 and 2 threads (tests/test_threads.py).
    """
    with using_threads(threads) as count:
        before = torch.get_num_threads()
        if count != before:
            torch.set_num_threads(count)
        try:
            yield count
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)
