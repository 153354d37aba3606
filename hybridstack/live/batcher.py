"""Micro-batching: requests that arrive within a few milliseconds share one predictor call.

A request's rows go into a queue; one worker task takes the first waiting request and all
requests queued behind it, waits up to ``wait_ms`` for more (or until ``max_rows`` rows are
gathered), scores all their rows in ONE call of ``score(rows)`` on a worker thread (off
the event loop), and hands each request its slice of the result, in order. Scoring 16
rows at once costs little more than scoring one, so throughput under load rises. The
wait happens only under concurrent load (the previous batch held several requests, or
others are queued): a lone client is scored at once and pays no extra latency.

``wait_ms <= 0`` turns batching off: one call per request (still on the worker thread).
All calls, including :meth:`MicroBatcher.run` for explanations, go through one thread, so
the predictor is never used by two threads at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_WAIT_MS = 5.0
DEFAULT_MAX_BATCH_ROWS = 1024


@dataclass
class BatchStats:
    requests: int = 0  # requests scored (each one submit)
    rows: int = 0
    calls: int = 0  # calls of score(): fewer than requests when batching works
    largest_batch: int = 0  # most requests in one call

    def as_dict(self) -> dict[str, int]:
        return {"requests": self.requests, "rows": self.rows, "predictor_calls": self.calls,
                "largest_batch": self.largest_batch}


@dataclass
class _Pending:
    rows: Sequence[Any]
    future: asyncio.Future = field(repr=False)


class MicroBatcher:
    """Gather concurrent :meth:`submit` calls into batched ``score`` calls.

    Parameters
    ----------
    score : rows -> (n, C) array, one row of output per input row (the predictor's
        ``predict_proba``). It runs on the batcher's single worker thread.
    wait_ms : how long the first request of a batch waits for others; <= 0: no batching.
    max_rows : a batch stops growing at this many rows (a request is never split).
    """

    def __init__(self, score: Callable[[list[Any]], np.ndarray], wait_ms: float = DEFAULT_WAIT_MS,
                 max_rows: int = DEFAULT_MAX_BATCH_ROWS):
        self.score = score
        self.wait_s = max(float(wait_ms), 0.0) / 1000
        self.max_rows = max(int(max_rows), 1)
        self.stats = BatchStats()
        self._executor: ThreadPoolExecutor | None = None
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_batch = 1  # requests in the previous batch (a first lone request: no wait)

    @property
    def enabled(self) -> bool:
        return self.wait_s > 0

    # -- public ---------------------------------------------------------------------------------
    async def submit(self, rows: Sequence[Any]) -> np.ndarray:
        """The score of ``rows`` (one output row per input row), batched with other callers."""
        self._ensure_worker()
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(list(rows), future))
        return await future

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the worker thread (between batches), e.g. an explanation."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1,
                                                thread_name_prefix="hybridstack-predict")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._worker = self._queue = self._loop = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- the worker -----------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._loop is not loop:
            self._loop = loop
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._work(), name="hybridstack-microbatcher")

    async def _work(self) -> None:
        while True:
            batch = await self._gather()
            await self._score_batch(batch)

    async def _gather(self) -> list[_Pending]:
        """The next batch: the first waiting request, every request already queued behind it
        and, under concurrent load, those that arrive within ``wait_ms`` of the first."""
        queue = self._queue
        batch = [await queue.get()]
        if not self.enabled:
            return batch
        n_rows = len(batch[0].rows)
        loop = asyncio.get_running_loop()
        # A lone client (the previous batch held one request, nobody else is queued) gets
        # no wait: there is nobody to batch with. Under load the wait gathers the requests
        # that clients send right after their previous answers.
        wait = self._last_batch != 1 or not queue.empty()
        deadline = loop.time() + self.wait_s
        while n_rows < self.max_rows:
            if queue.empty():
                remaining = deadline - loop.time()
                if not wait or remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                item = queue.get_nowait()
            if n_rows + len(item.rows) > self.max_rows:
                # too big for this batch: it starts the next one (the order of requests holds)
                self._requeue_first(item)
                break
            batch.append(item)
            n_rows += len(item.rows)
        self._last_batch = len(batch)
        return batch

    def _requeue_first(self, item: _Pending) -> None:
        queue = self._queue
        rest = []
        while not queue.empty():
            rest.append(queue.get_nowait())
        for pending in (item, *rest):
            queue.put_nowait(pending)

    async def _score_batch(self, batch: list[_Pending]) -> None:
        live = [p for p in batch if not p.future.done()]  # a cancelled client needs nothing
        if not live:
            return
        rows = [row for pending in live for row in pending.rows]
        try:
            result = await self.run(self._count_call, rows, len(live))
        except Exception as err:
            if len(live) == 1:
                _set_exception(live[0].future, err)
                return
            # one bad request must not fail the others: score each on its own
            for pending in live:
                await self._score_batch([pending])
            return
        start = 0
        for pending in live:
            end = start + len(pending.rows)
            if not pending.future.done():
                pending.future.set_result(result[start:end])
            start = end

    def _count_call(self, rows: list[Any], n_requests: int) -> np.ndarray:
        result = self.score(rows)
        if len(result) != len(rows):
            raise RuntimeError(f"score returned {len(result)} rows for {len(rows)}")
        stats = self.stats
        stats.calls += 1
        stats.requests += n_requests
        stats.rows += len(rows)
        stats.largest_batch = max(stats.largest_batch, n_requests)
        return result


def _set_exception(future: asyncio.Future, err: BaseException) -> None:
    if not future.done():
        future.set_exception(err)
