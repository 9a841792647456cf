"""Load test of `polyclip serve` under a mix of good and hostile requests, while `polyclip index add`
writes to the same index.

32 concurrent clients on loopback (HTTP/1.1 keep-alive, httpx) for 60 s against a real server
process: 80% text searches, 4% image uploads (/search with an image), 4% thumbnails (/images/{id}),
12% bad requests (malformed JSON, out-of-range k, unknown fields, hostile templates, non-ASCII ids,
corrupt images, oversize texts, wrong content types; each must be a 4xx). Meanwhile `polyclip index
add` adds a folder of new images to the index the server is reading, and a separate poller asks for
/health twice a second. A warm-up of a few seconds comes first (first-use allocations, thumbnail
cache), then the server's resident memory (RSS) is read, the measured run goes, and RSS is read again.

Reports requests per second, p50/p99 latency per request kind, 2xx/4xx/5xx counts, RSS before and
after, the /health answers (all must be 200) and the add's duration. Targets: no 5xx, RSS growth under
10%, /health answering throughout.

The model is a random-weight ``tiny-vit`` by default (the encoder's cost is not what this measures;
--model for another architecture); the collection is real JPEG files, so thumbnails are real work.

    python benchmarks/load.py                    # 32 clients, 60 s
    python benchmarks/load.py --duration 10      # shorter
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import free_port, percentiles, query_images  # noqa: E402  (the serve benchmark's helpers)

TEXT_SHARE, IMAGE_SHARE, THUMBNAIL_SHARE = 0.80, 0.04, 0.04  # the rest (12%) are bad requests


def write_collection(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` distinct small JPEG photos-like files."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(query_images(count, size=96, seed=seed)):
        path = folder / f"{seed}-{i:05d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


def prepare(root: Path, architecture: str, items: int, added: int) -> tuple[Path, Path, Path]:
    """A random-weight model, an index of ``items`` real image files, and a folder of ``added`` more."""
    import torch

    import polyclip
    from polyclip.index import BuildOptions, Encoder, Index, add_paths
    from polyclip.index.build import collect_inputs
    from polyclip.tokenizers import ClipTokenizer
    from polyclip.transforms import PRESETS, PreprocessConfig

    torch.manual_seed(0)
    model = polyclip.create_model(architecture)
    preprocess = PreprocessConfig.from_dict({**PRESETS["clip"].to_dict(), "image_size": model.image_size})
    model_dir = polyclip.save(model, preprocess, ClipTokenizer(), root / "model")
    encoder = Encoder.load(model_dir)
    write_collection(root / "collection" / "first", items, seed=1)
    write_collection(root / "collection" / "later", added, seed=2)
    found, annotations, _ = collect_inputs([root / "collection" / "first"], None)
    with Index.create(root / "index", encoder.identity) as index:
        add_paths(index, encoder, found, annotations, BuildOptions(batch_size=64, progress=False))
    return model_dir, root / "index", root / "collection" / "later"


def bad_requests(corrupt_jpeg: bytes) -> list[tuple[str, str, dict]]:
    """(method, path, httpx keyword arguments) of requests that must each be answered with a 4xx."""
    image = {"image": ("q.jpg", corrupt_jpeg, "image/jpeg")}
    return [
        ("POST", "/search", {"content": b"{text:", "headers": {"content-type": "application/json"}}),
        ("POST", "/search", {"json": {"text": "a cat", "k": 0}}),
        ("POST", "/search", {"json": {"text": "a cat", "k": 10**12}}),
        ("POST", "/search", {"json": {"text": "a cat", "sql": "drop table"}}),
        ("POST", "/search", {"json": {"text": "word " * 500}}),
        ("POST", "/search", {"json": {"text": "a", "filter": {"x') OR 1=1 --": 1}}}),
        ("POST", "/search", {"content": b"cats", "headers": {"content-type": "text/plain"}}),
        ("POST", "/search", {"files": image}),
        (
            "POST",
            "/classify",
            {"files": image, "data": {"labels": "cat,dog", "template": "{{}}{:>100000000}"}},
        ),
        ("POST", "/classify", {"files": image, "data": {"labels": "cat,dog", "template": "{} and {}"}}),
        ("GET", "/images/²", {}),
        ("GET", "/images/١", {}),
        ("GET", "/images/..%2F..%2Fetc%2Fpasswd", {}),
        ("POST", "/knn-service", {"content": b'{"image_url": "http://127.0.0.1:9/x.jpg"}'}),
        ("POST", "/embed", {"json": {"texts": []}}),
    ]


class Load:
    """The clients' shared tallies."""

    def __init__(self) -> None:
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, Counter] = defaultdict(Counter)
        self.bad_not_4xx: list[str] = []
        self.errors: Counter = Counter()

    def record(self, kind: str, status: int, seconds: float) -> None:
        self.latencies[kind].append(seconds)
        self.statuses[kind][f"{status // 100}xx"] += 1


