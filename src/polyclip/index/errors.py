"""Errors the index raises for mistakes a user can fix: a wrong folder, another model, a bad filter,
a full disk."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


class IndexStoreError(ValueError):
    """A user-facing index error: the message says what is wrong and how to fix it."""


class ModelMismatchError(IndexStoreError):
    """Vectors or queries come from another model (or preprocessing) than the one the index was built with."""


class IndexBusyError(IndexStoreError):
    """Another process is writing to the index folder."""


class DiskFullError(IndexStoreError):
    """A write found no space left; everything committed before it is kept, so a rerun resumes."""


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC from Python, SQLite's "database or disk is full", or FAISS's wrapped write error."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(error)
    return "database or disk is full" in text or "No space left on device" in text


@contextmanager
def disk_full_guard(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk while writing ``path`` into one clear `DiskFullError`."""
    try:
        yield
    except DiskFullError:
        raise
    except (OSError, RuntimeError, sqlite3.OperationalError) as error:
        if not is_disk_full(error):
            raise
        raise DiskFullError(
            f"no space left on device while writing {path}; free space and rerun to resume"
        ) from error
