"""Errors raised by the evaluation subpackage for mistakes a user can fix (bad data, bad options)."""


class EvalError(ValueError):
    """A user-facing evaluation error: the message says what is wrong and how to fix it."""


class DataError(EvalError):
    """A dataset, captions file or label file that is empty, malformed or inconsistent."""
