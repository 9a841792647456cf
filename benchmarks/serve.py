"""Search service and vector index benchmarks.

Sections:
  http  16 concurrent clients on loopback against a real `polyclip serve` process (uvicorn), run twice
        on the same index and model: dynamic batching on (--max-batch 32) and off (--max-batch 1).
        Reports throughput, p50 and p99 latency and the mean encoder batch size, for text queries and
        for image queries; every request carries its own text or image. The clients are raw sockets
        with pre-built requests, so they take little of the cores the server runs on. The model is a
        random-weight ViT-B-32 by default (--model for another architecture; the numbers depend on the
        encoder's cost, not on its weights). Two index sizes: 10k items, where the encoder is nearly all
        the cost, and 100k, the largest index searched exactly, where each query's scan of the vectors
        costs as much again (the service batches it too). On CPU, the encoder alone is then timed at
        batch 1 and at the batched run's mean batch size: what batching can gain the encoder.
  ann   1,000,000 unit vectors (d=512) drawn around 1,000 cluster centres (seeded): exact search
        (IndexFlatIP) against the index polyclip chooses automatically for that size (IVF, nprobe
        calibrated to recall@10 >= 0.95). Reports build time, memory (resident growth and index file
        size), recall@10 on held-out queries, and p50/p99 latency of single-query search.

    python benchmarks/serve.py                          # both sections
    python benchmarks/serve.py --sections ann --vectors 200000
    python benchmarks/serve.py --sections http --model tiny-vit --requests 20 --index-items 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values) * 1000
    return {
        "p50_ms": round(float(np.percentile(array, 50)), 2),
        "p99_ms": round(float(np.percentile(array, 99)), 2),
    }


# ----------------------------------------------------------------------------------------------- http
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prepare_index(folder: Path, architecture: str, items: int) -> tuple[Path, Path]:
    """A random-weight model of ``architecture`` and an index of ``items`` random vectors under it."""
    import torch

    import polyclip
    from polyclip.index import Encoder, Index, NewItem
    from polyclip.tokenizers import ClipTokenizer
    from polyclip.transforms import PRESETS, PreprocessConfig

    torch.manual_seed(0)
    model = polyclip.create_model(architecture)
    preprocess = PreprocessConfig.from_dict({**PRESETS["clip"].to_dict(), "image_size": model.image_size})
    model_dir = polyclip.save(model, preprocess, ClipTokenizer(), folder / "model")
    encoder = Encoder.load(model_dir)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((items, encoder.identity.embed_dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with Index.create(folder / "index", encoder.identity) as index:
        for start in range(0, items, 5000):
            index.add(
                [
                    NewItem(f"/virtual/{i}.jpg", {"image": vectors[i]})
                    for i in range(start, min(items, start + 5000))
                ]
            )
        index.save()
    return model_dir, folder / "index"


def query_images(count: int, size: int = 256, seed: int = 1) -> list[bytes]:
    """``count`` distinct photo-like JPEGs (smooth colour fields with grain), so that no two requests
    carry the same image: nothing on the server can answer a repeat from a cache."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, smooth.shape, dtype=np.int16)
        buffer = io.BytesIO()
        Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=90
        )
        images.append(buffer.getvalue())
    return images


def http_request(port: int, path: str, body: bytes, content_type: str) -> bytes:
    """One raw HTTP/1.1 request on a keep-alive connection, built once before the clock starts."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def search_requests(port: int, kind: str, number: int, count: int) -> list[bytes]:
    """Client ``number``'s ``count`` distinct /search requests (texts or images)."""
    if kind == "text":
        return [
            http_request(
                port,
                "/search",
                json.dumps({"text": f"a photo of item {number * 1000 + i} on a table", "k": 10}).encode(),
                "application/json",
            )
            for i in range(count)
        ]
    boundary = "polyclipbenchmarkboundary"
    requests = []
    for image in query_images(count, seed=1000 + number):
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode()
            + image
            + f"\r\n--{boundary}--\r\n".encode()
        )
        requests.append(http_request(port, "/search", body, f"multipart/form-data; boundary={boundary}"))
    return requests


