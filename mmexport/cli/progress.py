"""Progress displays: a rich bar over a search's stages and epochs; nothing when quiet."""

from __future__ import annotations

from .main import console


class Stages:
    """A rich progress bar over named stages (compare) or search steps (scan); None when quiet."""

    transient = True

    def __init__(self, quiet: bool, title: str):
        self.quiet = quiet
        self.title = title

    def __enter__(self):
        if self.quiet:
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                           TimeElapsedColumn(), console=console(), transient=self.transient)
        self._p.__enter__()
        self._task = self._p.add_task(self.title, total=None, info="")
        return self._update

    def _update(self, info: str, done: int | None = None, total: int | None = None) -> None:
        self._p.update(self._task, info=info, completed=done, total=total)

    def __exit__(self, *exc):
        if not self.quiet:
            self._p.__exit__(*exc)
        return False


class SearchProgress(Stages):
    """One line per accuracy check of the bound search: epoch, lambda, accuracy on D, objective."""

    transient = False

    def __init__(self, quiet: bool, method: str):
        super().__init__(quiet, method.upper())

    def _update(self, row: dict) -> None:
        if "cv" in row:
            cv = row["cv"]
            self._p.console.print(f"cross-validation: lambda {cv['lambda']:g} -> held-out balanced "
                                  f"accuracy {cv['balanced_accuracy']:.3f}")
            return
        if "stamp" in row:
            st = row["stamp"]
            verdict = "unlearning it" if st["found"] else "below the gate: max-margin search"
            self._p.console.print(f"stamp search: class {st['target']} stands out by {st['outlier']:.1f} "
                                  f"(sends {100 * st['fooled'][st['target']]:.0f}% of D's other classes to it); "
                                  f"{verdict}")
            return
        if row.get("phase") == "unlearn":
            info = (f"epoch {row['epoch']}  weight {row['lambda']:.3g}  acc(D) {row['accuracy']:.3f}  "
                    f"stamped held-out to class {100 * row['objective']:.1f}%")
        else:
            info = (f"epoch {row['epoch']}  lambda {row['lambda']:.3g}  acc(D) {row['accuracy']:.3f}  "
                    f"margin objective {row['objective']:.2f}")
        super()._update(info, row["epoch"], row.get("max_epochs"))
