"""FAISS vector indexes: exact for small collections, IVF chosen automatically for large ones.

- Up to ``exact_limit`` vectors: ``IndexIDMap2(IndexFlatIP)``, exact inner-product search (cosine on
  normalised vectors).
- Above: ``IndexIVFFlat`` (Jegou et al., "Product quantization for nearest neighbor search", 2011:
  the inverted file; here without compression) with ``nlist = 4 sqrt(N)`` lists, the rule of thumb of
  the FAISS wiki ("Guidelines to choose an index"), trained by spherical k-means on a sample of the
  collection. The coarse quantizer is an HNSW graph over the list centroids (Malkov & Yashunin, 2018),
  which makes both k-means assignment and adding vectors sub-linear in ``nlist``. The number of lists
  probed per query, ``nprobe``, is the smallest power of two whose recall@10 on a held-in sample
  (exact neighbours from an exhaustive probe, the query itself excluded) reaches ``target_recall``;
  it is recorded with the measured recall.

Both types support removal (``remove_ids``), so deleted items leave the index for real.
Reference implementation: facebookresearch/faiss (IndexIVF.cpp, Clustering.cpp).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polyclip.index.errors import IndexStoreError


def faiss_module():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("the vector index needs FAISS: pip install 'polyclip[serve]'") from error
    return faiss


@dataclass
class VectorIndexConfig:
    """When and how the approximate index is used."""

    exact_limit: int = 100_000  # up to this many vectors, exact search is fast enough (~10 ms at d=512)
    lists_per_sqrt_n: float = 4.0  # nlist = 4 sqrt(N), FAISS's guideline range is 4-16 sqrt(N)
    train_points_per_list: int = 40  # FAISS k-means warns below 39 points per centroid
    kmeans_iterations: int = 10
    hnsw_neighbors: int = 32  # M of the HNSW coarse quantizer
    target_recall: float = 0.95  # recall@10 that nprobe is tuned to reach
    calibration_queries: int = 256
    calibration_k: int = 10
    seed: int = 0


@dataclass
class IndexSpec:
    """What is stored in ``index.json`` about a FAISS index: its type and parameters."""

    type: str  # "flat" or "ivf"
    dim: int
    params: dict[str, Any] = field(default_factory=dict)  # ivf: nlist, nprobe, trained_on, recall, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        return cls(type=data["type"], dim=int(data["dim"]), params=dict(data.get("params", {})))


def choose_type(count: int, config: VectorIndexConfig) -> str:
    return "ivf" if count > config.exact_limit else "flat"


def needs_rebuild(spec: IndexSpec, count: int, config: VectorIndexConfig) -> bool:
    """The automatic choice changed, or an IVF index has outgrown (4x) what it was trained for."""
    wanted = choose_type(count, config)
    if wanted != spec.type:
        # hysteresis: an IVF index stays until the collection shrinks to half the limit
        return not (spec.type == "ivf" and count > config.exact_limit // 2)
    return spec.type == "ivf" and count > 4 * int(spec.params.get("trained_on", count))


def new_flat(dim: int):
    faiss = faiss_module()
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), IndexSpec("flat", dim)


def train_ivf(sample: np.ndarray, count: int, config: VectorIndexConfig):
    """An empty, trained IVF index for a collection of ``count`` vectors, from a sample (n, d)."""
    faiss = faiss_module()
    dim = sample.shape[1]
    nlist = max(
        1, min(int(config.lists_per_sqrt_n * math.sqrt(count)), len(sample) // config.train_points_per_list)
    )
    quantizer = faiss.IndexHNSWFlat(dim, config.hnsw_neighbors, faiss.METRIC_INNER_PRODUCT)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = config.kmeans_iterations
    index.cp.seed = config.seed
    index.cp.max_points_per_centroid = config.train_points_per_list
    started = time.perf_counter()
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    spec = IndexSpec(
        "ivf",
        dim,
        {
            "nlist": nlist,
            "quantizer": f"HNSW{config.hnsw_neighbors}",
            "trained_on": int(count),
            "train_points": int(min(len(sample), nlist * config.train_points_per_list)),
            "train_seconds": round(time.perf_counter() - started, 2),
            "nprobe": 1,
        },
    )
    return index, spec


def calibrate_nprobe(
    index, spec: IndexSpec, query_ids: np.ndarray, queries: np.ndarray, config: VectorIndexConfig
) -> None:
    """Smallest power-of-two nprobe reaching the target recall@k on stored vectors used as queries.

    Ground truth is the same IVF index probed exhaustively (every list: exact search). Each query's own
    id is dropped from both lists, so recall is measured on its true neighbours.
    """
    faiss = faiss_module()
    nlist = spec.params["nlist"]
    k = config.calibration_k
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, exact = index.search(queries, k + 1, params=faiss.SearchParametersIVF(nprobe=nlist))
    truth = [set(_without(row, own)[:k]) for row, own in zip(exact, query_ids)]
    nprobe, recall = 1, 0.0
    while True:
        _, found = index.search(queries, k + 1, params=faiss.SearchParametersIVF(nprobe=nprobe))
        hits = sum(len(t & set(_without(row, own)[:k])) for t, row, own in zip(truth, found, query_ids))
        recall = hits / max(1, sum(len(t) for t in truth))
        if recall >= config.target_recall or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    index.nprobe = nprobe
    spec.params.update(nprobe=nprobe, calibration_recall=round(recall, 4), calibration_k=k)
    spec.params["calibration_queries"] = len(queries)


def _without(row: np.ndarray, own: int) -> list[int]:
    return [int(i) for i in row if i != own and i >= 0]


def build_index(
    count: int,
    dim: int,
    sample: Callable[[int], tuple[np.ndarray, np.ndarray]],
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    config: VectorIndexConfig,
):
    """A complete index of ``count`` vectors of size ``dim``, of the automatically chosen type.

    ``sample(n)`` returns (ids, vectors) of a random sample; ``chunks()`` yields (ids, vectors) of the
    whole collection; streaming keeps memory at the index's own size plus one chunk.
    """
    if choose_type(count, config) == "flat":
        index, spec = new_flat(dim)
        for ids, vectors in chunks():
            add(index, ids, vectors)
        return index, spec
    nlist = int(config.lists_per_sqrt_n * math.sqrt(count))
    train_ids, train_vectors = sample(max(nlist * config.train_points_per_list, config.calibration_queries))
    index, spec = train_ivf(train_vectors, count, config)
    started = time.perf_counter()
    for ids, vectors in chunks():
        add(index, ids, vectors)
    spec.params["add_seconds"] = round(time.perf_counter() - started, 2)
    rng = np.random.default_rng(config.seed)
    pick = rng.choice(len(train_ids), size=min(config.calibration_queries, len(train_ids)), replace=False)
    calibrate_nprobe(index, spec, train_ids[pick], train_vectors[pick], config)
    return index, spec


def add(index, ids: np.ndarray, vectors: np.ndarray) -> None:
    if len(ids):
        index.add_with_ids(
            np.ascontiguousarray(vectors, dtype=np.float32), np.ascontiguousarray(ids, np.int64)
        )


def remove(index, ids: np.ndarray) -> int:
    if not len(ids):
        return 0
    faiss = faiss_module()
    return int(index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, np.int64))))


def search(
    index, spec: IndexSpec, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k), ids (Q, k)); missing results have id -1. ``allowed`` restricts to those ids."""
    faiss = faiss_module()
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    selector = None if allowed is None else faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64))
    if spec.type == "ivf":
        nprobe = int(spec.params.get("nprobe", 1))
        if allowed is not None and index.ntotal:
            # a selective filter leaves fewer candidates per list: probe proportionally more lists
            share = max(len(allowed) / index.ntotal, 1e-9)
            nprobe = min(int(spec.params["nlist"]), math.ceil(nprobe / share))
        params = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector)
    else:
        params = None if selector is None else faiss.SearchParameters(sel=selector)
    return index.search(queries, k, params=params)


def write_atomic(index, path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename: a kill never leaves half a file."""
    faiss = faiss_module()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    faiss.write_index(index, str(tmp))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)


def read(path: Path, spec: IndexSpec):
    faiss = faiss_module()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise IndexStoreError(f"cannot read {path}: {error}") from error
    if index.d != spec.dim:
        raise IndexStoreError(f"{path} holds {index.d}-d vectors, index.json says {spec.dim}")
    if spec.type == "ivf":
        index.nprobe = int(spec.params.get("nprobe", 1))
    return index
