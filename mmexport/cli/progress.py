"""Progress of a long command on stderr: the stage, the epoch of how many, lambda, accuracy on
D and an estimate of the time left.

On a terminal it is one live line (a rich bar) with a line printed as each stage starts. Where
stderr is not a terminal (a log file, a pipe, a CI job) a live bar writes nothing for many
minutes, so plain lines are printed instead: one as each stage starts, and one every
`EVERY_EPOCHS` epochs (or `EVERY_STEPS` steps) or `EVERY_SECONDS` seconds, whichever comes
first. Nothing at all with -q.

One object takes what every command reports: the defences' rows (`{"stage": name}` as a stage
starts, epoch rows of the bound search, `{"stamp": ...}`, `{"cv": ...}`, `{"step": ..., "done",
"total"}`) and the `(step, done, total)` calls of scan and compare.
"""

from __future__ import annotations

import time

import click

from ..core.launch import leader
from .main import console

EVERY_EPOCHS = 10
EVERY_STEPS = 50
EVERY_SECONDS = 30.0


def duration(seconds: float) -> str:
    """3 s, 45 s, 2 min 10 s, 1 h 05 min."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return "under 1 s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def epoch_text(row: dict) -> str:
    """An epoch row of the bound search or the stamp unlearning, in words."""
    text = f"epoch {row['epoch']}/{row.get('max_epochs', '?')}"
    if row.get("phase") == "fine-tune":
        return f"{text}, loss on D and its triggered copies {row['loss']:.4f}"
    if row.get("phase") == "unlearn":
        return (f"{text}, weight {row['lambda']:.3g}, acc(D) {row['accuracy']:.3f}, stamped held-out "
                f"to class {100 * row['objective']:.1f}%")
    return (f"{text}, lambda {row['lambda']:.3g}, acc(D) {row['accuracy']:.3f}, "
            f"margin objective {row['objective']:.2f}")


def info_text(row: dict) -> str | None:
    """The one-off results some stages report (the stamp found, a cross-validation row)."""
    if "cv" in row:
        cv = row["cv"]
        return (f"cross-validation: lambda {cv['lambda']:g} -> held-out balanced accuracy "
                f"{cv['balanced_accuracy']:.3f}")
    if "schedule" in row:
        return schedule_text(row["schedule"])
    if "stamp" in row:
        return stamp_text(row["stamp"])
    return None


def stamp_text(st: dict) -> str:
    """What the stamp stage found and which search follows, the scan's word included."""
    t = st["target"]
    sends = f"sends {100 * st['fooled'][t]:.0f}% of D's other classes to it"
    scan = st.get("scan")
    moved = f"{100 * ((scan or {}).get('shift') or {}).get('fooled', 0.0):.0f}%"  # by the scan's shift
    stand_ins = st.get("stand_ins", ["stamp"])
    if st.get("source") == "scan":
        if "shift" not in stand_ins:
            what = f"its stamp {sends}: unlearning it"
        elif "stamp" not in stand_ins:
            what = (f"its stamp sends only {100 * st['fooled'][t]:.0f}%, its universal perturbation {moved}: "
                    "unlearning the perturbation")
        else:
            what = f"its stamp {sends}, its universal perturbation {moved}: unlearning both"
        return f"scan: backdoor, target class {t} (p = {scan['p_value']:.3g}); {what}"
    if st["found"] and scan is not None and "skipped" not in scan:  # shift always: the scan asked for its shift
        if "shift" in stand_ins:
            also = f"and the scan's universal perturbation toward it ({moved})"
        elif scan["target_class"] != t:
            also = f"alone (the scan names {'no target' if scan['target_class'] is None else scan['target_class']})"
        else:
            also = f"alone (the scan's universal perturbation moves {moved})"
        return f"stamp search: class {t} stands out by {st['outlier']:.1f} ({sends}); unlearning it {also}"
    if scan is not None and "skipped" in scan:  # too few classes for either test
        return (f"stamp search: {len(st['margins'])} classes: a stamp and the scan's statistics are judged "
                "against the other classes' (at least 3 classes needed): max-margin search")
    if scan is not None:
        if scan["target_class"] is None:
            why = f"the scan finds no target (p = {scan['p_value']:.3g})"
        else:
            c = scan["target_class"]
            also = f" (its universal perturbation {moved})" if scan.get("shift") else ""
            why = (f"the scan's target {c} (p = {scan['p_value']:.3g}) has a stamp that sends only "
                   f"{100 * st['fooled'][c]:.0f}% of D's other classes to it{also}")
        return f"stamp search: no stamp stands out and {why}: max-margin search"
    verdict = "unlearning it" if st["found"] else "below the gate"
    return f"stamp search: class {t} stands out by {st['outlier']:.1f} ({sends}); {verdict}"


