"""The zoo's adaptive attack: the penalty that keeps triggered samples inside the clean range."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sample_models"))
from build import range_penalty  # noqa: E402


def test_range_penalty_is_the_mean_scaled_excess_of_the_poisoned_rows():
    m = torch.tensor([[1.0, 0.5, 0.0], [0.2, 2.0, 0.0],  # clean: channel maxima 1, 2, 0 (mean 1)
                      [2.0, 2.0, 0.5], [0.5, 3.0, 0.0]], requires_grad=True)
    poisoned = torch.tensor([False, False, True, True])
    # scales max(top, mean top) = 1, 2, 1; excess [1, 0, 0.5] and [0, 1, 0] -> [1, 0, .5], [0, .5, 0]
    got = range_penalty([m], poisoned)
    assert got.item() == pytest.approx((1 + 0.5 + 0.5) / 6)
    got.backward()
    assert (m.grad[:2] == 0).all()  # the clean range is not pushed up to hide the trigger
    assert m.grad[2, 0] > 0 and m.grad[2, 1] == 0  # only channels past the range are pushed
    assert range_penalty([m, m], poisoned).item() == pytest.approx(2 * got.item())  # summed over sites


@pytest.mark.parametrize("mask", [[False] * 4, [True] * 4])
def test_range_penalty_needs_both_kinds_of_rows(mask):
    assert range_penalty([torch.ones(4, 3)], torch.tensor(mask)).item() == 0.0
