"""Where torch runs, and how to make a run there reproducible."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from ...core.errors import ParameterError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device", "cuda: no CUDA device is available to torch")
    if device not in ("cpu", "cuda"):
        raise ParameterError("device", f"{device!r}: expected one of auto, cpu, cuda")
    return torch.device(device)


@contextmanager
def reproducible(dev: torch.device):
    """Same seed, same bounds on CUDA too (on the CPU they are already).

    cuDNN picks its fastest kernels, some of which sum in a run-dependent order; measured on
    the sample wide CNN and ResNet, two equal-seeded CUDA runs ended 4-5 apart in some bound.
    """
    if dev.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    cudnn = torch.backends.cudnn
    saved = (cudnn.deterministic, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn.deterministic, cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
