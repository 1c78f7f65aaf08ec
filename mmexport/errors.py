"""The one error type for user mistakes."""


class MmexportError(Exception):
    """A problem with the user's input (file, data, option), not a bug.

    The message names the file, node or key at fault; the CLI prints it on one
    line and exits 1, without a traceback.
    """
