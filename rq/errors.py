"""User-facing errors: one line that names the problem and the fix. The CLI prints them without a
traceback and exits non-zero; library callers can catch :class:`RQError`."""


class RQError(Exception):
    """An error caused by the user's input (file, model, plan, option), with the fix in the message."""
