"""The bound search's settings, apart from the search itself so the CLI can read them without torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ...core.config import check_choices, param
from ...core.errors import ParameterError

REDUCTIONS = ("mean", "max", "excess", "softmax")
MAXIMISERS = ("universal", "points", "both", "masked", "universal+masked")
# Images of the other classes a per-class statistic is judged on (a stamp, a shared
# perturbation): all of D's would be K x |D| forwards, 5M at 1,000 classes. At most JUDGE_ROWS
# per class and JUDGE_TOTAL over all classes, never fewer than JUDGE_MIN per class.
JUDGE_ROWS, JUDGE_TOTAL, JUDGE_MIN = 400, 20_000, 50


def judge_rows(classes: int) -> int:
    """Per-class cap on the images a class's statistic is judged on: 400 up to 50 classes, 200
    at 100, 50 at 400 and more."""
    return max(JUDGE_MIN, min(JUDGE_ROWS, JUDGE_TOTAL // max(classes, 1)))


@dataclass(frozen=True)
class SearchConfig:
    """Every knob of the max-margin bound search; the defaults are the shipped recipe.

    MMAC and MMOM each have a subclass (`MmacConfig`, `MmomConfig`) holding their defaults.
    """

    method: str = param("mmac", "Objective on D: keep its logits (mmac) or cross-entropy on its labels (mmom).",
                        choices=("mmac", "mmom"), cli=False)
    granularity: str = param("channel", "One bound per channel, or one per site.", choices=("channel", "layer"))
    restarts: int = param(10, "Ascent points per class (universal: clean images per class).")
    clean_fraction: float = param(0.5, "Share of ascent starts taken from clean images of D.", cli=False)
    warmup_steps: int = param(100, "Ascent steps before the first bound update.", cli=False)
    steps: int = param(5, "Ascent steps on the maximisers per epoch (warm-started).")
    refresh_every: int = param(1, "Epochs between refreshes of the maximisers.", cli=False)
    step_size: float = param(0.02, "Signed-gradient ascent step, as a fraction of the input range.", cli=False)
    max_epochs: int = param(150, "Upper limit on bound-update epochs.")
    lr: float = param(0.02, "Adam's learning rate on the relative bounds.", cli=False)
    lambda0: float = param(0.1, "Starting weight of the margin term.")
    lambda_up: float = param(1.3, "Factor on lambda while the accuracy floor holds.", cli=False)
    lambda_down: float = param(2.0, "Divisor of lambda when the accuracy floor breaks.", cli=False)
    check_every: int = param(2, "Epochs between accuracy checks (and lambda updates).", cli=False)
    acc_floor: float = param(0.98, "Fraction of the clean set's originally-correct samples that must stay correct "
                                   "(checked on D and its 1-pixel shifts).")
    reduction: str = param("max", "How per-class max margins combine into the objective.", choices=REDUCTIONS)
    patience: int = param(20, "Checks without a better feasible point before stopping.", cli=False)
    controller: str = param("floor", "floor: lambda rises until the accuracy floor binds; fixed: lambda stays.",
                            choices=("floor", "fixed"), cli=False)
    optimiser: str = param("adam", "adam, or ngd (normalised gradient descent).", choices=("adam", "ngd"), cli=False)
    augment: bool = param(True, "Logit term also on shifted/mixed-up D; floor checked on shifted D.", cli=False)
    maximisers: str = param("universal+masked",
                            "Where margins are maximised: one norm-bounded perturbation per class shared by the "
                            "clean images (universal), free points in the input box (points, the paper's choice), "
                            "both of those, one stamped pattern of bounded area per class (masked), or universal "
                            "and masked together.", choices=MAXIMISERS)
    budget: float = param(0.2, "L2 radius of the universal perturbations, as a fraction of the input box's norm.")
    mask_area: float = param(0.05, "Largest area of the masked maximisers' patterns, as a fraction of the image; "
                                   "the pattern concentrates on a patch of about that size.")
    seed: int = param(0, "Seed: same seed, same bounds (on CPU).")
    time_limit: float | None = param(None, "Seconds the search may take, predicted from the model's measured cost "
                                           "per row: where the schedule above would take longer, restarts, ascent "
                                           "steps and epochs shrink together until it fits (the report says how). "
                                           "auto: 240 s plus 24 s per million parameters, at most 480 s, at "
                                           "reference costs (the work counted and priced at fixed rates, so a "
                                           "seed gives the same model on any machine at any load; a number is "
                                           "timed here and now); 0: no limit.")
    max_memory: float = param(0.0, "GiB of activations held at once: passes run in chunks of rows that fit. "
                                   "0: a quarter of the available memory, at most 2 GiB (half the free GPU "
                                   "memory on CUDA).")
    fit_rows: int = param(0, "Rows of D (and as many augmented) in each epoch's logit term, drawn afresh each "
                             "epoch (0: all of D).", cli=False)
    floor_rows: int = param(0, "Rows of D and its shifts the accuracy floor is checked on, drawn once (0: all).",
                            cli=False)
    probe_steps: int = param(100, "Ascent steps of the report's before/after max-margin estimates.", cli=False)

    def __post_init__(self):
        check_choices(self)
        if not 0.0 < self.acc_floor <= 1.0:
            raise ParameterError("acc_floor", f"must be in (0, 1], got {self.acc_floor}")
        for name in ("restarts", "check_every", "refresh_every"):
            if getattr(self, name) < 1:
                raise ParameterError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.time_limit is not None and not self.time_limit >= 0:
            raise ParameterError("time_limit", f"must be >= 0 or auto, got {self.time_limit}")
        for name in ("steps", "warmup_steps", "max_epochs", "max_memory", "fit_rows", "floor_rows", "probe_steps"):
            if getattr(self, name) < 0:
                raise ParameterError(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("budget", "mask_area", "lr", "step_size"):
            if not getattr(self, name) > 0:
                raise ParameterError(name, f"must be > 0, got {getattr(self, name)}")

    def to_json(self) -> dict:
        return asdict(self)


def auto_time_limit(parameters: int) -> float:
    """The search's default time limit: bigger models get longer, from 4 min to 8 min at 10M
    parameters (a harden within 5 min for a MobileNet, 10 min for a ResNet-18, on 2 cores)."""
    return min(480.0, 240.0 + 24.0 * parameters / 1e6)
