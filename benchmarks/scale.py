"""The vector index at scale: N unit vectors (default 10,000,000, d=512) under a memory budget.

The vectors are drawn around N/1,000 cluster centres (seeded, regenerated chunk by chunk, never all
in memory) and go through polyclip's own `Index`: items committed to SQLite and the float16 vector
store in chunks, then `Index.save()` chooses the kind for the budget, trains it on a sample, adds the
vectors streamed from the store and tunes nprobe. Reported, measured in one run:

  build      seconds (commit of items and vectors; FAISS train, add, tune), peak resident memory of
             the process during the build (sampled every 0.1 s, and the kernel's high-water mark)
  disk       the FAISS file, the float16 vector store, the SQLite metadata
  recall@10  of 1,000 held-out queries (same distribution) through `Index.search`, against the exact
             top 10 found by a streamed scan of the same generated float32 vectors
  latency    p50 / p99 of single-query `Index.search` (k=10, metadata included) on the index opened
             read-only as the service opens it (IVF lists memory-mapped), and batched throughput
             (batches of 100)

With ``--autofaiss-python`` (an interpreter where the autofaiss package imports; it pins NumPy < 2
and cannot share polyclip's environment), the same vectors are written as .npy files and indexed by
autofaiss's ``build_index`` with the same budget and query time; the same figures are measured for its
index, searched with the same queries against the same ground truth.

    python benchmarks/scale.py --n 100000 --work /tmp/scale-100k          # a quick run
    nohup python benchmarks/scale.py --work /data/scale-10m > scale.log &    # the full 10M run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

NOISE = 0.5  # norm of the per-point offset from its centre, before normalising (cosine ~0.9 to it)


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakSampler:
    """The highest resident memory seen while the block runs (sampled every 0.1 s)."""

    def __enter__(self):
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class ClusteredVectors:
    """Unit vectors around ``clusters`` centres; chunk c is the same whenever it is regenerated."""

    def __init__(self, n: int, dim: int, clusters: int, seed: int = 0, chunk: int = 100_000) -> None:
        self.n, self.dim, self.chunk, self.seed = n, dim, chunk, seed
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)  # (C, d)

    def _draw(self, rng, count: int) -> np.ndarray:
        which = rng.integers(0, len(self.centres), count)
        noise = rng.standard_normal((count, self.dim), dtype=np.float32) * (NOISE / np.sqrt(self.dim))
        points = self.centres[which] + noise
        return points / np.linalg.norm(points, axis=1, keepdims=True)

    def chunks(self):
        """(first index, vectors (n, d) float32) covering 0 .. n-1."""
        for number, start in enumerate(range(0, self.n, self.chunk)):
            rng = np.random.default_rng([self.seed, 1, number])
            yield start, self._draw(rng, min(self.chunk, self.n - start))

    def queries(self, count: int) -> np.ndarray:
        return self._draw(np.random.default_rng([self.seed, 2]), count)


def exact_top_k(data: ClusteredVectors, queries: np.ndarray, k: int) -> np.ndarray:
    """(Q, k) indices of the exact nearest vectors, by a streamed scan of the regenerated chunks."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start, vectors in data.chunks():
        scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
        ids = np.concatenate(
            [best_ids, np.broadcast_to(np.arange(start, start + len(vectors)), (len(queries), len(vectors)))],
            axis=1,
        )
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best_scores, best_ids = (
            np.take_along_axis(scores, part, axis=1),
            np.take_along_axis(ids, part, axis=1),
        )
    order = np.argsort(-best_scores, axis=1)
    return np.take_along_axis(best_ids, order, axis=1)


def recall_at_k(found: list[list[int]], truth: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(row[:k]) & set(t[:k].tolist())) / k for row, t in zip(found, truth)]))


