"""FAISS indexes of one vector space: the kind chosen from the collection size and a memory budget.

Kinds (FAISS factory strings in ``IndexSpec.params["factory"]``):
  flat      ``IDMap2,Flat``: exact inner product (cosine on unit vectors).
  hnsw      ``IDMap2,HNSW{M}``: a graph (Malkov & Yashunin, 2018), held in RAM; removals are masked
            until the next rebuild (FAISS's HNSW cannot delete).
  ivf_flat  ``IVF{nlist}[_HNSW32],Flat``: the inverted file (Jegou et al., 2011) without compression.
  ivf_pq    ``IVF{nlist}_HNSW32,PQ{m}x8``: vectors compressed to ``m`` bytes by product
            quantization, optionally rotated first (``OPQ{m}_{D},...``, Ge et al., 2013); scores
            re-ranked exactly from the stored vectors.

`choose_spec` follows autofaiss's ``get_optimal_index_keys_v2`` (criteo/autofaiss,
``external/optimize.py``): exact search while the collection is small (here up to ``exact_limit``,
autofaiss: 1,000); then HNSW when its graph with ``M >= 8`` fits the budget (``M = (budget / 4n - d)
/ 2``, at most 32) unless the index must be memory-mappable; IVF-Flat below 1M vectors if it fits;
otherwise IVF-PQ with the largest code in (256, 128, 64, 48, 32, 24, 16, 8, 4) bytes whose size fits.
``nlist`` is autofaiss's first choice (``get_optimal_nb_clusters``): the power of two nearest
``4 sqrt(N)`` below 1M vectors, 16,384 up to 10M (autofaiss: below 10M), 65,536 up to 300M, 2^17
beyond. autofaiss always rotates with OPQ; here OPQ is an option (``opq=True``), off by default:
its training alone ran for minutes on a 20k sample on 2 cores, while re-ranking the candidates
exactly from the stored vectors recovers the precision that PQ loses. With OPQ, the output dimension
is the smallest multiple of ``m`` not below ``d`` (autofaiss widens it to up to ``7m``). FAISS's
polysemous training of the PQ codes (for Hamming filtering, unused) is switched off.

The search parameter (``nprobe`` for IVF, ``efSearch`` for HNSW) is tuned after the vectors are
added, as autofaiss does, on stored vectors used as queries whose exact neighbours were computed in the
same streamed pass that added the vectors: the smallest power of two reaching ``target_recall``
(recall@10, re-ranking included), unless that costs more than ``max_query_ms`` per query; the
value, its recall and its latency are recorded.

Reference implementation: facebookresearch/faiss (IndexIVF.cpp, IndexIVFPQ.cpp, Clustering.cpp).
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from polyclip.index.errors import IndexStoreError, disk_full_guard

log = logging.getLogger("polyclip.index")

KINDS = ("flat", "hnsw", "ivf_flat", "ivf_pq")
IVF_KINDS = ("ivf_flat", "ivf_pq")
PQ_CODE_BYTES = (256, 128, 64, 48, 32, 24, 16, 8, 4)  # autofaiss's candidates, largest first
IVF_FLAT_LIMIT = 1_000_000  # autofaiss's ivf_flat_threshold
ID_BYTES = 8  # an int64 id per vector in inverted lists
ID_MAP_BYTES = 48  # IDMap2: the id array and its reverse hash map, per vector


def faiss_module():
    try:
        import faiss
    except ImportError as error:
        raise ImportError("the vector index needs FAISS: pip install 'polyclip[serve]'") from error
    return faiss


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_bytes(text: str | int) -> int:
    """'4GB' -> 4e9, '512MiB' -> 2^29, 1000 -> 1000; a clear error otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise IndexStoreError(f"{text!r} is not a memory size; write e.g. 4GB, 512MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class VectorIndexConfig:
    """How the index kind is chosen and tuned (recorded in index.json)."""

    exact_limit: int = 100_000  # up to this many vectors, exact search (~10 ms at d=512)
    max_memory_bytes: int = 4 * 10**9  # the index's RAM budget (--max-index-memory)
    max_query_ms: float = 10.0  # per single query, for tuning nprobe / efSearch (--max-query-ms)
    kind: str | None = None  # force one of KINDS instead of choosing
    memory_mappable: bool = False  # only kinds a reader can map from disk (no HNSW), as autofaiss's flag
    opq: bool = False  # rotate before product quantization (OPQ); its training costs minutes on 2 cores
    nlist: int | None = None  # override the number of inverted lists
    pq_bytes: int | None = None  # override the code size of ivf_pq
    rerank: int | None = None  # candidates per result re-scored exactly; None: 10 for ivf_pq, else 1 (off)
    lists_per_sqrt_n: float = 4.0  # nlist ~ 4 sqrt(N) below 1M vectors (FAISS's 4-16 sqrt(N))
    train_points_per_list: int = 40  # FAISS k-means warns below 39 points per centroid
    kmeans_iterations: int = 10
    hnsw_neighbors: int = 32  # M of HNSW graphs (the index, or the IVF coarse quantizer)
    target_recall: float = 0.95  # recall@10 that nprobe / efSearch are tuned to reach
    calibration_queries: int = 256
    calibration_k: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise IndexStoreError(f"unknown index kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.pq_bytes is not None and self.pq_bytes not in PQ_CODE_BYTES:
            raise IndexStoreError(f"pq_bytes must be one of {', '.join(map(str, PQ_CODE_BYTES))}")
        if self.max_memory_bytes <= 0 or self.max_query_ms <= 0:
            raise IndexStoreError("the memory budget and the query time must be positive")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VectorIndexConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass
class IndexSpec:
    """What is stored in ``index.json`` about a FAISS index: its kind and parameters."""

    type: str  # one of KINDS
    dim: int
    params: dict[str, Any] = field(default_factory=dict)  # factory, nlist, nprobe, recall, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IndexSpec:
        kind = {"ivf": "ivf_flat"}.get(data["type"], data["type"])  # format 1 called IVF-Flat "ivf"
        params = dict(data.get("params", {}))
        if kind == "ivf_flat" and "factory" not in params:
            params["factory"] = (
                f"IVF{params.get('nlist', 1)}_HNSW{params.get('quantizer', 'HNSW32')[4:]},Flat"
            )
        return cls(type=kind, dim=int(data["dim"]), params=params)

    @property
    def rerank(self) -> int:
        return int(self.params.get("rerank", 1))

    def describe(self) -> str:
        """One line for people: 'ivf_pq OPQ64_512,IVF16384_HNSW32,PQ64x8 nprobe=32 ...'."""
        if self.type == "flat":
            return "flat (exact search)"
        shown = [self.params.get("factory", self.type)]
        for key in ("nprobe", "ef_search", "rerank", "calibration_recall", "query_ms", "estimated_bytes"):
            if key in self.params:
                value = self.params[key]
                shown.append(f"{key}={_human_bytes(value) if key == 'estimated_bytes' else value}")
        return f"{self.type} " + " ".join(str(part) for part in shown)


def _human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.1f}{unit}" if unit != "B" else f"{int(count)}B"
        count /= 1000
    return str(count)


# -- choosing the kind
def optimal_nlist(count: int, config: VectorIndexConfig) -> int:
    """autofaiss's first choice of the number of lists, capped so each list has its training points."""
    if config.nlist:
        wanted = config.nlist
    elif count < 1_000_000:
        wanted = 2 ** round(math.log2(max(1.0, config.lists_per_sqrt_n * math.sqrt(count))))
    elif count <= 10_000_000:
        wanted = 16_384
    elif count < 300_000_000:
        wanted = 65_536
    else:
        wanted = 2**17
    return max(1, min(wanted, count // config.train_points_per_list))


def _quantizer_suffix(nlist: int, config: VectorIndexConfig) -> str:
    # autofaiss: an HNSW coarse quantizer from 1,000 lists on; k-means assignment and adds get sub-linear
    return f"_HNSW{config.hnsw_neighbors}" if nlist >= 1000 else ""


def estimate_bytes(kind: str, count: int, dim: int, params: dict[str, Any], config: VectorIndexConfig) -> int:
    """RAM of an index of ``kind`` holding ``count`` vectors (the formulas of autofaiss's IndexMetadata)."""
    if kind == "flat":
        return count * (4 * dim + ID_MAP_BYTES)
    if kind == "hnsw":
        return count * (4 * (dim + 2 * params["hnsw_m"]) + ID_MAP_BYTES)
    nlist = params["nlist"]
    quantizer = nlist * (4 * dim + (8 * config.hnsw_neighbors if nlist >= 1000 else 0))
    if kind == "ivf_flat":
        return count * (4 * dim + ID_BYTES) + quantizer
    code, rotated = params["pq"], params.get("opq_dim", dim)
    quantizer = nlist * (4 * rotated + (8 * config.hnsw_neighbors if nlist >= 1000 else 0))
    tables = 256 * 4 * rotated + (4 * rotated * dim if params.get("opq_dim") else 0)
    return count * (code + ID_BYTES) + quantizer + tables


def choose_spec(count: int, dim: int, config: VectorIndexConfig) -> IndexSpec:
    """The kind and construction parameters for ``count`` vectors of ``dim`` under the budget."""
    budget = config.max_memory_bytes
    kinds = [config.kind] if config.kind else ["flat", "hnsw", "ivf_flat", "ivf_pq"]
    for kind in kinds:
        forced = config.kind is not None
        if kind == "flat" and (forced or count <= config.exact_limit):
            params: dict[str, Any] = {"factory": "IDMap2,Flat"}
        elif kind == "hnsw" and (forced or not config.memory_mappable):
            m = int(math.floor((budget / (4 * max(count, 1)) - dim) / 2))
            if m < 8 and not forced:
                continue
            m = max(8, min(m, config.hnsw_neighbors))
            params = {"factory": f"IDMap2,HNSW{m}", "hnsw_m": m}
        elif kind == "ivf_flat" and (forced or count < IVF_FLAT_LIMIT):
            nlist = optimal_nlist(count, config)
            params = {"factory": f"IVF{nlist}{_quantizer_suffix(nlist, config)},Flat", "nlist": nlist}
        elif kind == "ivf_pq":
            params = _choose_pq(count, dim, config)
        else:
            continue
        params["estimated_bytes"] = estimate_bytes(kind, count, dim, params, config)
        if params["estimated_bytes"] <= budget or forced:
            params["rerank"] = config.rerank or (10 if kind == "ivf_pq" else 1)
            return IndexSpec(kind, dim, params)
    raise IndexStoreError(  # only ivf_pq can end here: even its smallest code does not fit
        f"{count} vectors of {dim} dimensions need more than the memory budget of "
        f"{_human_bytes(budget)} even compressed to 4 bytes; raise --max-index-memory"
    )


def _choose_pq(count: int, dim: int, config: VectorIndexConfig) -> dict[str, Any]:
    nlist = optimal_nlist(count, config)
    codes = [config.pq_bytes] if config.pq_bytes else [m for m in PQ_CODE_BYTES if m < dim]
    fallback = None
    for m in codes:
        params: dict[str, Any] = {"nlist": nlist, "pq": m}
        if config.opq:
            params["opq_dim"] = m * math.ceil(dim / m)
            prefix = f"OPQ{m}_{params['opq_dim']},"
        elif dim % m:
            continue  # plain PQ splits the vector into m equal parts
        else:
            prefix = ""
        params["factory"] = f"{prefix}IVF{nlist}{_quantizer_suffix(nlist, config)},PQ{m}x8"
        fallback = params
        if estimate_bytes("ivf_pq", count, dim, params, config) <= config.max_memory_bytes:
            return params
    return fallback or {"nlist": nlist, "pq": 4, "factory": f"IVF{nlist},PQ4x8"}


def needs_rebuild(spec: IndexSpec, count: int, config: VectorIndexConfig) -> bool:
    """The automatic choice changed kind, or an IVF index outgrew (4x) what it was trained for."""
    wanted = choose_spec(count, spec.dim, config).type
    if wanted != spec.type:
        # hysteresis: an approximate index stays until the collection shrinks to half the exact limit
        return not (spec.type != "flat" and wanted == "flat" and count > config.exact_limit // 2)
    return spec.type in IVF_KINDS and count > 4 * int(spec.params.get("trained_on", count))


# -- building
def new_index(spec: IndexSpec, config: VectorIndexConfig):
    faiss = faiss_module()
    index = faiss.index_factory(spec.dim, spec.params["factory"], faiss.METRIC_INNER_PRODUCT)
    if spec.type in IVF_KINDS:
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.niter = config.kmeans_iterations
        ivf.cp.seed = config.seed
        ivf.cp.max_points_per_centroid = config.train_points_per_list
        if spec.type == "ivf_pq":
            ivfpq = faiss.downcast_index(ivf)
            # polysemous training (for Hamming-distance filtering, which is not used here) takes
            # minutes for nothing
            ivfpq.do_polysemous_training = False
            ivfpq.pq.cp.niter = config.kmeans_iterations  # FAISS: 25 per sub-quantizer, the cost of training
            ivfpq.pq.cp.seed = config.seed
    return index


def new_flat(dim: int):
    spec = IndexSpec("flat", dim, {"factory": "IDMap2,Flat", "rerank": 1})
    return new_index(spec, VectorIndexConfig()), spec


class _ExactNeighbours:
    """Running exact top-(k+1) of a few queries over vectors streamed chunk by chunk."""

    def __init__(self, queries: np.ndarray, k: int) -> None:
        self.queries = np.ascontiguousarray(queries, np.float32)  # (Q, d)
        self.k = k
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.ids = np.zeros((len(queries), 0), np.int64)

    def update(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(self.queries) or not len(ids):
            return
        scores = np.concatenate([self.scores, self.queries @ vectors.T], axis=1)  # (Q, kept + n)
        all_ids = np.concatenate([self.ids, np.broadcast_to(ids, (len(self.queries), len(ids)))], axis=1)
        top = min(self.k, scores.shape[1])
        part = np.argpartition(-scores, top - 1, axis=1)[:, :top]
        self.scores = np.take_along_axis(scores, part, axis=1)
        self.ids = np.take_along_axis(all_ids, part, axis=1)


def build_index(
    count: int,
    dim: int,
    sample: Callable[[int], tuple[np.ndarray, np.ndarray]],
    chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]],
    config: VectorIndexConfig,
    fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None,
):
    """A complete index of ``count`` vectors, of the kind `choose_spec` picks, and its spec.

    ``sample(n)`` returns (ids, vectors) of a random sample (training and calibration queries);
    ``chunks()`` yields (ids, vectors) of the whole collection once; ``fetch(ids)`` returns stored
    (ids, vectors) for exact re-ranking. Memory: the index, the training sample and one chunk.
    """
    spec = choose_spec(count, dim, config)
    log.info("building %s (%s) for %d vectors", spec.type, spec.params["factory"], count)
    index = new_index(spec, config)
    spec.params["trained_on"] = int(count)
    calibration_ids = calibration = None
    if spec.type != "flat":
        wanted = config.calibration_queries
        if spec.type in IVF_KINDS:
            wanted = max(wanted, spec.params["nlist"] * config.train_points_per_list)
        sample_ids, sample_vectors = sample(wanted)
        if spec.type in IVF_KINDS:
            log.info("training on %d sampled vectors", len(sample_vectors))
            started = time.perf_counter()
            index.train(np.ascontiguousarray(sample_vectors, dtype=np.float32))
            spec.params["train_points"] = int(len(sample_vectors))
            spec.params["train_seconds"] = round(time.perf_counter() - started, 2)
        rng = np.random.default_rng(config.seed)
        pick = rng.choice(
            len(sample_ids), size=min(config.calibration_queries, len(sample_ids)), replace=False
        )
        calibration_ids, calibration = sample_ids[pick], np.array(sample_vectors[pick], np.float32)
        del sample_vectors  # the training sample leaves memory before the vectors are added
    log.info("adding the vectors in chunks")
    truth = _ExactNeighbours(
        calibration if calibration is not None else np.zeros((0, dim)), config.calibration_k + 1
    )
    started = time.perf_counter()
    for ids, vectors in chunks():
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        add(index, ids, vectors)
        truth.update(ids, vectors)
    spec.params["add_seconds"] = round(time.perf_counter() - started, 2)
    if spec.type != "flat" and index.ntotal:
        tune(index, spec, calibration_ids, calibration, truth, config, fetch)
    return index, spec


def _search_params(spec: IndexSpec, value: int | None = None, selector=None):
    faiss = faiss_module()
    if spec.type in IVF_KINDS:
        nprobe = int(value or spec.params.get("nprobe", 1))
        quantizer = None
        if "_HNSW" in spec.params.get("factory", ""):
            quantizer = faiss.SearchParametersHNSW(efSearch=max(16, 2 * nprobe))  # autofaiss: 2 nprobe
        params = faiss.SearchParametersIVF(nprobe=nprobe, sel=selector, quantizer_params=quantizer)
        params._keep = quantizer  # SWIG holds a raw pointer: keep the Python object alive
        return params
    if spec.type == "hnsw":
        return faiss.SearchParametersHNSW(
            efSearch=int(value or spec.params.get("ef_search", 16)), sel=selector
        )
    return None if selector is None else faiss.SearchParameters(sel=selector)


def tune(
    index, spec: IndexSpec, query_ids, queries, truth: _ExactNeighbours, config: VectorIndexConfig, fetch
):
    """Smallest power-of-two nprobe / efSearch reaching the target recall@k within ``max_query_ms``."""
    k = config.calibration_k
    order = np.argsort(-truth.scores, axis=1)
    exact = np.take_along_axis(truth.ids, order, axis=1)
    wanted = [set(_without(row, own)[:k]) for row, own in zip(exact, query_ids)]
    name = "nprobe" if spec.type in IVF_KINDS else "ef_search"
    limit = int(spec.params["nlist"]) if spec.type in IVF_KINDS else 4096
    value = 1 if spec.type in IVF_KINDS else 16
    chosen = None
    timing = queries[: min(64, len(queries))]
    while True:
        params = _search_params(spec, value)
        scores, found = search_candidates(index, spec, queries, k + 1, params, fetch)
        hits = sum(len(t & set(_without(row, own)[:k])) for t, row, own in zip(wanted, found, query_ids))
        recall = hits / max(1, sum(len(t) for t in wanted))
        started = time.perf_counter()
        for query in timing:  # one query at a time: the latency a single request sees
            search_candidates(index, spec, query[None], k, params, fetch)
        ms = 1000 * (time.perf_counter() - started) / max(1, len(timing))
        log.info("%s=%d: recall@%d %.3f, %.2f ms per query", name, value, k, recall, ms)
        if ms > config.max_query_ms and chosen is not None:
            break  # the previous value was the last within the time budget
        chosen = (value, recall, ms)
        if recall >= config.target_recall or value >= limit:
            break
        value = min(limit, value * 2)
    value, recall, ms = chosen
    spec.params.update({name: value, "calibration_recall": round(recall, 4), "query_ms": round(ms, 2)})
    spec.params.update(calibration_k=k, calibration_queries=len(queries))
    if spec.type == "ivf_pq":
        faiss_module().extract_index_ivf(index).nprobe = value
    elif spec.type == "ivf_flat":
        index.nprobe = value


def search_candidates(index, spec: IndexSpec, queries: np.ndarray, k: int, params, fetch, rerank=None):
    """Top-k (scores, ids), with ``rerank * k`` candidates re-scored exactly when ``fetch`` is given."""
    factor = spec.rerank if rerank is None else max(1, int(rerank))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    fetched = k * factor if fetch is not None and factor > 1 else k
    scores, ids = index.search(queries, min(fetched, max(1, int(index.ntotal))), params=params)
    if fetched == k:
        return scores, ids
    return rerank_exact(queries, ids, k, fetch)


def rerank_exact(queries: np.ndarray, candidates: np.ndarray, k: int, fetch) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores of candidate ids (Q, C) from the stored vectors; the best k per query, -1 padded."""
    unique = np.unique(candidates[candidates >= 0])
    found_ids, vectors = fetch(unique)
    position = {int(i): n for n, i in enumerate(found_ids.tolist())}
    scores = np.full(candidates.shape, -np.inf, np.float32)
    for q, row in enumerate(candidates):
        where = [(c, position[int(i)]) for c, i in enumerate(row.tolist()) if int(i) in position]
        if where:
            columns, rows = zip(*where)
            scores[q, list(columns)] = vectors[list(rows)] @ queries[q]
    top = min(k, candidates.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    best_scores = np.take_along_axis(scores, order, axis=1)
    best_ids = np.where(np.isfinite(best_scores), np.take_along_axis(candidates, order, axis=1), -1)
    return best_scores, best_ids


def _without(row: np.ndarray, own: int) -> list[int]:
    return [int(i) for i in row if i != own and i >= 0]


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
    index,
    spec: IndexSpec,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray | None = None,
    excluded: np.ndarray | None = None,
    fetch=None,
    rerank: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k), ids (Q, k)); missing results have id -1. ``allowed`` restricts to those ids,
    ``excluded`` hides ids (removed items an index cannot delete); ``fetch`` enables re-ranking."""
    faiss = faiss_module()
    keep = []  # selectors must outlive the search
    selector = None
    if allowed is not None:
        selector = faiss.IDSelectorBatch(np.ascontiguousarray(allowed, np.int64))
        keep.append(selector)
    if excluded is not None and len(excluded):
        inner = faiss.IDSelectorBatch(np.ascontiguousarray(excluded, np.int64))
        hidden = faiss.IDSelectorNot(inner)
        keep += [inner, hidden]
        selector = hidden if selector is None else faiss.IDSelectorAnd(selector, hidden)
        keep.append(selector)
    value = None
    if spec.type in IVF_KINDS and allowed is not None and index.ntotal:
        # a selective filter leaves fewer candidates per list: probe proportionally more lists
        share = max(len(allowed) / index.ntotal, 1e-9)
        value = min(int(spec.params["nlist"]), math.ceil(int(spec.params.get("nprobe", 1)) / share))
    params = _search_params(spec, value, selector)
    return search_candidates(index, spec, queries, k, params, fetch, rerank)


# -- files
def write_atomic(index, path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename: a kill never leaves half a file."""
    faiss = faiss_module()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with disk_full_guard(path):
        try:
            faiss.write_index(index, str(tmp))
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)  # a half-written file must not fill the disk further
            raise
    tmp.replace(path)


def read(path: Path, spec: IndexSpec, mmap: bool = False):
    """Load a saved index; with ``mmap`` an IVF index's lists stay on disk (paged in as probed)."""
    faiss = faiss_module()
    flags = faiss.IO_FLAG_MMAP if mmap and spec.type in IVF_KINDS else 0
    try:
        index = faiss.read_index(str(path), flags)
    except RuntimeError as error:
        raise IndexStoreError(f"cannot read {path}: {error}") from error
    if index.d != spec.dim:
        raise IndexStoreError(f"{path} holds {index.d}-d vectors, index.json says {spec.dim}")
    return index


def is_mapped(index) -> bool:
    """True when the index's inverted lists are read from a memory-mapped file."""
    faiss = faiss_module()
    try:
        lists = faiss.extract_index_ivf(index).invlists
    except RuntimeError:
        return False
    return isinstance(faiss.downcast_InvertedLists(lists), faiss.OnDiskInvertedLists)
