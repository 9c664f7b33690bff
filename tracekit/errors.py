"""User-facing errors: the CLI prints the message as one line and exits 2, with no traceback."""


class TracekitError(Exception):
    """Bad input or an unusable environment; the message says what is wrong and how to fix it."""

    exit_code = 2
