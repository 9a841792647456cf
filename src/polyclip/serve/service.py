"""What the routes share: the index, the encoder, the batchers, caches and metrics.

Text and image queries go through dynamic batchers (`batching`) to the encoder, which runs in one
worker thread; image decoding runs in the thread pool. The encoded queries of /search are batched once
more for the index, in a thread of their own: one FAISS call scans the vectors once for a whole batch
of queries (an exact search's cost is that scan), and the next encoder batch runs meanwhile.
``max_batch=1`` turns batching off: every query is encoded alone and searched on its own in the pool.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cachetools import LRUCache
from PIL import Image
from starlette.concurrency import run_in_threadpool

from polyclip.images import ImageDecodeError, load_image
from polyclip.index import Encoder, Index, IndexStoreError, QueryEmbeddings, SearchHit
from polyclip.index import vectors as vector_ops
from polyclip.serve.batching import DynamicBatcher
from polyclip.serve.config import ServeConfig
from polyclip.serve.inputs import ApiError, decode_pixels
from polyclip.serve.metrics import ServiceMetrics
from polyclip.transforms import ImageTransform

CLASS_CACHE_SIZE = 64  # zero-shot classifiers (label and template sets) kept encoded


@dataclass(frozen=True, eq=False)
class _IndexQuery:
    vector: np.ndarray  # (E,)
    k: int
    filter: dict | None
    space: str

    def group(self) -> tuple:
        """Queries of one group are answered by one index search."""
        return self.space, self.k, json.dumps(self.filter, sort_keys=True)


class SearchService:
    """Everything the routes share: the index, the encoder, the batchers, caches and metrics."""

    def __init__(self, index: Index, encoder: Encoder, config: ServeConfig) -> None:
        index.identity.check_compatible(encoder.identity, f"serving with {encoder.identity.source!r}")
        self.index, self.encoder, self.config = index, encoder, config
        # decompression-bomb limit of the service, not the library default
        self.preprocess = ImageTransform(encoder.preprocess.config, max_pixels=config.max_image_pixels)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polyclip-encoder")
        self.metrics = ServiceMetrics(self._vector_counts)
        self.text_batcher = DynamicBatcher(
            encoder.text_vectors,
            self.executor,
            config.max_batch,
            config.max_wait_ms,
            on_batch=lambda n: self.metrics.batch_size.labels(input="text").observe(n),
        )
        self.image_batcher = DynamicBatcher(
            lambda pixels: encoder.image_vectors(torch.stack(pixels)),
            self.executor,
            config.max_batch,
            config.max_wait_ms,
            on_batch=lambda n: self.metrics.batch_size.labels(input="image").observe(n),
        )
        # FAISS scans a flat index query by query below this many queries; from 8 queries one matrix
        # product is faster (3.7 vs 8.3 ms a query for 8 queries over 100k vectors on 2 cores)
        faiss = vector_ops.faiss_module()
        faiss.cvar.distance_compute_blas_threshold = min(faiss.cvar.distance_compute_blas_threshold, 8)
        self.search_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="polyclip-search")
        self.search_batcher = DynamicBatcher(
            self._search_batch,
            self.search_executor,
            config.max_batch,
            config.max_wait_ms,
            on_batch=lambda n: self.metrics.search_batch_size.observe(n),
        )
        model = encoder.model
        self.logit_scale = float(
            model.logit_scale.detach().float().clamp(max=model.config.logit_scale_max).exp()
        )
        self.logit_bias = None if model.logit_bias is None else float(model.logit_bias.detach().float())
        self._class_weights: LRUCache = LRUCache(CLASS_CACHE_SIZE)  # (labels, templates) -> (C, E)
        self._thumbnails: LRUCache = LRUCache(config.thumbnail_cache)  # (id, mtime) -> JPEG bytes
        self._thumbnails_lock = threading.Lock()  # thumbnails are made in the thread pool
        self.root = collection_root(index, config.collection_root)
        self.name = config.index_name or index.folder.resolve().name  # what /indices-list offers
        self.started = time.time()
        for space in index.spaces:  # load the FAISS indexes now, not on the first request
            index.spec(space)

    def _vector_counts(self) -> dict[str, int]:
        return {space: self.index.vector_count(space) for space in self.index.spaces}

    def shown_path(self, path: str) -> str:
        """An item's path as clients see it: relative to the collection root, never absolute (a file
        outside the root, added later, shows its name alone)."""
        if self.root is not None:
            try:
                return Path(path).relative_to(self.root).as_posix()
            except ValueError:
                pass
        return Path(path).name

    def hit_dict(self, hit: SearchHit) -> dict:
        return {**hit.to_dict(), "path": self.shown_path(hit.path)}

    async def close(self) -> None:
        for batcher in (self.text_batcher, self.image_batcher, self.search_batcher):
            await batcher.stop()
        self.executor.shutdown(wait=True)
        self.search_executor.shutdown(wait=True)

    # -- encoding
    async def text_vectors(self, texts: list[str]) -> np.ndarray:
        return np.stack(await self.text_batcher.submit(texts))  # (N, E)

    async def image_vector(self, data: bytes) -> np.ndarray:
        pixels = await run_in_threadpool(decode_pixels, data, self.preprocess, self.config)  # (3, H, W)
        return (await self.image_batcher.submit([pixels]))[0]  # (E,)

    def item_vector(self, item_id: int, space: str) -> np.ndarray:
        """(E,) the stored vector of an indexed item ("more like this")."""
        _, vectors = self.index.stored_vectors([item_id], space)
        if not len(vectors):
            raise ApiError(404, f"no indexed item with id {item_id} has a {space} vector")
        return vectors[0]

    def queries(self, vectors: np.ndarray) -> QueryEmbeddings:
        return QueryEmbeddings(np.atleast_2d(vectors).astype(np.float32), self.encoder.fingerprint)

    async def search(self, vector: np.ndarray, k: int, filter: dict | None, space: str) -> list[SearchHit]:
        """The top ``k`` items for one encoded query, searched together with concurrent queries."""
        if self.config.max_batch == 1:
            return (await run_in_threadpool(self.index.search, self.queries(vector), k, filter, space))[0]
        result = (await self.search_batcher.submit([_IndexQuery(vector, k, filter, space)]))[0]
        if isinstance(result, Exception):
            raise result
        return result

    def _search_batch(self, queries: list[_IndexQuery]) -> list[list[SearchHit] | Exception]:
        """One index search per group of equal (space, k, filter); a group's error (a bad filter) is
        returned to that group's callers alone, not to the rest of the batch."""
        groups: dict[tuple, list[int]] = {}
        for position, query in enumerate(queries):
            groups.setdefault(query.group(), []).append(position)
        results: list = [None] * len(queries)
        for positions in groups.values():
            first = queries[positions[0]]
            vectors = np.stack([queries[position].vector for position in positions])  # (Q, E)
            try:
                found = self.index.search(self.queries(vectors), first.k, first.filter, first.space)
            except IndexStoreError as error:
                found = [error] * len(positions)
            for position, hits in zip(positions, found):
                results[position] = hits
        return results

    async def class_weights(self, labels: tuple[str, ...], templates: tuple[str, ...]) -> np.ndarray:
        """(C, E) zero-shot classifier: per label, the renormalised mean of its prompt embeddings."""
        key = (labels, templates)
        cached = self._class_weights.get(key)
        if cached is not None:
            return cached
        prompts = [template.format(label) for label in labels for template in templates]
        vectors = (await self.text_vectors(prompts)).reshape(len(labels), len(templates), -1).mean(axis=1)
        weights = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        self._class_weights[key] = weights
        return weights

    def thumbnail(self, item_id: int, path: str) -> bytes:
        file = Path(path)
        try:
            key = (item_id, file.stat().st_mtime_ns)
        except OSError:
            raise ApiError(404, f"item {item_id}'s file is no longer available") from None
        with self._thumbnails_lock:
            cached = self._thumbnails.get(key)
        if cached is not None:
            return cached
        try:
            image = load_image(file)
        except ImageDecodeError:
            raise ApiError(404, f"item {item_id}'s file can no longer be read") from None
        size = self.config.thumbnail_size
        image.thumbnail((size, size), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self._thumbnails_lock:
            self._thumbnails[key] = data
        return data


def collection_root(index: Index, given: str | None) -> Path | None:
    """The folder paths are shown relative to: the one given, or the deepest folder holding every
    item at start-up. The common prefix of all paths is the common prefix of the smallest and the
    largest (in sort order), two lookups on SQLite's index of the unique path column."""
    if given is not None:
        return Path(given).resolve()
    with index.store.snapshot() as db:
        first, last = db.execute("SELECT MIN(path), MAX(path) FROM items").fetchone()
    if first is None:
        return None
    common = (
        os.path.commonpath([first, last]) if Path(first).is_absolute() == Path(last).is_absolute() else ""
    )
    if not common:
        return None
    root = Path(common)
    return root.parent if root.as_posix() in (first, last) else root  # one item: its folder
