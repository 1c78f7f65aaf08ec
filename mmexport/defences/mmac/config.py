"""MMAC's defaults: keep D's logits while the maximum margins shrink; first look for a stamp."""

from __future__ import annotations

from dataclasses import dataclass

from ...core.config import param
from ...core.errors import ParameterError
from ..common.config import SearchConfig


@dataclass(frozen=True)
class MmacConfig(SearchConfig):
    """The max-margin search with D's logits kept, after an optional stamp-unlearning stage.

    `unlearn="auto"` first reverse-engineers one stamp per class on the original model; where
    one class's stamped margin on D stands out by `unlearn_gate` (its gap to the runner-up
    over the others' MAD), the bounds unlearn that stamp instead (`mmac.unlearn`); where none
    does, the MM-BD scan's target's stamp and the scan's universal perturbation toward it, each
    that sends at least `scan_fooled` of D's other classes to it. With `finetune` (method
    `mmac-ft`) the weights then unlearn them too (`mmac.finetune`).
    """

    method: str = param("mmac", "Objective on D: keep its logits.", choices=("mmac",), cli=False)
    unlearn: str = param("auto", "First look for a stamped trigger on the original model (one pattern of "
                                 "mask_area per class); if one class's stamp stands out, fit the bounds to send "
                                 "D's stamped images back to their labels instead of the max-margin search. auto: "
                                 "where none stands out, ask the MM-BD scan, and unlearn the stamp of the target it "
                                 "names and the scan's universal perturbation toward it, each that sends most of "
                                 "D's other classes to it; stamp: the stamp's "
                                 "own test only; off: the max-margin search alone.",
                         choices=("auto", "stamp", "off"))
    shift: str = param("scan", "The scan's universal perturbation toward its target as a second stand-in of the "
                               "trigger (one more triggered copy of D): scan: where the scan is asked (no stamp "
                               "stands out); always: where a stamp stands out too, asking the scan for it (one "
                               "scan more, 3-7 min at real size on two cores); off: never.",
                       choices=("scan", "always", "off"))
    unlearn_gate: float = param(4.0, "How far (in MADs of the other classes) one class's stamp must stand out.",
                                cli=False)
    scan_fooled: float = param(0.5, "unlearn auto: the least share of D's other-class images the scan's target's "
                                    "stamp, or its universal perturbation, must send to it to be unlearned (a "
                                    "majority: one that moves fewer is no trigger, "
                                    "docs/experiments.md#stamp-scan-target).", cli=False)
    unlearn_floor: float = param(0.97, "Accuracy floor on D and its shifts while unlearning.", cli=False)
    unlearn_weight0: float = param(0.02, "Starting weight of the stamped cross-entropy.", cli=False)
    unlearn_epochs: int = param(200, "Epochs of the unlearning stage.", cli=False)
    unlearn_tolerance: float = param(
        0.0, "Which feasible check the unlearning stage returns: the most accurate on D among those whose "
             "held-out stamped images go to the suspect class at most this many binomial standard errors "
             "more often than the best check's (0: the best check; 1 measured no better on the samples, "
             "docs/experiments.md#unlearn-one-se).", cli=False)

    finetune: bool = param(False, "After the bounds, fine-tune the weights to unlearn the stamp found "
                                  "(method mmac-ft).", cli=False)
    ft_epochs: int = param(20, "mmac-ft: epochs of the weights' fine-tune on D and its triggered copies.")
    ft_lr: float = param(1e-4, "mmac-ft: Adam's learning rate of the weights' fine-tune.")
    ft_batch: int = param(32, "mmac-ft: rows per step of the weights' fine-tune.", cli=False)

    def __post_init__(self):
        super().__post_init__()
        for name in ("ft_epochs", "ft_batch"):
            if getattr(self, name) < 1:
                raise ParameterError(name, f"must be >= 1, got {getattr(self, name)}")
        if not self.ft_lr > 0:
            raise ParameterError("ft_lr", f"must be > 0, got {self.ft_lr}")
        if not 0.0 <= self.scan_fooled <= 1.0:
            raise ParameterError("scan_fooled", f"must be in [0, 1], got {self.scan_fooled}")
        if not 0.0 < self.unlearn_floor <= 1.0:
            raise ParameterError("unlearn_floor", f"must be in (0, 1], got {self.unlearn_floor}")
        if not self.unlearn_tolerance >= 0.0:
            raise ParameterError("unlearn_tolerance", f"must be >= 0, got {self.unlearn_tolerance}")
