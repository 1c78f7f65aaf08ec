"""The one error type for user mistakes."""


class MmexportError(Exception):
    """A problem with the user's input (file, data, option), not a bug.

    The message names the file, node or key at fault; the CLI prints it on one
    line and exits 1, without a traceback.
    """


def first_line(exc: BaseException) -> str:
    """The first non-blank line of an exception's message: third-party errors span pages."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


class ParameterError(MmexportError):
    """A parameter out of range or unknown: `param` names it as the Python API spells it.

    The CLI shows it as the matching flag (`acc_floor` -> `--acc-floor`).
    """

    def __init__(self, param: str, message: str):
        self.param = param
        self.detail = message
        super().__init__(f"{param}: {message}")


class OutputExistsError(MmexportError):
    """An output file exists and the call did not ask to overwrite it (`force`)."""
