"""Files that long jobs write and resume from: stable names, a clear error on a full disk, and logs that
survive a crash in the middle of a line.

The jobs (``polyclip embed``, training checkpoints, index builds) write to temporary names and rename,
so a failed write loses nothing; what this module adds is that the failure is reported as what it is, and
that the files a rerun reads back are read the same way however the user spelled the paths.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# "No space left on device" and "disk quota exceeded": both mean the same to the user
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(OSError):
    """A write failed because the disk (or the user's quota) is full; the job can be rerun to resume."""

    def __str__(self) -> str:
        return self.strerror  # the sentence alone, without "[Errno 28]"


def _is_disk_full(error: BaseException) -> bool:
    # torch and pyarrow wrap the OSError of the failed write in errors of their own; safetensors and
    # sqlite only say it in words
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FULL:
            return True
        text = str(error).lower()
        if any(
            phrase in text
            for phrase in ("no space left on device", "disk quota exceeded", "database or disk is full")
        ):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_error(error: BaseException, what: str | os.PathLike) -> DiskFullError | None:
    """The user-facing error for ``error`` when it (or what it wraps) is a full disk, else None."""
    if not _is_disk_full(error):
        return None
    return DiskFullError(
        errno.ENOSPC, f"no space left on device while writing {what}; free space and rerun to resume"
    )


@contextmanager
def reporting_disk_full(what: str | os.PathLike) -> Iterator[None]:
    """Turn a full-disk failure inside the block into a `DiskFullError` naming ``what``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        translated = disk_full_error(error, what)
        if translated is None:
            raise
        raise translated from error


def stable_path(path: str | os.PathLike) -> str:
    """An absolute name for ``path`` that is the same however it was reached (``DIR``, ``./DIR``,
    ``/abs/DIR``, a symlink to ``DIR``): the folders are resolved, the file's own name is kept (a symlinked
    file stays a separate entry under its own name)."""
    path = Path(path).expanduser().absolute()
    return str(path.parent.resolve() / path.name)


def read_jsonl_log(path: Path) -> list[Any]:
    """The records of an append-only JSON-lines log, surviving a torn write.

    A crash or a full disk can leave the last line cut short; lines that do not parse are dropped, and
    the file is rewritten without them so that the next append starts on a fresh line. A dropped record
    is only work that will be done again.
    """
    if not path.is_file():
        return []
    raw = path.read_bytes()
    records, clean = [], True
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except (UnicodeDecodeError, json.JSONDecodeError):
            clean = False
    if not clean or (raw and not raw.endswith(b"\n")):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
        tmp.replace(path)
    return records


def append_jsonl(file, record: Any) -> None:
    """Append one record as one line with a single write, flushed, so a crash tears at most that line."""
    file.write(json.dumps(record) + "\n")
    file.flush()


__all__ = [
    "DiskFullError",
    "append_jsonl",
    "disk_full_error",
    "read_jsonl_log",
    "reporting_disk_full",
    "stable_path",
]