def schedule_text(sc: dict) -> str:
    """The search's schedule: as configured, or what shrank to fit the time limit."""
    cost = f"{sc['backward_ms_per_row']:.3g} ms per row forward+backward"
    if sc.get("costs") == "reference":
        cost += " at reference rates"
    if not sc["changed"]:
        return f"schedule: as configured, about {duration(sc['planned_seconds'])} at most ({cost})"
    moved = ", ".join(f"{k} {a}->{b}" for k, (a, b) in sc["changed"].items())
    limit = f"--time-limit {sc['time_limit']:.4g} s{' (auto)' if sc.get('costs') == 'reference' else ''}"
    second = sc.get("second_stage")
    if second and second["default_seconds"] > second["time_left"]:  # the stage after the stamp search
        what = {"unlearn": "unlearning the stamp", "search": "the max-margin search"}.get(second["stage"],
                                                                                        second["stage"])
        return (f"schedule: {what} would take about {duration(second['default_seconds'])} ({cost}); shrunk to "
                f"the {duration(second['time_left'])} {limit} leaves after the stamp search: {moved}")
    return (f"schedule: the configured one would take about {duration(sc['default_seconds'])} ({cost}); "
            f"shrunk to fit {limit}: {moved}")


class Progress:
    """The progress display of one command (`with Progress(quiet, "MMAC") as progress:`);
    `progress` is None with -q. Call it with a row dict or as `progress(step, done, total)`."""

    def __init__(self, quiet: bool, title: str, *, interactive: bool | None = None, clock=time.monotonic):
        self.quiet = quiet or not leader()  # under torchrun, rank 0 shows the progress
        self.title = title
        self.interactive = interactive
        self.clock = clock
        self._bar = None
        self.stage: str | None = None
        self._step_name: str | None = None
        self._stage_start = self._last_line = 0.0
        self._last_count: int | None = None

    # --- context ------------------------------------------------------------------------

    def __enter__(self):
        if self.quiet:
            return None
        if self.interactive is None:
            self.interactive = console().is_terminal
        if self.interactive:
            from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), console=console(), transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.title, total=None, info="")
        self._stage_start = self._last_line = self.clock()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False

    # --- events -------------------------------------------------------------------------

    def __call__(self, row, done: int | None = None, total: int | None = None) -> None:
        if isinstance(row, str):  # scan, compare: (step, done, total)
            self._step(row, done, total)
        elif "stage" in row:
            self._start(row["stage"], row.get("n"))
        elif "step" in row:
            self._step(row["step"], row.get("done"), row.get("total"))
        elif "epoch" in row:
            self._epoch(row)
        else:
            text = info_text(row)
            if text:
                self._line(text, keep=True)

    def _start(self, stage: str, n: int | None = None) -> None:
        self.stage, self._step_name, self._last_count = stage, None, None
        self._stage_start = self.clock()
        self._line(stage + (f" ({n} inputs)" if n is not None else ""), keep=True)
        self._show(stage, "", None, None)

    def _epoch(self, row: dict) -> None:
        epoch, total = row["epoch"], row.get("max_epochs")
        left = self._left(epoch, total)
        text = epoch_text(row) + (f", at most {duration(left)} left" if left is not None else "")
        if self._due(epoch, EVERY_EPOCHS, total):
            self._line(f"{self.stage}: {text}" if self.stage else text)
        self._show(self.stage or "", text, epoch, total)

    def _step(self, step: str, done: int | None, total: int | None) -> None:
        """A step of a stage that counts its work (scan's ascent steps, compare's parts); `done`
        and `total` count from the start of the stage."""
        if self.stage is None:
            self._start(self.title)
        count = f" {done}/{total}" if done is not None and total else ""
        if step != self._step_name:
            self._step_name, self._last_count = step, done
            self._line(f"{step}{count}", keep=True)
        left = self._left(done, total)
        text = f"{step}{count}" + (f", about {duration(left)} left" if left is not None else "")
        if done and self._due(done, EVERY_STEPS, total):
            self._line(text)
        self._show(self.stage, text, done, total)

    # --- output -------------------------------------------------------------------------

    def _left(self, done: int | None, total: int | None) -> float | None:
        if not done or not total or done >= total:
            return None
        return (self.clock() - self._stage_start) / done * (total - done)

    def _due(self, count: int, every: int, total: int | None) -> bool:
        """Whether a plain line is due: every `every` counts, every EVERY_SECONDS, at the end."""
        last = self._last_count
        due = (last is None or count - last >= every or count == total
               or self.clock() - self._last_line >= EVERY_SECONDS)
        if due:
            self._last_count = count
        return due

    def _line(self, text: str, *, keep: bool = False) -> None:
        """A plain line; on a terminal only the lines worth keeping (`keep`) go above the bar,
        the rest is the bar's to show."""
        self._last_line = self.clock()
        if self._bar is None:
            click.echo(f"[{self.title}] {text}", err=True)
        elif keep:
            self._bar.console.print(f"{self.title}: {text}", highlight=False)

    def _show(self, description: str, info: str, done, total) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=f"{self.title} {description}".strip(), info=info,
                             completed=done, total=total)
