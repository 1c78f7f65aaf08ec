"""`torchrun --nproc-per-node N -m mmexport harden|detect|scan ...`: one process group per command.

Every rank runs the whole command on the same arguments; the searches share their work
(`mmexport.defences.common.ranks`) and only rank 0 prints and writes. Backend: gloo on the
CPU, NCCL for CUDA tensors (each rank on GPU LOCAL_RANK). A process that torchrun did not
start makes no group and runs as before.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from ..core.launch import launched, leader


@contextmanager
def process_group():
    if not launched():
        yield
        return
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    made = not dist.is_initialized()
    if made:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    quiet = None
    if not leader():  # the results are rank 0's to print
        quiet, sys.stdout = sys.stdout, open(os.devnull, "w")  # noqa: SIM115
    try:
        yield
    finally:
        if quiet is not None:
            sys.stdout.close()
            sys.stdout = quiet
        if made:
            dist.destroy_process_group()
