"""MMOM's defaults: cross-entropy on D, lambda chosen by cross-validation, optional refit."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.config import param
from ..common.config import SearchConfig


@dataclass(frozen=True)
class MmomConfig(SearchConfig):
    """The max-margin search with cross-entropy on D (imbalance, over-training).

    Non-malicious overfitting has no stamped trigger to find: MMOM keeps the universal
    perturbations alone (with the masked ones too, the rarest class of digits-cnn-imbalanced
    fell 7.8 -> 5.9% instead of rising to 13.7%; docs/experiments.md, MMOM). Lambda is fixed
    per fit and cross-validated, so eleven short fits replace one long one.
    """

    method: str = param("mmom", "Objective on D: cross-entropy on its labels.", choices=("mmom",), cli=False)
    max_epochs: int = param(60, "Upper limit on bound-update epochs (per cross-validation fit).")
    maximisers: str = param("universal", SearchConfig.__dataclass_fields__["maximisers"].metadata["help"],
                            choices=SearchConfig.__dataclass_fields__["maximisers"].metadata["choices"])
    refit: bool = param(False, "After the bounds, re-fit the last linear layer on D (long-tailed models).",
                        cli=False)