async def read_status(reader: asyncio.StreamReader) -> int:
    """Read one response (headers, then Content-Length bytes of body); return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        (int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), None
    )
    if length is None:
        raise RuntimeError(f"response without Content-Length: {lines[0]!r}")
    await reader.readexactly(length)
    return int(lines[0].split()[1])


async def run_clients(port: int, per_client: list[list[bytes]]) -> tuple[list[float], int, float]:
    """Each client sends its requests one after another on its own connection, all clients at once.

    A load generator of raw sockets and pre-built requests costs the 2-core machine a few tens of
    microseconds a request, so the clients do not compete with the server for the cores they measure.
    """
    latencies: list[float] = []
    failures = 0

    async def client(requests: list[bytes]) -> None:
        nonlocal failures
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for request in requests:
                started = time.perf_counter()
                writer.write(request)
                await writer.drain()
                status = await read_status(reader)
                latencies.append(time.perf_counter() - started)
                failures += status != 200
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(client(requests) for requests in per_client))
    return latencies, failures, time.perf_counter() - started


def load_test(base: str, port: int, kind: str, clients: int, requests_per_client: int, warmup: int) -> dict:
    """``clients`` concurrent clients, each sending ``warmup`` then ``requests_per_client`` distinct
    queries; only the second round is timed."""
    import httpx

    requests = [search_requests(port, kind, n, warmup + requests_per_client) for n in range(clients)]
    asyncio.run(run_clients(port, [r[:warmup] for r in requests]))
    before = batch_stats(httpx.get(base + "metrics").text, kind)
    latencies, failures, elapsed = asyncio.run(run_clients(port, [r[warmup:] for r in requests]))
    after = batch_stats(httpx.get(base + "metrics").text, kind)
    batches = after[1] - before[1]
    return {
        "requests": len(latencies),
        "failed": failures,
        "throughput_rps": round(len(latencies) / elapsed, 1),
        **percentiles(latencies),
        "mean_batch": round((after[0] - before[0]) / batches, 2) if batches else None,
    }


def encoder_ceiling(model_dir: Path, kind: str, batch: int, seconds: float) -> dict:
    """The model alone, in this process once the server has stopped: items/s at batch 1 and at ``batch``.

    Where the encoder is the whole cost (a small index), batching can make the service at most this
    much faster; on a CPU whose cores one image already keeps busy it is well under 2x, on a GPU it is
    large. A large exact index adds a scan per query that batching shares as well.
    """
    import torch

    from polyclip.index import Encoder

    encoder = Encoder.load(model_dir)
    rng = np.random.default_rng(0)

    def run(size: int) -> None:
        if kind == "text":
            encoder.text_vectors(
                [f"a photo of item {int(n)} on a table" for n in rng.integers(0, 10**6, size)]
            )
        else:
            encoder.image_vectors(torch.randn(size, 3, encoder.model.image_size, encoder.model.image_size))

    rates = {}
    for size in (1, batch):
        run(size)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            run(size)
            done += size
        rates[size] = done / (time.perf_counter() - started)
    return {
        "batch": batch,
        "items_per_s_batch_1": round(rates[1], 1),
        f"items_per_s_batch_{batch}": round(rates[batch], 1),
        "ratio": round(rates[batch] / rates[1], 2),
    }


def batch_stats(text: str, kind: str) -> tuple[float, float]:
    """(sum, count) of the encoder batch-size histogram for ``kind`` in a /metrics page."""
    values = {}
    for series in ("sum", "count"):
        found = re.search(rf'polyclip_encoder_batch_size_{series}{{input="{kind}"}} (\S+)', text)
        values[series] = float(found.group(1)) if found else 0.0
    return values["sum"], values["count"]


def run_server(
    index_dir: Path, max_batch: int, max_wait_ms: float, device: str | None
) -> tuple[subprocess.Popen, str, int]:
    import httpx

    port = free_port()
    command = [
        sys.executable, "-m", "polyclip", "serve", str(index_dir), "--port", str(port),
        "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--log-level", "warning",
    ]  # fmt: skip
    if device:
        command += ["--device", device]
    server = subprocess.Popen(command)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(base + "health", timeout=2).status_code == 200:
                return server, base, port
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not start in 300 s")


def http_section(args) -> dict:
    results: dict = {
        "model": f"{args.model} (random weights)",
        "clients": args.clients,
        "requests_per_client": args.requests,
        "warmup_per_client": args.warmup,
        "device": args.device or "cpu",
        "max_wait_ms": args.max_wait_ms,
    }
    for items in args.index_items:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir, index_dir = prepare_index(Path(tmp), args.model, items)
            for kind in args.kinds:
                results[f"{items} items, {kind}"] = load_pair(
                    args, model_dir, index_dir, f"{items:>7,} {kind:5s}", kind
                )
    return results


def load_pair(args, model_dir: Path, index_dir: Path, name: str, kind: str) -> dict:
    """One kind of query against one index: batching off, then on, then the encoder alone."""
    results = {}
    for label, max_batch in (("one at a time (max batch 1)", 1), ("dynamic batching (max batch 32)", 32)):
        server, base, port = run_server(index_dir, max_batch, args.max_wait_ms, args.device)
        try:
            results[label] = load_test(base, port, kind, args.clients, args.requests, args.warmup)
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(f"  {name} {label:32s} {json.dumps(results[label])}", flush=True)
    single = results["one at a time (max batch 1)"]["throughput_rps"]
    batched = results["dynamic batching (max batch 32)"]
    speedup = results["speed-up"] = round(batched["throughput_rps"] / single, 2)
    print(f"  {name} throughput ratio batched / one at a time: {speedup:.2f}x", flush=True)
    if args.device in (None, "cpu"):
        ceiling = results["encoder alone"] = encoder_ceiling(
            model_dir, kind, max(1, round(batched["mean_batch"] or 1)), args.ceiling_seconds
        )
        print(
            f"  {name} encoder alone, batch {ceiling['batch']} / batch 1: {ceiling['ratio']:.2f}x "
            f"({json.dumps(ceiling)})",
            flush=True,
        )
    return results


# ------------------------------------------------------------------------------------------------ ann
class ClusteredVectors:
    """Seeded unit vectors around ``clusters`` random centres; chunk i is reproducible on its own."""

    def __init__(self, count: int, dim: int, clusters: int, spread: float, seed: int = 0) -> None:
        self.count, self.dim, self.spread, self.seed = count, dim, spread, seed
        self.centres = self._unit(
            np.random.default_rng(seed).standard_normal((clusters, dim), dtype=np.float32)
        )
        self.chunk = 50_000

    @staticmethod
    def _unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        centre = self.centres[rng.integers(0, len(self.centres), n)]
        noise = rng.standard_normal((n, self.dim), dtype=np.float32) * (self.spread / np.sqrt(self.dim))
        return self._unit(centre + noise)  # (n, dim)

    def chunks(self):
        for number, start in enumerate(range(0, self.count, self.chunk)):
            n = min(self.chunk, self.count - start)
            yield (
                np.arange(start, start + n, dtype=np.int64),
                self.draw(np.random.default_rng((self.seed, 1, number)), n),
            )

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``n`` vectors: chunks are independent draws, so this is a uniform sample."""
        ids, parts = [], []
        for chunk_ids, vectors in self.chunks():
            ids.append(chunk_ids)
            parts.append(vectors)
            if sum(len(p) for p in parts) >= n:
                break
        return np.concatenate(ids)[:n], np.concatenate(parts)[:n]

    def queries(self, n: int) -> np.ndarray:
        return self.draw(np.random.default_rng((self.seed, 2)), n)


