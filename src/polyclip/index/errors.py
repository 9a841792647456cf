"""Errors the index raises for mistakes a user can fix: a wrong folder, another model, a bad filter."""


class IndexStoreError(ValueError):
    """A user-facing index error: the message says what is wrong and how to fix it."""


class ModelMismatchError(IndexStoreError):
    """Vectors or queries come from another model (or preprocessing) than the one the index was built with."""


class IndexBusyError(IndexStoreError):
    """Another process is writing to the index folder."""
