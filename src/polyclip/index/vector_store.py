"""The raw vectors of an index, stored once: float16 rows in fixed-capacity ``.npy`` shard files.

Layout: ``vectors/<space>-<shard>.npy``, each a standard NumPy file of shape (rows_per_shard, dim)
and dtype float16 (half the size of float32; a unit vector's components lose about 5e-4 of their
value, cosine scores about 1e-4). Files are created sparse, so unused rows cost no disk. Any shard can be
opened with ``numpy.load(path, mmap_mode="r")``.

Which row holds which item is recorded in SQLite (``vectors(space, item_id, row)``, see `store`), in
the same transaction that commits the item, after the row was written and flushed here. A process
killed between the two leaves rows no committed mapping names; the next write reuses them. Rows of
removed items stay until the index is rebuilt elsewhere.

Reads and writes go through ``os.pread``/``os.pwrite`` rather than a memory map: a full disk is then
an ``OSError(ENOSPC)`` instead of a SIGBUS, and reading a sample of a large store does not keep its
pages in the process's resident memory.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from polyclip.index.errors import disk_full_guard

STORE_FOLDER = "vectors"
ROW_DTYPE = np.dtype("<f2")
SHARD_BYTES = 1 << 30  # 1 GiB of rows per file: ~1M rows at d=512


class VectorStore:
    """float16 rows of one space, addressed by row number (0, 1, 2, ...)."""

    def __init__(self, folder: str | Path, space: str, dim: int, rows_per_shard: int | None = None) -> None:
        self.folder = Path(folder)
        self.space = space
        self.dim = int(dim)
        self.row_bytes = self.dim * ROW_DTYPE.itemsize
        self.rows_per_shard = int(rows_per_shard or max(1, SHARD_BYTES // self.row_bytes))
        self._handles: dict[tuple[int, bool], tuple[int, int]] = {}  # (shard, writable) -> (fd, offset)
        self._lock = threading.Lock()

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"{self.space}-{shard:05d}.npy"

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"{self.space}-*.npy"))

    def disk_bytes(self) -> int:
        """Bytes allocated on disk (sparse files count only written blocks)."""
        return sum(path.stat().st_blocks * 512 for path in self.files())

    # -- files
    def _open(self, shard: int, writable: bool) -> tuple[int, int]:
        key = (shard, writable)
        with self._lock:
            found = self._handles.get(key)
            if found is not None:
                return found
            path = self.shard_path(shard)
            if writable and not path.exists():
                self._create(path)
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
            with open(path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(handle)
                offset = handle.tell()
            if shape != (self.rows_per_shard, self.dim) or np.dtype(dtype) != ROW_DTYPE:
                os.close(fd)
                raise OSError(
                    f"{path}: holds {dtype} {shape}, expected float16 {(self.rows_per_shard, self.dim)}"
                )
            self._handles[key] = (fd, offset)
            return fd, offset

    def _create(self, path: Path) -> None:
        """A sparse .npy of the shard's full shape: only its header is written."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        header = {"descr": ROW_DTYPE.str, "fortran_order": False, "shape": (self.rows_per_shard, self.dim)}
        with open(tmp, "wb") as handle:
            np.lib.format.write_array_header_1_0(handle, header)
            handle.truncate(handle.tell() + self.rows_per_shard * self.row_bytes)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._handles.values():
                os.close(fd)
            self._handles.clear()

    # -- rows
    def write(self, first_row: int, vectors: np.ndarray) -> None:
        """Write (n, dim) vectors at rows first_row ... first_row + n - 1, then flush them to disk."""
        data = np.ascontiguousarray(vectors, dtype=ROW_DTYPE)
        if data.ndim != 2 or data.shape[1] != self.dim:
            raise ValueError(f"vectors of shape {data.shape}, the store holds {self.dim}-d rows")
        touched: dict[int, int] = {}  # fd -> shard
        row, start = first_row, 0
        while start < len(data):
            shard, within = divmod(row, self.rows_per_shard)
            count = min(len(data) - start, self.rows_per_shard - within)
            with disk_full_guard(self.shard_path(shard)):
                fd, offset = self._open(shard, writable=True)
                payload = memoryview(data[start : start + count]).cast("B")
                position = offset + within * self.row_bytes
                while payload:  # pwrite may write less than asked
                    written = os.pwrite(fd, payload, position)
                    payload, position = payload[written:], position + written
            touched[fd] = shard
            row, start = row + count, start + count
        for fd, shard in touched.items():
            with disk_full_guard(self.shard_path(shard)):
                os.fdatasync(fd)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """(n,) row numbers -> (n, dim) float32, in the order given; consecutive rows are read together."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        # runs of consecutive rows within one shard: (start index, end index) into sorted_rows
        breaks = np.flatnonzero(
            (np.diff(sorted_rows) != 1) | (np.diff(sorted_rows // self.rows_per_shard) != 0)
        )
        starts = np.concatenate([[0], breaks + 1])
        ends = np.concatenate([breaks + 1, [len(sorted_rows)]])
        buffer = np.empty((len(rows), self.dim), ROW_DTYPE)
        for begin, end in zip(starts.tolist(), ends.tolist()):
            shard, within = divmod(int(sorted_rows[begin]), self.rows_per_shard)
            fd, offset = self._open(shard, writable=False)
            nbytes = (end - begin) * self.row_bytes
            data = os.pread(fd, nbytes, offset + within * self.row_bytes)
            if len(data) != nbytes:
                raise OSError(f"{self.shard_path(shard)} is truncated")
            buffer[begin:end] = np.frombuffer(data, ROW_DTYPE).reshape(end - begin, self.dim)
        out[order] = buffer
        return out
