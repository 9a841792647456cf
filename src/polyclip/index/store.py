"""SQLite store: the index's source of truth for items, which vector rows they own, and the change log.

Tables:
  items     id INTEGER PRIMARY KEY AUTOINCREMENT (ids are never reused), path UNIQUE, caption,
            metadata (JSON object), added_at (unix time)
  vectors   (space, item_id) -> row of the space's float16 `VectorStore`; space is "image" or
            "caption". The vectors themselves live once, in the store's .npy shards, not here.
  changes   append-only log (seq, space, item_id, op) of every vector added or removed; a FAISS index
            saved at seq S is brought up to date by replaying the changes after S
  failures  files that could not be decoded, with the reason (retried on the next build)
  info      key/value pairs (``next_row:<space>``: the first row of the vector store not yet owned)

Every write is one transaction, so a process killed at any moment leaves either all or none of a
batch. The database runs in WAL mode: a service reading it is never blocked by a build writing it.
Connections are per thread (sqlite3 objects must not cross threads).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyclip.index.errors import IndexStoreError
from polyclip.index.vector_store import VectorStore

SPACES = ("image", "caption")

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    caption TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    added_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vectors (
    space TEXT NOT NULL,
    item_id INTEGER NOT NULL REFERENCES items(id) ON DELETE CASCADE,
    row INTEGER NOT NULL,
    UNIQUE (space, item_id)
);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    space TEXT NOT NULL,
    item_id INTEGER NOT NULL,
    op TEXT NOT NULL CHECK (op IN ('add', 'remove'))
);
CREATE INDEX IF NOT EXISTS changes_by_space ON changes (space, seq);
CREATE TABLE IF NOT EXISTS failures (path TEXT PRIMARY KEY, reason TEXT NOT NULL, failed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Metadata keys become JSON paths; only plain names are accepted, so a key can never inject SQL or a path.
METADATA_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
FILTER_SPECIAL_KEYS = ("path_prefix", "ids")
SQL_CHUNK = 900  # stays under SQLite's default limit of host parameters per statement


@dataclass
class NewItem:
    """One item to add: its file, optional caption and metadata, and its vectors per space."""

    path: str
    vectors: dict[str, np.ndarray]  # space -> (E,) float32
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class ItemRecord:
    id: int
    path: str
    caption: str | None
    metadata: dict[str, Any]
    added_at: float


def _chunks(values: Sequence, size: int = SQL_CHUNK) -> Iterator[Sequence]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


class MetadataStore:
    def __init__(self, path: str | Path, vectors: dict[str, VectorStore], readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.vectors = vectors  # space -> its float16 row store
        self._local = threading.local()
        self._write_lock = threading.Lock()  # one writer per process; SQLite serialises processes
        if not readonly:
            with self._connection() as db:
                if not self.has_row_schema(db):  # a blob table of an older index: migrated first
                    return
                db.executescript(SCHEMA)
        elif not self.path.is_file():
            raise IndexStoreError(f"{self.path} does not exist")

    def has_row_schema(self, db: sqlite3.Connection | None = None) -> bool:
        """False for a store written by polyclip before vectors moved out of SQLite (format 1)."""
        db = db or self._connection()
        columns = [row[1] for row in db.execute("PRAGMA table_info(vectors)")]
        return not columns or "row" in columns

    def migrate_blob_vectors(self, chunk_rows: int = 65_536) -> int:
        """Move format-1 float32 blobs into the vector stores, in one transaction; returns the rows moved.

        Killed midway, the transaction rolls back and the rows written to the stores are reused by
        the next attempt. Afterwards the database is vacuumed, so the float32 copy leaves the disk.
        """
        moved = 0
        with self._transaction() as db:
            if self.has_row_schema(db):
                return 0
            db.execute(
                "CREATE TABLE vectors_rows (space TEXT NOT NULL, item_id INTEGER NOT NULL "
                "REFERENCES items(id) ON DELETE CASCADE, row INTEGER NOT NULL, UNIQUE (space, item_id))"
            )
            for space, store in self.vectors.items():
                last_id, next_row = -1, 0
                while True:
                    rows = db.execute(
                        "SELECT item_id, vector FROM vectors WHERE space = ? AND item_id > ? "
                        "ORDER BY item_id LIMIT ?",
                        (space, last_id, chunk_rows),
                    ).fetchall()
                    if not rows:
                        break
                    last_id = rows[-1][0]
                    blob = b"".join(row[1] for row in rows)
                    store.write(next_row, np.frombuffer(blob, "<f4").reshape(len(rows), store.dim))
                    db.executemany(
                        "INSERT INTO vectors_rows (space, item_id, row) VALUES (?, ?, ?)",
                        [(space, row[0], next_row + i) for i, row in enumerate(rows)],
                    )
                    next_row += len(rows)
                    moved += len(rows)
                db.execute(
                    "INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)",
                    (f"next_row:{space}", str(next_row)),
                )
            db.execute("DROP TABLE vectors")
            db.execute("ALTER TABLE vectors_rows RENAME TO vectors")
        with self._connection() as db:
            db.executescript(SCHEMA)
        self._connection().execute("VACUUM")
        return moved

    # -- connections
    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            # Read-only stores open the file normally (a WAL reader may need to create the -shm file);
            # the flag only forbids writes through this object.
            db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=True)
            if not self.readonly:
                db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # with WAL, survives a killed process
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
            self._local.depth = 0
        return db

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every read of this thread inside it sees one consistent state (reentrant)."""
        db = self._connection()
        if self._local.depth == 0:
            db.execute("BEGIN")
        self._local.depth += 1
        try:
            yield db
        finally:
            self._local.depth -= 1
            if self._local.depth == 0:
                db.execute("COMMIT")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise IndexStoreError(f"{self.path} is opened read-only")
        with self._write_lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- info
    def get_info(self, key: str) -> str | None:
        row = self._connection().execute("SELECT value FROM info WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_info(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)", (key, value))

    # -- writes
    def add_items(
        self, items: Sequence[NewItem], failures: Sequence[tuple[str, str]] = ()
    ) -> list[int | None]:
        """Insert items and their vectors in one transaction; an already indexed path is left as it is.

        Returns the new id of each item, None for a path that was already there (or given twice).
        Vectors are written to the stores and flushed before the transaction that names their rows
        commits. ``failures`` (path, reason) are recorded in the same transaction; a path that now
        succeeds loses its failure row.
        """
        now = time.time()
        with self._transaction() as db:
            present = self._existing_paths(db, [item.path for item in items])
            new_items: list[NewItem] = []
            for item in items:
                if item.path not in present:
                    present.add(item.path)
                    new_items.append(item)
            before = int(db.execute("SELECT COALESCE(MAX(id), 0) FROM items").fetchone()[0])
            db.executemany(
                "INSERT INTO items (path, caption, metadata, added_at) VALUES (?, ?, ?, ?)",
                [(i.path, i.caption, json.dumps(i.metadata, sort_keys=True), now) for i in new_items],
            )
            # ids are assigned in insertion order under this exclusive transaction
            new_ids = [
                row[0] for row in db.execute("SELECT id FROM items WHERE id > ? ORDER BY id", (before,))
            ]
            assert len(new_ids) == len(new_items)
            by_path = {item.path: item_id for item, item_id in zip(new_items, new_ids)}
            for space in SPACES:
                owners = [
                    (item_id, item.vectors[space])
                    for item, item_id in zip(new_items, new_ids)
                    if space in item.vectors
                ]
                if not owners:
                    continue
                first = self._next_row(db, space)
                self.vectors[space].write(first, np.stack([vector for _, vector in owners]))
                db.executemany(
                    "INSERT INTO vectors (space, item_id, row) VALUES (?, ?, ?)",
                    [(space, item_id, first + n) for n, (item_id, _) in enumerate(owners)],
                )
                db.executemany(
                    "INSERT INTO changes (space, item_id, op) VALUES (?, ?, 'add')",
                    [(space, item_id) for item_id, _ in owners],
                )
                db.execute(
                    "INSERT OR REPLACE INTO info (key, value) VALUES (?, ?)",
                    (f"next_row:{space}", str(first + len(owners))),
                )
            db.executemany("DELETE FROM failures WHERE path = ?", [(i.path,) for i in new_items])
            db.executemany(
                "INSERT OR REPLACE INTO failures (path, reason, failed_at) VALUES (?, ?, ?)",
                [(path, reason, now) for path, reason in failures],
            )
        ids: list[int | None] = []
        for item in items:
            ids.append(by_path.pop(item.path, None))  # a path given twice gets its id once
        return ids

    def _next_row(self, db: sqlite3.Connection, space: str) -> int:
        row = db.execute("SELECT value FROM info WHERE key = ?", (f"next_row:{space}",)).fetchone()
        return 0 if row is None else int(row[0])

    def remove_items(self, ids: Sequence[int]) -> None:
        """Delete items and their vectors, logging the removals, in one transaction."""
        with self._transaction() as db:
            for chunk in _chunks(list(ids)):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT space, item_id FROM vectors WHERE item_id IN ({marks})", tuple(chunk)
                ).fetchall()
                db.executemany("INSERT INTO changes (space, item_id, op) VALUES (?, ?, 'remove')", rows)
                db.execute(f"DELETE FROM vectors WHERE item_id IN ({marks})", tuple(chunk))
                db.execute(f"DELETE FROM items WHERE id IN ({marks})", tuple(chunk))

    # -- reads
    def count(self) -> int:
        return self._connection().execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def count_vectors(self, space: str) -> int:
        return (
            self._connection().execute("SELECT COUNT(*) FROM vectors WHERE space = ?", (space,)).fetchone()[0]
        )

    def has_vectors(self, space: str) -> bool:
        row = self._connection().execute("SELECT 1 FROM vectors WHERE space = ? LIMIT 1", (space,)).fetchone()
        return row is not None

    def last_change(self) -> int:
        row = self._connection().execute("SELECT MAX(seq) FROM changes").fetchone()
        return int(row[0] or 0)

    def changes_since(self, space: str, seq: int) -> tuple[int, list[tuple[int, str]]] | None:
        """(newest seq, [(item_id, op)] of ``space`` after ``seq``), read in one snapshot; None when the
        log no longer reaches back to ``seq`` (compacted since): the caller reloads instead."""
        with self.snapshot() as db:
            if seq + 1 < self.compacted_through():
                return None
            last = int(db.execute("SELECT MAX(seq) FROM changes").fetchone()[0] or 0)
            rows = db.execute(
                "SELECT item_id, op FROM changes WHERE space = ? AND seq > ? AND seq <= ? ORDER BY seq",
                (space, seq, last),
            ).fetchall()
        return last, rows

    def compacted_through(self) -> int:
        """Changes before this sequence number have been deleted from the log (0: none ever were)."""
        return int(self.get_info("compacted_through") or 0)

    def compact_changes(self, through: int) -> int:
        """Delete the changes before ``through``, which every saved vector file already reflects.

        The change at ``through`` itself stays, so the newest sequence number (MAX(seq)) never goes
        back; a reader whose vectors are older than the kept log finds `changes_since` answer None and
        reloads the saved files. Returns the number of changes deleted.
        """
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM changes WHERE seq < ?", (through,)).rowcount
            if deleted:
                db.execute(
                    "INSERT OR REPLACE INTO info (key, value) VALUES ('compacted_through', ?)",
                    (str(through),),
                )
        return deleted

    def existing_paths(self, paths: Sequence[str]) -> set[str]:
        return self._existing_paths(self._connection(), paths)

    def _existing_paths(self, db: sqlite3.Connection, paths: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(list(paths)):
            marks = ",".join("?" * len(chunk))
            found.update(
                row[0] for row in db.execute(f"SELECT path FROM items WHERE path IN ({marks})", chunk)
            )
        return found

    def existing_ids(self, ids: Sequence[int]) -> set[int]:
        db = self._connection()
        found: set[int] = set()
        for chunk in _chunks(list(ids)):
            marks = ",".join("?" * len(chunk))
            found.update(row[0] for row in db.execute(f"SELECT id FROM items WHERE id IN ({marks})", chunk))
        return found

    def get_items(self, ids: Iterable[int]) -> dict[int, ItemRecord]:
        db = self._connection()
        out: dict[int, ItemRecord] = {}
        for chunk in _chunks(list(ids)):
            marks = ",".join("?" * len(chunk))
            for row in db.execute(
                f"SELECT id, path, caption, metadata, added_at FROM items WHERE id IN ({marks})", chunk
            ):
                out[row[0]] = ItemRecord(row[0], row[1], row[2], json.loads(row[3]), row[4])
        return out

    def get_vectors(self, space: str, ids: Sequence[int], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (N,) int64, vectors (N, dim) float32) of those ``ids`` that have a vector in ``space``."""
        db = self._connection()
        found: list[tuple[int, int]] = []
        for chunk in _chunks(list(ids)):
            marks = ",".join("?" * len(chunk))
            found += db.execute(
                f"SELECT item_id, row FROM vectors WHERE space = ? AND item_id IN ({marks})",
                (space, *chunk),
            ).fetchall()
        return self._read(space, found, dim)

    def _read(self, space: str, pairs: list[tuple[int, int]], dim: int) -> tuple[np.ndarray, np.ndarray]:
        if not pairs:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        pairs_array = np.asarray(pairs, np.int64)  # (N, 2): item id, row
        return pairs_array[:, 0].copy(), self.vectors[space].read(pairs_array[:, 1])

    def iter_vectors(
        self, space: str, dim: int, chunk_rows: int = 65_536
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All vectors of ``space`` in id order, ``chunk_rows`` at a time: (ids (n,), vectors (n, dim))."""
        db = self._connection()
        last_id = -1
        while True:
            rows = db.execute(
                "SELECT item_id, row FROM vectors WHERE space = ? AND item_id > ? ORDER BY item_id LIMIT ?",
                (space, last_id, chunk_rows),
            ).fetchall()
            if not rows:
                return
            last_id = rows[-1][0]
            yield self._read(space, rows, dim)

    def sample_vectors(self, space: str, n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A seeded uniform sample of ``n`` vectors of ``space`` (for training and calibrating IVF).

        The mapping is scanned in chunks and only the chosen rows are kept, so memory stays at the
        sample's size whatever the collection's.
        """
        total = self.count_vectors(space)
        rng = np.random.default_rng(seed)
        chosen = (
            np.sort(rng.choice(total, size=min(n, total), replace=False)) if total else np.zeros(0, np.int64)
        )
        picked: list[np.ndarray] = []
        position = 0
        cursor = self._connection().execute(
            "SELECT item_id, row FROM vectors WHERE space = ? ORDER BY item_id", (space,)
        )
        while True:
            rows = cursor.fetchmany(65_536)
            if not rows:
                break
            lo, hi = np.searchsorted(chosen, [position, position + len(rows)])
            if hi > lo:
                picked.append(np.asarray(rows, np.int64)[chosen[lo:hi] - position])
            position += len(rows)
        if not picked:
            return np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
        pairs = np.concatenate(picked)
        return pairs[:, 0].copy(), self.vectors[space].read(pairs[:, 1])

    def all_ids(self, space: str) -> np.ndarray:
        cursor = self._connection().execute("SELECT item_id FROM vectors WHERE space = ?", (space,))
        parts = []
        while rows := cursor.fetchmany(65_536):
            parts.append(np.asarray(rows, np.int64).reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def failures(self) -> list[tuple[str, str]]:
        return [
            tuple(row)
            for row in self._connection().execute("SELECT path, reason FROM failures ORDER BY path")
        ]

    def path_of(self, item_id: int) -> str | None:
        row = self._connection().execute("SELECT path FROM items WHERE id = ?", (item_id,)).fetchone()
        return None if row is None else row[0]

    def list_items(self, limit: int = 100, offset: int = 0) -> list[ItemRecord]:
        rows = self._connection().execute(
            "SELECT id, path, caption, metadata, added_at FROM items ORDER BY id LIMIT ? OFFSET ?",
            (limit, offset),
        )
        return [ItemRecord(r[0], r[1], r[2], json.loads(r[3]), r[4]) for r in rows]

    # -- filters
    def filter_ids(self, conditions: dict[str, Any]) -> np.ndarray:
        """Ids of the items matching every condition (see `compile_filter`), sorted."""
        where, params = compile_filter(conditions)
        rows = self._connection().execute(f"SELECT id FROM items WHERE {where} ORDER BY id", params)
        return np.array([row[0] for row in rows], np.int64)


def compile_filter(conditions: dict[str, Any]) -> tuple[str, list[Any]]:
    """A filter dict -> (SQL condition, parameters).

    ``{"key": value}`` matches items whose metadata has exactly that value (string, number, boolean or
    null); ``{"key": [v1, v2]}`` matches any of the values; ``"path_prefix"`` matches the start of the
    indexed path; ``"ids"`` restricts to a list of item ids. All conditions must hold.
    """
    if not isinstance(conditions, dict):
        raise IndexStoreError(f"a filter must be an object of conditions, got {type(conditions).__name__}")
    clauses: list[str] = []
    params: list[Any] = []
    for key, value in conditions.items():
        if key == "path_prefix":
            if not isinstance(value, str) or not value:
                raise IndexStoreError("filter 'path_prefix' must be a non-empty string")
            clauses.append("substr(path, 1, ?) = ?")
            params += [len(value), value]
            continue
        if key == "ids":
            if not isinstance(value, list) or not all(_is_int64(v) for v in value):
                raise IndexStoreError("filter 'ids' must be a list of integer item ids")
            if len(value) > 10_000:
                raise IndexStoreError("filter 'ids' takes at most 10,000 ids")
            clauses.append(f"id IN ({','.join('?' * len(value))})" if value else "0")
            params += value
            continue
        if not isinstance(key, str) or not METADATA_KEY.match(key):
            raise IndexStoreError(
                f"filter key {key!r} is not a plain metadata name (letters, digits, '_' and '-', at most 64)"
            )
        values = value if isinstance(value, list) else [value]
        if not values or len(values) > 1000:
            raise IndexStoreError(f"filter {key!r} needs between 1 and 1,000 values")
        alternatives = []
        for option in values:
            json_path = f'$."{key}"'
            if option is None:
                alternatives.append("(json_type(metadata, ?) = 'null')")
                params.append(json_path)
            elif isinstance(option, bool):
                alternatives.append(f"(json_type(metadata, ?) = '{'true' if option else 'false'}')")
                params.append(json_path)
            elif isinstance(option, int) and not _is_int64(option):
                raise IndexStoreError(f"filter {key!r}: the integer {option} is out of range")
            elif isinstance(option, int | float | str):
                alternatives.append(
                    "(json_extract(metadata, ?) = ? AND json_type(metadata, ?) NOT IN ('true', 'false'))"
                )
                params += [json_path, option, json_path]
            else:
                raise IndexStoreError(
                    f"filter {key!r}: values must be strings, numbers, booleans or null, got {type(option).__name__}"
                )
        clauses.append("(" + " OR ".join(alternatives) + ")")
    return (" AND ".join(clauses) or "1"), params


def _is_int64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
