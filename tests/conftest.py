"""Every test computes on one thread unless it is about threads itself (`own_threads`).

A computing call defaults to the cores the process may use; on a shared 2-core machine two
torch threads ran a harden 10x slower than one (232 s against 22.5 s on digits-cnn-sig with
another job running), so the suite pins one thread to keep its time and its results the same
on any machine.
"""

import pytest
import torch

from mmexport.core.threads import using_threads


@pytest.fixture(autouse=True)
def one_thread(request):
    """mmexport's calls and torch's own pool (tests that train through the engine directly)."""
    if request.node.get_closest_marker("own_threads"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with using_threads(1):
            yield
    finally:
        torch.set_num_threads(before)


# The slowest files first (their seconds in one run, 2026-12-02: 630, 570, 420, 410, 380, 210,
# 180 of about 3,800 on a busy machine): `make test` gives each pytest-xdist worker whole files
# (--dist loadfile) in this order, so the workers end together rather than one running a long
# file alone at the end. Within a file the order is kept.
SLOWEST_FIRST = ("test_ranks.py", "test_mmdf.py", "test_gate.py", "test_end_to_end.py", "test_sites.py",
                 "test_finetune.py", "test_screen.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