async def run_clients(
    base: str, clients: int, seconds: float, ids: list[int], images: list[bytes], load: Load
):
    import httpx

    bad = bad_requests(images[0][: len(images[0]) // 3])
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as http:

        async def client(number: int) -> None:
            rng = random.Random(number)
            deadline = time.monotonic() + seconds
            sent = 0
            while time.monotonic() < deadline:
                draw = rng.random()
                if draw < TEXT_SHARE:
                    kind, method, path = "text search", "POST", "/search"
                    kwargs = {"json": {"text": f"a photo of thing {number}-{sent} on a table", "k": 10}}
                elif draw < TEXT_SHARE + IMAGE_SHARE:
                    kind, method, path = "image upload", "POST", "/search"
                    kwargs = {
                        "files": {"image": ("q.jpg", rng.choice(images), "image/jpeg")},
                        "data": {"k": "10"},
                    }
                elif draw < TEXT_SHARE + IMAGE_SHARE + THUMBNAIL_SHARE:
                    kind, method, path, kwargs = "thumbnail", "GET", f"/images/{rng.choice(ids)}", {}
                else:
                    kind = "bad request"
                    method, path, kwargs = rng.choice(bad)
                sent += 1
                started = time.perf_counter()
                try:
                    response = await http.request(method, path, **kwargs)
                except httpx.HTTPError as error:
                    load.errors[type(error).__name__] += 1
                    continue
                load.record(kind, response.status_code, time.perf_counter() - started)
                if kind == "bad request" and not 400 <= response.status_code < 500:
                    load.bad_not_4xx.append(f"{method} {path}: {response.status_code}")

        await asyncio.gather(*(client(i) for i in range(clients)))


def poll_health(base: str, stop: threading.Event, answers: list[tuple[int, float]]) -> None:
    import httpx

    with httpx.Client(base_url=base, timeout=5) as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status = http.get("/health").status_code
            except httpx.HTTPError:
                status = 0
            answers.append((status, time.perf_counter() - started))
            stop.wait(0.5)


def start_server(index_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "polyclip",
        "serve",
        str(index_dir),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(command, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited during start-up: {log.read_text()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return server, base
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not start in 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of measured load")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before RSS is read")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--model", default="tiny-vit", help="architecture (random weights)")
    parser.add_argument("--items", type=int, default=2000, help="images indexed before the run")
    parser.add_argument(
        "--add", type=int, default=2000, help="images `polyclip index add` adds during the run"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        _, index_dir, later = prepare(root, args.model, args.items, args.add)
        from polyclip.index import Index

        with Index(index_dir) as index:
            ids = [record.id for record in index.store.list_items(limit=args.items)]
        images = query_images(32, size=224, seed=3)
        server, base = start_server(index_dir, root / "server.log")
        process = psutil.Process(server.pid)
        try:
            asyncio.run(run_clients(base, args.clients, args.warmup, ids, images, Load()))
            rss_before = process.memory_info().rss
            stop, health = threading.Event(), []
            poller = threading.Thread(target=poll_health, args=(base, stop, health), daemon=True)
            poller.start()
            add_started = time.monotonic()
            adder = subprocess.Popen(
                [sys.executable, "-m", "polyclip", "index", "add", str(index_dir), str(later), "--quiet"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            load = Load()
            started = time.perf_counter()
            asyncio.run(run_clients(base, args.clients, args.duration, ids, images, load))
            elapsed = time.perf_counter() - started
            add_running_at_end = adder.poll() is None
            add_code = adder.wait()
            add_seconds = time.monotonic() - add_started
            stop.set()
            poller.join()
            rss_after = process.memory_info().rss
            with Index(index_dir) as index:
                items_after = len(index)
        finally:
            server.terminate()
            server.wait(30)
        if add_code != 0:
            print(f"index add failed ({add_code}): {adder.stderr.read().decode()[-2000:]}", file=sys.stderr)

    totals = Counter()
    for counts in load.statuses.values():
        totals.update(counts)
    requests = sum(totals.values())
    every = [seconds for values in load.latencies.values() for seconds in values]
    health_ok = sum(1 for status, _ in health if status == 200)
    results = {
        "clients": args.clients,
        "seconds": round(elapsed, 1),
        "requests": requests,
        "requests_per_s": round(requests / elapsed, 1),
        "latency": percentiles(every),
        "by_kind": {
            kind: {"count": len(values), **percentiles(values), **dict(load.statuses[kind])}
            for kind, values in sorted(load.latencies.items())
        },
        "status": {key: totals.get(key, 0) for key in ("2xx", "3xx", "4xx", "5xx")},
        "client_errors": dict(load.errors),
        "bad_requests_not_4xx": load.bad_not_4xx[:10],
        "server_rss_mb": {"before": round(rss_before / 2**20, 1), "after": round(rss_after / 2**20, 1)},
        "rss_growth_pct": round(100 * (rss_after - rss_before) / rss_before, 2),
        "health": {
            "polls": len(health),
            "ok": health_ok,
            "max_ms": round(1000 * max((s for _, s in health), default=0.0), 1),
        },
        "index_add": {
            "images": args.add,
            "exit_code": add_code,
            "seconds": round(add_seconds, 1),
            "still_running_when_load_ended": add_running_at_end,
            "items_before": args.items,
            "items_after": items_after,
        },
    }
    targets = {
        "no 5xx": totals.get("5xx", 0) == 0 and not load.errors,
        "every bad request a 4xx": not load.bad_not_4xx,
        "RSS growth < 10%": results["rss_growth_pct"] < 10,
        "/health answered throughout": health_ok == len(health) > 0,
        "index add succeeded": add_code == 0 and items_after == args.items + args.add,
    }
    results["targets"] = targets
    print(
        f"{args.clients} clients, {elapsed:.0f} s: {requests} requests, {results['requests_per_s']} req/s, "
        f"p50 {results['latency']['p50_ms']} ms, p99 {results['latency']['p99_ms']} ms"
    )
    for kind, row in results["by_kind"].items():
        print(
            f"  {kind:13s} {row['count']:6d}  p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms  "
            + "  ".join(f"{key} {row[key]}" for key in ("2xx", "4xx", "5xx") if key in row)
        )
    print(f"  status: {results['status']}; client errors: {dict(load.errors) or 'none'}")
    print(
        f"  server RSS {results['server_rss_mb']['before']} MB -> {results['server_rss_mb']['after']} MB "
        f"({results['rss_growth_pct']:+.2f}%)"
    )
    print(f"  /health: {health_ok}/{len(health)} answered 200, slowest {results['health']['max_ms']} ms")
    print(
        f"  index add of {args.add} images: exit {add_code}, {add_seconds:.1f} s "
        f"({'still running' if add_running_at_end else 'finished'} when the load ended), "
        f"{args.items} -> {items_after} items"
    )
    for name, met in targets.items():
        print(f"  target {name}: {'met' if met else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if not all(targets.values()):
        sys.exit(1)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