def single_query_latencies(index, queries: np.ndarray, k: int, params=None) -> list[float]:
    latencies = []
    for row in range(len(queries)):
        started = time.perf_counter()
        index.search(queries[row : row + 1], k, params=params)
        latencies.append(time.perf_counter() - started)
    return latencies


def file_bytes(index) -> int:
    import faiss

    with tempfile.NamedTemporaryFile(suffix=".faiss") as handle:
        faiss.write_index(index, handle.name)
        return os.path.getsize(handle.name)


def ann_section(args) -> dict:
    import faiss

    from polyclip.index.vectors import VectorIndexConfig, build_index

    data = ClusteredVectors(args.vectors, args.dim, args.clusters, args.spread)
    queries = data.queries(args.queries)
    k = 10
    results: dict = {
        "vectors": args.vectors,
        "dim": args.dim,
        "clusters": args.clusters,
        "faiss_threads": faiss.omp_get_max_threads(),
    }

    memory = rss_bytes()
    started = time.perf_counter()
    exact = faiss.IndexFlatIP(args.dim)
    for _, vectors in data.chunks():
        exact.add(vectors)
    exact_build = time.perf_counter() - started
    exact_memory = rss_bytes() - memory
    print(f"  exact index built in {exact_build:.1f} s", flush=True)
    _, truth = exact.search(queries, k)  # (Q, k): batched, for recall
    exact_latency = single_query_latencies(exact, queries[: args.exact_latency_queries], k)
    results["exact"] = {
        "type": "IndexFlatIP",
        "build_s": round(exact_build, 1),
        "rss_growth_mb": round(exact_memory / 2**20),
        "file_mb": round(file_bytes(exact) / 2**20),
        **percentiles(exact_latency),
    }
    print(f"  exact: {json.dumps(results['exact'])}", flush=True)

    memory = rss_bytes()
    started = time.perf_counter()
    approximate, spec = build_index(args.vectors, args.dim, data.sample, data.chunks, VectorIndexConfig())
    approximate_build = time.perf_counter() - started
    approximate_memory = rss_bytes() - memory
    _, found = approximate.search(queries, k)
    recall = float(np.mean([len(set(t) & set(f)) / k for t, f in zip(truth, found)]))
    approximate_latency = single_query_latencies(approximate, queries, k)
    results["approximate"] = {
        "type": f"{spec.type} ({type(approximate).__name__})",
        "params": spec.params,
        "build_s": round(approximate_build, 1),
        "rss_growth_mb": round(approximate_memory / 2**20),
        "file_mb": round(file_bytes(approximate) / 2**20),
        "recall_at_10": round(recall, 4),
        **percentiles(approximate_latency),
    }
    print(f"  approximate: {json.dumps(results['approximate'])}", flush=True)
    ratio = results["exact"]["p99_ms"] / results["approximate"]["p99_ms"]
    results["p99_speedup"] = round(ratio, 1)
    print(f"  p99 exact / approximate: {ratio:.1f}x at recall@10 {recall:.4f}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", nargs="+", default=["http", "ann"], choices=["http", "ann"])
    parser.add_argument("--model", default="ViT-B-32", help="architecture of the served random-weight model")
    parser.add_argument("--device", default=None, help="device of the served model (default cpu)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16, help="timed requests per client")
    parser.add_argument("--max-wait-ms", type=float, default=2.0, help="the batched server's window")
    parser.add_argument("--warmup", type=int, default=4, help="untimed requests per client first")
    parser.add_argument(
        "--ceiling-seconds", type=float, default=5.0, help="time per batch size of the encoder-alone run"
    )
    parser.add_argument("--kinds", nargs="+", default=["text", "image"], choices=["text", "image"])
    parser.add_argument(
        "--index-items", type=int, nargs="+", default=[10_000, 100_000], help="index sizes to serve"
    )
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=1_000)
    parser.add_argument("--spread", type=float, default=0.5, help="noise norm around each centre")
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--exact-latency-queries", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    report = {"cpu_count": os.cpu_count()}
    if "http" in args.sections:
        print("http: 16 concurrent clients on loopback", flush=True)
        report["http"] = http_section(args)
    if "ann" in args.sections:
        print(f"ann: {args.vectors:,} clustered unit vectors, d={args.dim}", flush=True)
        report["ann"] = ann_section(args)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
