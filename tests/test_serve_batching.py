"""DynamicBatcher: concurrent requests share forward passes, each caller gets its own results, limits hold."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from polyclip.serve.batching import DynamicBatcher


class SlowDoubler:
    """run_batch that takes a while (like a forward pass) and records the batch sizes it saw."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds
        self.sizes: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, items):
        self.sizes.append(len(items))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.seconds)
        return [2 * item for item in items]


def run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_share_batches_and_get_their_own_results():
    work = SlowDoubler()
    with ThreadPoolExecutor(1, thread_name_prefix="encoder") as executor:
        batcher = DynamicBatcher(work, executor, max_batch=8, max_wait_ms=20)

        async def main():
            results = await asyncio.gather(*(batcher.submit([i]) for i in range(20)))
            await batcher.stop()
            return results

        results = run(main())
    assert results == [[2 * i] for i in range(20)]
    assert sum(work.sizes) == 20 and max(work.sizes) == 8 and len(work.sizes) <= 4
    assert all(name.startswith("encoder") for name in work.threads)  # the model runs in its own thread


def test_max_batch_one_is_one_request_at_a_time():
    work = SlowDoubler(0.001)
    with ThreadPoolExecutor(1) as executor:
        batcher = DynamicBatcher(work, executor, max_batch=1, max_wait_ms=5)

        async def main():
            return await asyncio.gather(*(batcher.submit([i]) for i in range(6)))

        assert run(main()) == [[2 * i] for i in range(6)]
    assert work.sizes == [1] * 6


def test_multi_item_requests_are_kept_whole():
    work = SlowDoubler(0.01)
    with ThreadPoolExecutor(1) as executor:
        batcher = DynamicBatcher(work, executor, max_batch=4, max_wait_ms=20)

        async def main():
            return await asyncio.gather(
                batcher.submit([1, 2, 3]),
                batcher.submit([4, 5]),
                batcher.submit(list(range(10))),
                batcher.submit([6]),
            )

        results = run(main())
    assert results[0] == [2, 4, 6] and results[1] == [8, 10] and results[3] == [12]
    assert results[2] == [2 * i for i in range(10)]  # larger than max_batch: runs alone, whole
    assert 10 in work.sizes and all(size <= 4 for size in work.sizes if size != 10)


def test_errors_reach_every_caller_of_the_batch_and_the_batcher_keeps_going():
    calls = []

    def flaky(items):
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return items

    with ThreadPoolExecutor(1) as executor:
        batcher = DynamicBatcher(flaky, executor, max_batch=8, max_wait_ms=30)

        async def main():
            first = await asyncio.gather(batcher.submit([1]), batcher.submit([2]), return_exceptions=True)
            second = await batcher.submit([3])
            return first, second

        first, second = run(main())
    assert all(isinstance(result, RuntimeError) for result in first)
    assert second == [3]


def test_idle_request_waits_at_most_the_window():
    with ThreadPoolExecutor(1) as executor:
        batcher = DynamicBatcher(lambda items: items, executor, max_batch=64, max_wait_ms=30)

        async def main():
            started = time.perf_counter()
            await batcher.submit(["alone"])
            return time.perf_counter() - started

        assert run(main()) < 1.0


def test_batcher_rejects_a_zero_batch():
    with pytest.raises(ValueError):
        DynamicBatcher(lambda items: items, None, max_batch=0)


WORKER = """
import sys
from polyclip.serve.metrics import ServiceMetrics
metrics = ServiceMetrics(lambda: {"image": 7})
if sys.argv[1] == "work":
    metrics.requests.labels(route="/search", method="POST", status="200").inc()
    metrics.batch_size.labels(input="text").observe(3)
else:
    sys.stdout.write(metrics.render().decode())
"""


def test_metrics_of_several_worker_processes_are_aggregated(tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR set, /metrics of any worker sums what every worker counted."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for _ in range(2):
        subprocess.run([sys.executable, "-c", WORKER, "work"], env=env, check=True)
    text = subprocess.run(
        [sys.executable, "-c", WORKER, "render"], env=env, check=True, capture_output=True, text=True
    ).stdout
    assert 'polyclip_requests_total{method="POST",route="/search",status="200"} 2.0' in text
    assert 'polyclip_encoder_batch_size_count{input="text"} 2.0' in text
    assert 'polyclip_index_vectors{space="image"} 7.0' in text
