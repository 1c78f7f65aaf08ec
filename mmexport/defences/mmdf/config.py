"""MMDF's defaults: which bounds, which statistics, which false-positive rate."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...core.config import check_choices, param
from ...core.errors import ParameterError
from ..mmac.config import MmacConfig
from .null import LAWS

# Cross-fitting folds of the calibration scores: each held-out score comes from a fit on
# 90% of D, closer to the final fit on all of D than 80% is; over ten seeds the signal MLP's
# ASR ranged 0.9-1.8% with 10 folds, 0.4-3.6% with 5 (docs/experiments.md, MMDF: ten folds).
FOLDS = 10
BOUNDS_METHODS = ("clean-max", "mmac")
# "margin": the paper's test, the margin gap alone. "margin+features": also flag an input
# whose site activations lie far from its predicted class on D (mmdf.features); the
# false-positive budget alpha is split evenly between the two tests.
STATISTICS = ("margin+features", "margin")


@dataclass(frozen=True)
class MmdfConfig:
    """Every knob of MMDF's calibration; the defaults are the shipped detector."""

    method: str = param("clean-max", "How the bounds are found when none are given: clean-max (each channel's "
                                     "clean range endpoint, null cross-fitted) or mmac (MMAC's search).",
                        choices=BOUNDS_METHODS)
    statistic: str = param("margin+features", "margin+features: the margin gap and the feature test, alpha "
                                              "split between them; margin: the paper's test alone.",
                           choices=STATISTICS)
    alpha: float = param(0.005, "False-positive rate the thresholds are calibrated for (on new clean images; "
                                "the conformal law holds it once D has 1 / alpha images per test, 2 / alpha "
                                "for both, and says what it holds below that).")
    law: str = param("conformal", "Null law of the clean scores: conformal (distribution-free quantile), "
                                  "exponential-tail or gaussian (the paper's).", choices=LAWS)
    folds: int = param(FOLDS, "Cross-fitting folds of the calibration scores (clean-max margin gap and "
                              "feature test).")
    augment: bool = param(True, "Calibrate on D and its 1-pixel shifts (False: D alone).")
    avoid: int | str | None = param("scan", "A class flagged inputs are never sent to: scan (the suspected "
                                            "backdoor target of the MM-BD scan on D, if it finds one), None, "
                                            "or a class number.")
    focus: bool = param(True, "Where `avoid` names a class, test only inputs the model sends to it, thresholds "
                              "set on D's inputs sent to it so that the false-positive rate over all clean "
                              "inputs stays alpha.")
    gate: bool = param(True, "Run MMDF's tests only on the inputs they can flag (an If in the graph; the others "
                             "keep the original logits, their scores are NaN): with a focus class, the inputs the "
                             "model sends to it; without, those the screen passes or the feature test flags.")
    own_weights: bool = param(True, "With `gate` and a focus class, the branch that recomputes the model on the "
                                    "tested rows holds its own copy of the conv weights, which onnxruntime runs in "
                                    "its blocked layout (MobileNetV2 at batch 64: 1.47x the original, 1.58x sharing "
                                    "them); the file grows by those weights. False: one copy of every weight.")
    screen: float = param(0.2, "Where no focus class is set and the bounds are clean-max: the share of clean "
                               "inputs the margin test runs on, those whose activations pass their clean range "
                               "furthest (set on D, cross-fitted); the others cannot be flagged by it and, with "
                               "`gate`, skip the bounded branch. 1: every input.")
    seed: int = param(0, "Seed of the folds, the scan and the mmac search.")
    search: MmacConfig | None = param(None, "MMAC's settings where method is mmac.", cli=False)

    def __post_init__(self):
        check_choices(self)
        if not 0.0 < self.alpha < 0.5:
            raise ParameterError("alpha", f"must be in (0, 0.5), got {self.alpha}")
        if not 0.0 < self.screen <= 1.0:
            raise ParameterError("screen", f"must be in (0, 1], got {self.screen}")
        if self.folds < 2:
            raise ParameterError("folds", f"must be >= 2, got {self.folds}")
        avoid = self.avoid
        if not (avoid is None or avoid == "scan" or (isinstance(avoid, int) and not isinstance(avoid, bool))):
            raise ParameterError("avoid", f"{avoid!r}: expected 'scan', None or a class number")
        if self.search is not None and self.method != "mmac":
            raise ParameterError("search", f"MMAC settings apply to method 'mmac' only, not {self.method!r}")

    def to_json(self) -> dict:
        return asdict(self)
