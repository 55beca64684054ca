"""The one exception type for bad input: the CLI turns it into one line and exit code 1."""


class CheckpointError(Exception):
    """An input that cannot be converted as asked: the message says what, where, and the fix."""
