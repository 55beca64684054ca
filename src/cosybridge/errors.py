"""The one exception type for bad input: the CLI turns it into one line and exit code 1."""


class CheckpointError(Exception):
    """An input that cannot be converted as asked: the message says what, where, and the fix."""


def error_line(e: BaseException) -> str:
    """What the CLI prints after "cosybridge: " for a failure: bad input, a failed write, or our own bug."""
    if isinstance(e, CheckpointError):
        return f"error: {e}"
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return f"error: {e.strerror or e}{where}; no output was left behind"
    return f"internal error: {type(e).__name__}: {e} (rerun with --debug and report it)"
