"""User-facing errors: one line that names the culprit and the fix."""


class SotoolError(Exception):
    """An error caused by the user's input; the CLI prints it as one line and exits 1."""