def latency(search_one, queries: np.ndarray) -> dict[str, float]:
    times = []
    for query in queries:
        started = time.perf_counter()
        search_one(query)
        times.append(time.perf_counter() - started)
    ms = np.asarray(times) * 1000
    return {
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def gib(count: float) -> float:
    return round(count / 2**30, 3)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------- polyclip
def run_polyclip(args, data: ClusteredVectors, queries: np.ndarray, truth: np.ndarray | None, log) -> dict:
    from polyclip.index import Index, ModelIdentity, NewItem, QueryEmbeddings, VectorIndexConfig
    from polyclip.index.vectors import parse_bytes

    folder = Path(args.work) / "polyclip-index"
    if folder.exists():
        shutil.rmtree(folder)
    identity = ModelIdentity(source="synthetic-clustered", weights_sha256="0" * 64, embed_dim=args.dim)
    config = VectorIndexConfig(
        max_memory_bytes=parse_bytes(args.max_index_memory), max_query_ms=args.max_query_ms
    )
    result: dict = {}
    started = time.perf_counter()
    with PeakSampler() as sampler:
        with Index.create(folder, identity, config) as index:
            for start, vectors in data.chunks():
                index.add([NewItem(f"v/{start + i}", {"image": vectors[i]}) for i in range(len(vectors))])
                if start // data.chunk % 10 == 0:
                    log(
                        f"committed {start + len(vectors):,} / {data.n:,} ({time.perf_counter() - started:.0f} s)"
                    )
            committed = time.perf_counter()
            log("building the FAISS index")
            index.save()
            spec = index.spec()
    finished = time.perf_counter()
    result["build"] = {
        "commit_seconds": round(committed - started, 1),
        "faiss_seconds": round(finished - committed, 1),
        "total_seconds": round(finished - started, 1),
        "peak_rss_gib": gib(sampler.peak),
        "kind": spec.type,
        "params": spec.params,
    }
    log(f"built: {json.dumps(result['build'])}")
    result["disk"] = {
        "faiss_file_gib": gib((folder / "vectors.faiss").stat().st_blocks * 512),
        "vector_store_gib": gib(folder_bytes(folder / "vectors")),
        "sqlite_gib": gib(sum(p.stat().st_blocks * 512 for p in folder.glob("metadata.sqlite*"))),
    }
    before_open = rss_bytes()
    with Index(folder) as reader:  # read-only, as the service opens it: IVF lists memory-mapped
        reader.spec("image")
        result["serve"] = {
            "rss_after_open_gib": gib(rss_bytes()),
            "rss_growth_open_gib": gib(rss_bytes() - before_open),
        }
        fingerprint = identity.fingerprint
        result["serve"]["mapped"] = _mapped(reader)
        k = 10
        found = []
        for batch in np.array_split(queries, max(1, len(queries) // 100)):
            found += [
                [h.id - 1 for h in row] for row in reader.search(QueryEmbeddings(batch, fingerprint), k)
            ]
        if truth is not None:
            result["recall@10"] = round(recall_at_k(found, truth, k), 4)
        result["latency"] = latency(
            lambda q: reader.search(QueryEmbeddings(q[None], fingerprint), k), queries
        )
        started = time.perf_counter()
        for batch in np.array_split(queries, max(1, len(queries) // 100)):
            reader.search(QueryEmbeddings(batch, fingerprint), k)
        result["batched_qps"] = round(len(queries) / (time.perf_counter() - started), 1)
        result["serve"]["rss_after_queries_gib"] = gib(rss_bytes())
    return result


def _mapped(index) -> bool:
    from polyclip.index.vectors import is_mapped

    return is_mapped(index._spaces["image"].index)


# -------------------------------------------------------------------------------------- autofaiss
AUTOFAISS_CHILD = r"""
import json, resource, sys, time
import faiss, numpy as np
from autofaiss import build_index
embeddings, index_path, infos_path, budget, query_ms, queries_path, truth_path, out_path = sys.argv[1:9]
started = time.perf_counter()
build_index(embeddings=embeddings, index_path=index_path, index_infos_path=infos_path,
            max_index_memory_usage=budget, current_memory_available="6G", metric_type="ip",
            max_index_query_time_ms=float(query_ms), save_on_disk=True, verbose=30)
build_seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
index = faiss.read_index(index_path, faiss.IO_FLAG_MMAP)
infos = json.load(open(infos_path))
queries = np.load(queries_path).astype("float32")
truth = np.load(truth_path)
found = index.search(queries, 10)[1]
recall = float(np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth)]))
times = []
for q in queries:
    t = time.perf_counter(); index.search(q[None], 10); times.append(time.perf_counter() - t)
t = time.perf_counter()
for batch in np.array_split(queries, max(1, len(queries) // 100)):
    index.search(batch, 10)
qps = len(queries) / (time.perf_counter() - t)
ms = np.asarray(times) * 1000
json.dump({"build_seconds": round(build_seconds, 1), "peak_rss_gib": round(peak / 2**30, 3),
           "index_key": infos.get("index_key"), "index_param": infos.get("index_param"),
           "index_file_gib": round(__import__("os").path.getsize(index_path) / 2**30, 3),
           "recall@10": round(recall, 4), "p50_ms": round(float(np.percentile(ms, 50)), 2),
           "p99_ms": round(float(np.percentile(ms, 99)), 2), "batched_qps": round(qps, 1)},
          open(out_path, "w"))
"""


def run_autofaiss(args, data: ClusteredVectors, queries: np.ndarray, truth: np.ndarray, log) -> dict:
    work = Path(args.work) / "autofaiss"
    if work.exists():
        shutil.rmtree(work)
    (work / "embeddings").mkdir(parents=True)
    for start, vectors in data.chunks():  # autofaiss reads .npy files; float16 halves the disk
        np.save(work / "embeddings" / f"{start:012d}.npy", vectors.astype(np.float16))
    np.save(work / "queries.npy", queries)
    np.save(work / "truth.npy", truth)
    command = [
        args.autofaiss_python, "-c", AUTOFAISS_CHILD, str(work / "embeddings"), str(work / "knn.index"),
        str(work / "infos.json"), args.max_index_memory.replace("GB", "G"), str(args.max_query_ms),
        str(work / "queries.npy"), str(work / "truth.npy"), str(work / "result.json"),
    ]  # fmt: skip
    log("building with autofaiss")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr[-2000:]}
    result = json.loads((work / "result.json").read_text())
    shutil.rmtree(work / "embeddings")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000_000, help="vectors in the collection")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=None, help="default: n / 1000")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--max-index-memory", default="4GB")
    parser.add_argument("--max-query-ms", type=float, default=10.0)
    parser.add_argument("--chunk", type=int, default=100_000, help="vectors generated and committed at once")
    parser.add_argument("--work", default=None, help="folder for the indexes (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the index folders")
    parser.add_argument("--autofaiss-python", default=None, help="interpreter with autofaiss installed")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    temporary = args.work is None
    args.work = args.work or tempfile.mkdtemp(prefix="polyclip-scale-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:8.1f} s] {message}", file=sys.stderr, flush=True)

    data = ClusteredVectors(args.n, args.dim, args.clusters or max(1, args.n // 1000), chunk=args.chunk)
    queries = data.queries(args.queries)
    results: dict = {"n": args.n, "dim": args.dim, "clusters": len(data.centres), "queries": args.queries,
                     "max_index_memory": args.max_index_memory, "max_query_ms": args.max_query_ms,
                     "cpus": os.cpu_count()}  # fmt: skip
    log("exact ground truth by a streamed scan")
    t = time.perf_counter()
    truth = exact_top_k(data, queries, 10)
    results["ground_truth_seconds"] = round(time.perf_counter() - t, 1)
    results["polyclip"] = run_polyclip(args, data, queries, truth, log)
    log(json.dumps(results["polyclip"]))
    if args.autofaiss_python:
        results["autofaiss"] = run_autofaiss(args, data, queries, truth, log)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if temporary and not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    elif not args.keep:
        shutil.rmtree(Path(args.work) / "polyclip-index", ignore_errors=True)


if __name__ == "__main__":
    main()
