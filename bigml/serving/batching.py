"""Dynamic batching: requests that arrive close together run as one batch.

A request is submitted with a key (what must be equal for two requests to share a batch: the
endpoint and, for text generation, the decoding settings) and waits for its result. Each of
`workers` loops takes the oldest waiting request, then keeps collecting requests with the same key
for up to `wait_ms` (or until `max_batch_size`), and runs the batch in a thread, so the event loop
keeps accepting requests and streaming tokens meanwhile. Requests whose client has gone before
their batch starts are dropped.

The scheduler is an asyncio deque rather than a library: LitServe has batching built in but no
/v1/completions and runs the model in separate processes linked by zmq (the research notes for
issue 13 compare them); what bigml needs is these few lines around FastAPI.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("bigml")


@dataclass
class Pending:
    key: Hashable
    item: Any
    future: asyncio.Future
    size: int = 1  # rows this request adds to a batch (a prompt list, n > 1)


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    largest: int = 0
    sizes: collections.Counter = field(default_factory=collections.Counter)

    def add(self, n: int) -> None:
        self.batches += 1
        self.rows += n
        self.largest = max(self.largest, n)
        self.sizes[n] += 1


class DynamicBatcher:
    """`await batcher.submit(key, item)` -> the item's result from `run(key, items) -> results`."""

    def __init__(self, run: Callable[[Hashable, list[Any]], list[Any]], max_batch_size: int = 8,
                 wait_ms: float = 10.0, workers: int = 1):
        self.run, self.max_batch_size, self.wait_s, self.workers = run, max_batch_size, wait_ms / 1000, workers
        self.stats = BatchStats()
        self._pending: collections.deque[Pending] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._executor: ThreadPoolExecutor | None = None
        self.busy = 0

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="bigml-batch")
        self._tasks = [asyncio.create_task(self._worker(), name=f"bigml-batcher-{i}") for i in range(self.workers)]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for p in self._pending:
            if not p.future.done():
                p.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def submit(self, key: Hashable, item: Any, size: int = 1) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append(Pending(key, item, future, size))
        self._arrived.set()
        return await future

    def _take(self, batch: list[Pending], key: Hashable) -> None:
        """Move waiting requests with `key` into the batch, oldest first, while they fit."""
        rows = sum(p.size for p in batch)
        keep: collections.deque[Pending] = collections.deque()
        while self._pending:
            p = self._pending.popleft()
            if p.future.done():  # the client went away before its batch started
                continue
            if p.key == key and rows + p.size <= self.max_batch_size:
                batch.append(p)
                rows += p.size
            else:
                keep.append(p)
        self._pending = keep

    async def _next(self) -> Pending:
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            p = self._pending.popleft()
            if not p.future.done():
                return p

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._next()
            batch = [first]
            deadline = loop.time() + self.wait_s
            while True:
                self._take(batch, first.key)
                remaining = deadline - loop.time()
                if sum(p.size for p in batch) >= self.max_batch_size or remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    self._take(batch, first.key)
                    break
            live = [p for p in batch if not p.future.done()]
            if not live:
                continue
            self.stats.add(sum(p.size for p in live))
            self.busy += 1
            try:
                results = await loop.run_in_executor(self._executor, self.run, first.key, [p.item for p in live])
            except Exception as e:  # noqa: BLE001 - the requests of this batch fail; the server goes on
                log.exception("a batch of %d request(s) failed", len(live))
                for p in live:
                    if not p.future.done():
                        p.future.set_exception(e)
                continue
            finally:
                self.busy -= 1
            for p, r in zip(live, results, strict=True):
                if not p.future.done():
                    p.future.set_result(r)
            if self._pending:  # other workers may sleep while requests of another key wait
                self._arrived.set()
