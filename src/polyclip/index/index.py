"""The index folder: model identity, FAISS vectors per space, SQLite metadata, kept consistent.

Layout of the folder:
  index.json        format version, the model identity (source, weights fingerprint, preprocessing,
                    tokenizer, dtype), the index configuration (memory budget, query time), and per
                    space the FAISS index kind, its parameters and the change sequence number it was
                    saved at
  vectors/          the raw vectors, once: float16 .npy shards per space (see `vector_store`)
  vectors.faiss     image index;  captions.faiss: caption index (when captions were given)
  metadata.sqlite   items, the store row of each vector, the change log (see `store`)
  write.lock        held by the one process allowed to write

SQLite and the vector store are the source of truth and every write is one transaction. The FAISS
files are derived: each records the change number it reflects, and opening replays the changes after
it (or rebuilds from the stored vectors if a file is missing). A writer holds its FAISS indexes in
RAM; a reader maps IVF indexes from disk (FAISS ``IO_FLAG_MMAP``), so an index larger than RAM answers
queries, and keeps the changes replayed since the file was saved beside it: added vectors in a small
exact index whose results are merged by score, removed ones masked.

Format 1 (vectors as float32 blobs in SQLite) is migrated on open: the blobs move to the vector store
and the database is vacuumed. So a process killed at any moment, including while saving, loses no
committed item and never duplicates one. A reader (the service) replays the changes other processes
commit, so items added with `polyclip index add` become searchable without a restart.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyclip.index import vectors as vector_ops
from polyclip.index.encoder import QueryEmbeddings
from polyclip.index.errors import IndexBusyError, IndexStoreError, ModelMismatchError, disk_full_guard
from polyclip.index.identity import ModelIdentity
from polyclip.index.store import SPACES, ItemRecord, MetadataStore, NewItem
from polyclip.index.vector_store import STORE_FOLDER, VectorStore
from polyclip.index.vectors import IndexSpec, VectorIndexConfig

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: vectors in SQLite, migrated on open
INDEX_JSON = "index.json"
METADATA_FILE = "metadata.sqlite"
LOCK_FILE = "write.lock"
FAISS_FILES = {"image": "vectors.faiss", "caption": "captions.faiss"}
# On an IVF index, filters matching at most this many items are answered exactly from the stored
# vectors (the few lists probed would hold few of them); larger ones probe proportionally more lists.
# A flat index answers every filter exactly through a FAISS id selector.
EXACT_FILTER_LIMIT = 4_096


@dataclass
class SearchHit:
    id: int
    score: float
    path: str
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "score": self.score,
            "path": self.path,
            "caption": self.caption,
            "metadata": self.metadata,
        }


@dataclass
class _LoadedSpace:
    index: Any  # a FAISS index
    spec: IndexSpec
    applied_seq: int  # every change up to this sequence number is in `index` (or delta / hidden)
    mapped: bool = False  # read from a memory-mapped file: never modified
    delta: Any = None  # IDMap2(Flat) of vectors added since the file, when `index` cannot take them
    hidden: set[int] = field(default_factory=set)  # ids removed from `index` that it cannot delete

    @property
    def can_add(self) -> bool:
        return not self.mapped

    @property
    def can_remove(self) -> bool:
        return not self.mapped and self.spec.type != "hnsw"

    @property
    def count(self) -> int:
        extra = int(self.delta.ntotal) if self.delta is not None else 0
        return int(self.index.ntotal) + extra - len(self.hidden)


class Index:
    """An index folder opened for reading, or for writing (one writing process at a time)."""

    def __init__(
        self, folder: str | Path, writable: bool = False, config: VectorIndexConfig | None = None
    ) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / INDEX_JSON
        if not manifest_path.is_file():
            raise IndexStoreError(
                f"{self.folder} is not a polyclip index (no {INDEX_JSON}); build one with 'polyclip index build'"
            )
        self._manifest = _read_manifest(manifest_path)
        self.identity = ModelIdentity.from_dict(self._manifest["model"])
        self.config = config or VectorIndexConfig.from_dict(self._manifest.get("vector_config", {}))
        self.writable = writable
        self._lock_handle = self._acquire_write_lock() if writable else None
        dim = self.identity.embed_dim
        self.vectors = {space: VectorStore(self.folder / STORE_FOLDER, space, dim) for space in SPACES}
        if self._manifest["format_version"] != FORMAT_VERSION:
            self._migrate()
        self.store = MetadataStore(self.folder / METADATA_FILE, self.vectors, readonly=not writable)
        self._spaces: dict[str, _LoadedSpace] = {}
        self._lock = ReadWriteLock()  # FAISS objects: concurrent searches, exclusive replays and saves

    # -- creation
    @classmethod
    def create(
        cls, folder: str | Path, identity: ModelIdentity, config: VectorIndexConfig | None = None
    ) -> Index:
        """A new empty index; an existing index of the same model is opened for writing instead."""
        folder = Path(folder)
        if (folder / INDEX_JSON).is_file():
            recorded = ModelIdentity.from_dict(json.loads((folder / INDEX_JSON).read_text())["model"])
            recorded.check_compatible(identity, f"a build with {identity.source!r}")
            return cls(folder, writable=True, config=config)
        if folder.exists() and any(p for p in folder.iterdir() if p.name != "shards"):
            raise IndexStoreError(f"{folder} exists and is not an index; choose an empty or new folder")
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": identity.to_dict(),
            "vector_config": asdict(config or VectorIndexConfig()),
            "spaces": {},
        }
        _write_json_atomic(folder / INDEX_JSON, manifest)
        return cls(folder, writable=True, config=config)

    def _migrate(self) -> None:
        """Format 1 -> 2: vectors from SQLite blobs into the float16 store, under the write lock."""
        handle = self._lock_handle or self._acquire_write_lock()
        try:
            store = MetadataStore(self.folder / METADATA_FILE, self.vectors)
            with disk_full_guard(self.folder / STORE_FOLDER):
                store.migrate_blob_vectors()
            store.close()
            spaces = {
                space: {
                    **IndexSpec.from_dict(entry).to_dict(),
                    **{k: v for k, v in entry.items() if k not in ("type", "dim", "params")},
                }
                for space, entry in self._manifest["spaces"].items()
            }
            self._manifest = {**self._manifest, "format_version": FORMAT_VERSION, "spaces": spaces}
            _write_json_atomic(self.folder / INDEX_JSON, self._manifest)
        finally:
            if handle is not self._lock_handle:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()

    def _acquire_write_lock(self):
        handle = open(self.folder / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise IndexBusyError(
                f"another writer (a build, add or remove) holds {self.folder}; wait for it to finish "
                "(searching stays possible)"
            ) from None
        return handle

    def close(self) -> None:
        self.store.close()
        for store in self.vectors.values():
            store.close()
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- information
    def __len__(self) -> int:
        return self.store.count()

    @property
    def spaces(self) -> list[str]:
        """Spaces that hold vectors: "image", and "caption" when captions were embedded."""
        return [
            space for space in SPACES if space in self._manifest["spaces"] or self.store.has_vectors(space)
        ]

    def vector_count(self, space: str = "image") -> int:
        """Vectors searchable in ``space`` (from memory once loaded: no table scan)."""
        with self._lock.write():
            if space in self._spaces:
                return self._loaded(space).count
        return self.store.count_vectors(space)

    def spec(self, space: str = "image") -> IndexSpec:
        with self._lock.write():
            return self._loaded(space).spec

    def describe(self) -> dict[str, Any]:
        spaces = {}
        for space in self.spaces:
            loaded = self._spaces.get(space)
            spec = (
                loaded.spec
                if loaded
                else IndexSpec.from_dict(
                    self._manifest["spaces"].get(space, {"type": "flat", "dim": self.identity.embed_dim})
                )
            )
            spaces[space] = {
                "vectors": self.store.count_vectors(space),
                **spec.to_dict(),
                "summary": spec.describe(),
                "vector_store_bytes": self.vectors[space].disk_bytes(),
                "index_file_bytes": _file_size(self.folder / FAISS_FILES[space]),
            }
        return {
            "folder": str(self.folder),
            "items": len(self),
            "model": self.identity.to_dict(),
            "spaces": spaces,
            "failures": len(self.store.failures()),
        }

    def get(self, item_id: int) -> ItemRecord | None:
        return self.store.get_items([item_id]).get(item_id)

    # -- writes
    def add(self, items: Sequence[NewItem], failures: Sequence[tuple[str, str]] = ()) -> list[int | None]:
        """Commit items (with vectors per space) in one transaction; returns new ids (None: path existed).

        Vectors must come from this index's model: pass them through an `Encoder` whose identity was
        checked, e.g. with `polyclip.index.build.add_paths`.
        """
        self._require_writable()
        for item in items:
            for space, vector in item.vectors.items():
                if space not in SPACES:
                    raise IndexStoreError(f"unknown vector space {space!r}; spaces are {', '.join(SPACES)}")
                if np.shape(vector) != (self.identity.embed_dim,):
                    raise ModelMismatchError(
                        f"{item.path}: {space} vector of shape {np.shape(vector)}, the index holds "
                        f"{self.identity.embed_dim}-d vectors of {self.identity.source!r}"
                    )
        with disk_full_guard(self.folder / METADATA_FILE):
            ids = self.store.add_items(items, failures)
        self.refresh()
        return ids

    def remove(self, ids: Sequence[int]) -> None:
        """Remove items by id; unknown ids are an error and then nothing is removed."""
        self._require_writable()
        ids = [int(i) for i in ids]
        missing = sorted(set(ids) - self.store.existing_ids(ids))
        if missing:
            shown = ", ".join(map(str, missing[:20])) + (" ..." if len(missing) > 20 else "")
            raise IndexStoreError(f"no item with id {shown} in {self.folder}; nothing was removed")
        with disk_full_guard(self.folder / METADATA_FILE):
            self.store.remove_items(ids)
        self.refresh()

    def save(self) -> None:
        """Bring every FAISS index up to date, switch its type if the collection outgrew it, write it."""
        self._require_writable()
        with self._lock.write():
            spaces_manifest = dict(self._manifest["spaces"])
            for space in self.spaces:
                loaded = self._loaded(space)
                count = self.store.count_vectors(space)
                # masked or side-lined vectors (HNSW removals) are folded in by a rebuild
                if (
                    vector_ops.needs_rebuild(loaded.spec, count, self.config)
                    or loaded.hidden
                    or loaded.delta is not None
                ):
                    loaded = self._spaces[space] = self._rebuild(space)
                vector_ops.write_atomic(loaded.index, self.folder / FAISS_FILES[space])
                spaces_manifest[space] = {
                    **loaded.spec.to_dict(),
                    "file": FAISS_FILES[space],
                    "applied_seq": loaded.applied_seq,
                    "count": int(loaded.index.ntotal),
                }
            # the FAISS files are in place before the manifest names their sequence numbers
            self._manifest = {
                **self._manifest,
                "spaces": spaces_manifest,
                "vector_config": asdict(self.config),
            }
            with disk_full_guard(self.folder / INDEX_JSON):
                _write_json_atomic(self.folder / INDEX_JSON, self._manifest)
            # and only then is the log they reflect dropped: opening never needs it again
            if spaces_manifest:
                self.store.compact_changes(min(int(s["applied_seq"]) for s in spaces_manifest.values()))

    def _require_writable(self) -> None:
        if not self.writable:
            raise IndexStoreError(f"{self.folder} is opened read-only")

    # -- vectors in memory
    def _loaded(self, space: str) -> _LoadedSpace:
        """The space's FAISS index, loaded (or rebuilt) on first use and caught up with SQLite."""
        if space not in SPACES:
            raise IndexStoreError(f"unknown space {space!r}; choose one of {', '.join(SPACES)}")
        loaded = self._spaces.get(space)
        if loaded is None:
            loaded = self._spaces[space] = self._open_space(space)
        self._catch_up(space, loaded)
        return loaded

    def _open_space(self, space: str) -> _LoadedSpace:
        recorded = self._manifest["spaces"].get(space)
        path = self.folder / FAISS_FILES[space]
        if recorded and path.is_file():
            spec = IndexSpec.from_dict(recorded)
            mapped = not self.writable and spec.type in vector_ops.IVF_KINDS
            try:
                index = vector_ops.read(path, spec, mmap=mapped)
                return _LoadedSpace(index, spec, int(recorded["applied_seq"]), mapped=mapped)
            except IndexStoreError:
                pass  # unreadable: rebuilt from SQLite below, nothing is lost
        return self._rebuild(space)

    def _rebuild(self, space: str) -> _LoadedSpace:
        """The whole space from the stored vectors, streamed in one SQLite snapshot so the sequence
        number matches exactly: trained on a sample, then added chunk by chunk."""
        dim = self.identity.embed_dim
        with self.store.snapshot():
            applied = self.store.last_change()
            count = self.store.count_vectors(space)
            index, spec = vector_ops.build_index(
                count,
                dim,
                sample=lambda n: self.store.sample_vectors(space, n, dim, self.config.seed),
                chunks=lambda: self.store.iter_vectors(space, dim),
                config=self.config,
                fetch=self._fetcher(space),
            )
        return _LoadedSpace(index, spec, applied)

    def _fetcher(self, space: str):
        dim = self.identity.embed_dim
        return lambda ids: self.store.get_vectors(space, np.asarray(ids).tolist(), dim)

    def _catch_up(self, space: str, loaded: _LoadedSpace, reloaded: bool = False) -> None:
        """Replay the changes committed after ``loaded.applied_seq`` (by this or another process).

        When the writer has saved and compacted the log past them, the space is reloaded from the
        saved file instead (it reflects the dropped changes) and caught up from there. A file read
        while the writer saves again may already hold changes its manifest entry does not name yet,
        so after a reload an added item replaces its vector instead of being added twice.
        """
        if self.store.last_change() == loaded.applied_seq:
            return
        found = self.store.changes_since(space, loaded.applied_seq)
        if found is None:
            self._manifest = _read_manifest(self.folder / INDEX_JSON)
            fresh = self._open_space(space)
            if self.store.changes_since(space, fresh.applied_seq) is None:
                fresh = self._rebuild(space)  # a file older than the kept log: rebuilt from SQLite
            loaded.index, loaded.spec, loaded.applied_seq = fresh.index, fresh.spec, fresh.applied_seq
            loaded.mapped, loaded.delta, loaded.hidden = fresh.mapped, fresh.delta, fresh.hidden
            self._catch_up(space, loaded, reloaded=True)
            return
        last, changes = found
        removed = {item for item, op in changes if op == "remove"}
        added = sorted({item for item, op in changes if op == "add"})
        # after a reload, an added item may already be in the file: replaced, never held twice
        gone = np.array(sorted(removed | set(added) if reloaded else removed), np.int64)
        if loaded.can_remove:
            vector_ops.remove(loaded.index, gone)
        else:
            loaded.hidden.update(gone.tolist())
        if loaded.delta is not None:
            vector_ops.remove(loaded.delta, gone)
        # an item added and removed again since the last replay has no vector left: not re-added
        ids, vectors = self.store.get_vectors(space, added, self.identity.embed_dim)
        if loaded.can_add and not (reloaded and not loaded.can_remove):
            vector_ops.add(loaded.index, ids, vectors)
        elif len(ids):
            if loaded.delta is None:
                loaded.delta, _ = vector_ops.new_flat(self.identity.embed_dim)
            vector_ops.add(loaded.delta, ids, vectors)
        loaded.applied_seq = last

    def refresh(self) -> None:
        """Apply changes committed since the last search (cheap when there are none)."""
        with self._lock.write():
            for space, loaded in self._spaces.items():
                self._catch_up(space, loaded)

    # -- search
    def search(
        self,
        queries: QueryEmbeddings,
        k: int = 10,
        filter: dict[str, Any] | None = None,
        space: str = "image",
        rerank: int | None = None,
    ) -> list[list[SearchHit]]:
        """Top-``k`` items per query by cosine similarity, optionally restricted by a metadata filter.

        ``rerank``: re-score ``rerank * k`` candidates exactly from the stored vectors (default: what
        the index kind recorded, 10 for IVF-PQ; 1 turns it off).
        """
        if queries.model_fingerprint != self.identity.fingerprint:
            raise ModelMismatchError(
                f"the queries were encoded by another model (fingerprint {queries.model_fingerprint}) than "
                f"the one this index was built with ({self.identity.source!r}, {self.identity.fingerprint})"
            )
        if queries.vectors.shape[1] != self.identity.embed_dim:
            raise ModelMismatchError(
                f"queries have {queries.vectors.shape[1]} dimensions, the index {self.identity.embed_dim}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise IndexStoreError(f"k must be a positive integer, got {k!r}")
        allowed = None if not filter else self.store.filter_ids(filter)
        if allowed is not None and len(allowed) == 0:
            return [[] for _ in range(len(queries.vectors))]
        loaded = self._spaces.get(space)
        if loaded is None or self.store.last_change() != loaded.applied_seq:
            with self._lock.write():  # load, or replay what other writers committed
                loaded = self._loaded(space)
        with self._lock.read():  # FAISS searches may run in parallel, never during a change
            small_filter = allowed is not None and len(allowed) <= EXACT_FILTER_LIMIT
            if not (small_filter and loaded.spec.type != "flat"):
                scores, ids = self._search_loaded(space, loaded, queries.vectors, k, allowed, rerank)
        if small_filter and loaded.spec.type != "flat":
            scores, ids = self._exact_among(space, queries.vectors, k, allowed)
        records = self.store.get_items({int(i) for row in ids for i in row if i >= 0})
        return [
            [
                SearchHit(int(i), float(s), records[i].path, records[i].caption, records[i].metadata)
                for s, i in zip(row_scores, row_ids)
                if i >= 0 and int(i) in records  # an item removed meanwhile is dropped
            ]
            for row_scores, row_ids in zip(scores, ids)
        ]

    def _search_loaded(self, space, loaded: _LoadedSpace, queries, k, allowed, rerank):
        """The saved index (masking what it cannot delete) and the replayed additions, merged by score."""
        fetch = self._fetcher(space)
        hidden = np.fromiter(loaded.hidden, np.int64, len(loaded.hidden)) if loaded.hidden else None
        k_main = min(k, max(1, int(loaded.index.ntotal)))
        scores, ids = vector_ops.search(
            loaded.index, loaded.spec, queries, k_main, allowed, hidden, fetch, rerank
        )
        if loaded.delta is not None and loaded.delta.ntotal:
            extra_scores, extra_ids = vector_ops.search(
                loaded.delta,
                IndexSpec("flat", loaded.spec.dim),
                queries,
                min(k, int(loaded.delta.ntotal)),
                allowed,
            )
            scores = np.concatenate([scores, extra_scores], axis=1)
            ids = np.concatenate([ids, extra_ids], axis=1)
            scores = np.where(ids >= 0, scores, -np.inf)
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, ids = np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
        return scores, ids

    def _exact_among(self, space: str, queries: np.ndarray, k: int, allowed: np.ndarray):
        ids, vectors = self.store.get_vectors(space, allowed.tolist(), self.identity.embed_dim)
        if not len(ids):
            empty = np.zeros((len(queries), 0))
            return empty, empty.astype(np.int64)
        scores = queries.astype(np.float32) @ vectors.T  # (Q, N)
        top = min(k, len(ids))
        part = np.argpartition(-scores, top - 1, axis=1)[:, :top]  # (Q, top), unordered
        order = np.take_along_axis(-scores, part, axis=1).argsort(axis=1, kind="stable")
        best = np.take_along_axis(part, order, axis=1)
        return np.take_along_axis(scores, best, axis=1), ids[best]

    def stored_vectors(self, ids: Sequence[int], space: str = "image") -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) as stored, e.g. to search for items similar to an indexed one."""
        return self.store.get_vectors(space, list(ids), self.identity.embed_dim)


class ReadWriteLock:
    """Many readers or one writer. Waiting writers go first (no starvation); the writing thread may
    re-enter and read. A reader must not ask for the write lock while it reads."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer: int | None = None  # thread id of the writer
        self._depth = 0  # the writer's re-entries
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._condition:
            inside_own_write = self._writer == me
            if not inside_own_write:
                while self._writer is not None or self._writers_waiting:
                    self._condition.wait()
                self._readers += 1
        try:
            yield
        finally:
            if not inside_own_write:
                with self._condition:
                    self._readers -= 1
                    if self._readers == 0:
                        self._condition.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._condition:
            if self._writer == me:
                self._depth += 1
            else:
                self._writers_waiting += 1
                while self._writer is not None or self._readers:
                    self._condition.wait()
                self._writers_waiting -= 1
                self._writer, self._depth = me, 1
        try:
            yield
        finally:
            with self._condition:
                self._depth -= 1
                if self._depth == 0:
                    self._writer = None
                    self._condition.notify_all()


def open_index(folder: str | Path, writable: bool = False) -> Index:
    return Index(folder, writable=writable)


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") not in READABLE_FORMATS:
        raise IndexStoreError(
            f"{path}: format_version {manifest.get('format_version')!r}; this polyclip reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}. Rebuild the index with 'polyclip index build' "
            "(into a new folder) using the polyclip that reads it, or the model it names"
        )
    return manifest


def _file_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else 0


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
