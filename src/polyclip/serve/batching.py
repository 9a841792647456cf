"""Dynamic batching: concurrent requests share one forward pass of the encoder.

Requests wait in an asyncio queue. The batching task takes whatever is queued (up to ``max_batch``
items), waits at most ``max_wait_ms`` for more when the batch is not full, and runs the batch in the
encoder's worker thread. While a batch runs, new requests queue up and form the next batch, so under
load batches grow by themselves and when idle a request waits at most ``max_wait_ms``. This is the
scheme of serving systems such as NVIDIA Triton's dynamic batcher and TorchServe's batch aggregation.
A request carries one or more items (several texts for /embed); a request larger than ``max_batch``
runs alone. ``max_batch=1`` serves one request at a time (the baseline of benchmarks/serve.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any


@dataclass
class _Request:
    items: Sequence[Any]
    future: asyncio.Future


class DynamicBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], Sequence[Any]],
        executor: Executor,
        max_batch: int = 32,
        max_wait_ms: float = 2.0,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.run_batch = run_batch  # list of items -> one result per item, in order
        self.executor = executor
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.on_batch = on_batch  # called with each batch's size (metrics)
        self._queue: asyncio.Queue[_Request] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._carry: _Request | None = None  # a request that did not fit into the previous batch

    async def submit(self, items: Sequence[Any]) -> list[Any]:
        """Results for ``items``, computed together with other requests' items."""
        if not items:
            return []
        self._ensure_started()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(items, future))
        return await future

    def _ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._carry = None
            self._task = loop.create_task(self._run(), name="polyclip-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _next_batch(self) -> list[_Request]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, size = [first], len(first.items)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait
        while size < self.max_batch:
            try:
                request = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    request = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if size + len(request.items) > self.max_batch:
                self._carry = request
                break
            batch.append(request)
            size += len(request.items)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [request for request in batch if not request.future.cancelled()]  # clients gone
            if not batch:
                continue
            items = [item for request in batch for item in request.items]
            if self.on_batch is not None:
                self.on_batch(len(items))
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, items)
            except Exception as error:  # the whole batch fails together; each caller gets the error
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(error)
                continue
            start = 0
            for request in batch:
                end = start + len(request.items)
                if not request.future.done():
                    request.future.set_result(list(results[start:end]))
                start = end
