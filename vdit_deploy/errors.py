"""The one error type users see: the CLI prints its message on one line and exits non-zero."""


class VditError(Exception):
    """A problem with the user's input or artifacts, explained in one line."""
