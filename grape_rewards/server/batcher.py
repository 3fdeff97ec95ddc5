"""Micro-batching: many concurrent requests, one device worker, large batches.

Requests append their samples to a bounded FIFO queue and await a future. One dispatcher task on the
event loop takes queued requests (whole requests, up to ``max_batch_size`` samples) and runs them as one
:meth:`RewardScorer.score_batch` call on a single device thread; each request gets its own slice back.

This is continuous batching: while the device runs batch k, new requests pile up and become batch k+1.
When the worker is free it never sits on a lone request: it yields to the event loop once (so requests
whose bytes have already arrived join) and goes. The one exception: right after a batch, the worker waits
up to ``max_wait_ms`` for the callers of that batch to come back (closed-loop RL workers send their next
sample as soon as they get an answer), i.e. until the queue holds as many samples as the last batch plus
those queued when it ended. Without that, a cohort of returning callers is split in two batches, and small
batches waste the corpus pass. So a request waits at most the rest of the batch running when it arrived
plus ``max_wait_ms``; after the worker has been idle for ``max_wait_ms``, a new request goes at once (at
concurrency 1 there is no wait at all).

A full queue raises :class:`QueueFull` (the app answers 503 with Retry-After) instead of growing. If a
batch raises, each of its requests is rescored alone, so one bad request cannot fail the others.

Top-k search (``/retrieve``) goes through the same queue, admission rule and worker
(:meth:`MicroBatcher.submit_retrieve`): consecutive search requests are run as one batch (one encoder call and
one search for all their queries), so search can neither starve scoring nor bypass the queue limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..rewards.inflation import inflation_summary

if TYPE_CHECKING:
    from ..scorer import ItemRows, RewardItem, RewardScorer
    from .metrics import ServiceMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` samples already; the caller should retry after ``retry_after`` seconds."""

    def __init__(self, queued: int, asked: int, limit: int, retry_after: int = 1) -> None:
        super().__init__(f"reward queue is full ({queued} samples queued, {asked} more asked, limit {limit}); "
                         f"retry after {retry_after} s")
        self.retry_after = retry_after


class BatcherClosed(RuntimeError):
    """The service is draining for shutdown and takes no new work."""


@dataclass(frozen=True)
class SearchQuery:
    """One ``/retrieve`` query: its text and, for composed retrieval, its reference image's corpus id."""

    text: str
    reference_id: str | None = None


@dataclass
class _Request:
    items: Sequence[Any]
    """RewardItems to score, or SearchQuery objects to search."""
    rows: ItemRows | None
    """What :meth:`RewardScorer.validate` returned for the items to score (None: the scorer validates them)."""
    future: asyncio.Future
    enqueued: float
    kind: tuple[str, ...] = ("score",)
    """What the items are; only requests of one kind share a batch (``("search", backend, with_refs)``)."""
    topk: int = 0


def search_batch(scorer: RewardScorer, queries: Sequence[SearchQuery], topk: int,
                 backend: str) -> list[tuple[list[float], list[str]]]:
    """Top-``topk`` (scores, ids) of each query: one encoder call and one search for the whole batch."""
    emb, _ = scorer.encode([q.text for q in queries])
    if scorer.retriever.takes_reference:
        refs = [q.reference_id for q in queries]
        ref = scorer.index.vectors(refs) if all(r is not None for r in refs) else None  # type: ignore[arg-type]
        emb = scorer.retriever.fuse_queries(emb, ref)
    scores, ids = scorer.index.search(emb, topk, backend=backend)
    return list(zip(scores.tolist(), ids))


def _joined_rows(batch: Sequence[_Request]) -> ItemRows | None:
    """The rows of a batch's requests, concatenated as their items are (None unless every request has them)."""
    if any(r.rows is None for r in batch):
        return None
    return ([t for r in batch for t in r.rows[0]],  # type: ignore[index]
            [e for r in batch for e in r.rows[1]])  # type: ignore[index]


class MicroBatcher:
    """Coalesce concurrent scoring requests into device batches run on one worker thread.

    Args:
        scorer: the thread-safe scorer; only the worker thread calls it.
        max_batch_size: most samples per batch (a single larger request still runs, alone).
        max_wait_ms: longest wait for a batch to fill (see the module docstring: only while more is expected).
        max_queue: most samples queued at once.
        metrics: where batch sizes, waits, timings and reward statistics are recorded.
        retry_after: the Retry-After (seconds) carried by :class:`QueueFull`.
    """

    def __init__(self, scorer: RewardScorer, max_batch_size: int = 256, max_wait_ms: float = 5.0,
                 max_queue: int = 8192, metrics: ServiceMetrics | None = None, retry_after: int = 1) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.scorer = scorer
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.metrics = metrics
        self.retry_after = retry_after
        self._queue: deque[_Request] = deque()
        self._queued_items = 0
        self._expected_items = 1
        """Samples expected at the next dispatch: the last batch's (its callers return) plus those queued then."""
        self._last_batch_end = 0.0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grape-device")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._wakeup: asyncio.Event | None = None
        self._fill_target = 0
        self._filled: asyncio.Future | None = None
        self._closing = False
        self._running: list[_Request] = []
        """The requests of the batch on the device now (failed with the queue if the drain times out)."""
        self._device_job: concurrent.futures.Future | None = None
        self.batches = 0
        if metrics is not None:
            metrics.queue_items.set_function(lambda: self._queued_items)

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the dispatcher on the running event loop."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._task = self._loop.create_task(self._dispatch_forever(), name="grape-batcher")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def device_busy(self) -> bool:
        """Whether the device thread is still running a job (one abandoned by a timed-out drain, say)."""
        return self._device_job is not None and not self._device_job.done()

    async def close(self, timeout: float | None = None) -> None:
        """Stop taking work and answer everything already queued; after ``timeout`` seconds, fail what is left
        (queued, and the batch on the device) with :class:`BatcherClosed` and leave the device job behind.
        Calling it again (the app's shutdown after a SIGTERM drain) returns once the first call is done."""
        self._closing = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
            except asyncio.TimeoutError:
                left = self._queued_items + sum(len(r.items) for r in self._running)
                logger.warning("drain timed out after %s s with %d samples not scored; answering them 503", timeout,
                               left)
                self._task.cancel()
                self._fail_all(BatcherClosed("the service stopped (drain_timeout_s) before this request was scored"))
        if self.device_busy:
            logger.warning("abandoning the device job still running after the drain (its requests were answered 503)")
        self._executor.shutdown(wait=not self.device_busy, cancel_futures=True)

    # -- submitting -----------------------------------------------------------------------------------
    async def submit(self, items: Sequence[RewardItem], rows: ItemRows | None = None) -> list[dict[str, float]]:
        """Score ``items`` in the next batch with room; one result dict per item, in order.

        Raises :class:`QueueFull` when the queue cannot take them, :class:`BatcherClosed` while draining.
        Validate first and pass the rows (``rows = scorer.validate(items)``): the ids are then looked up once, and
        a bad request is refused before it joins a batch (the batch fallback isolates it too, at a cost).
        """
        return await self._enqueue(items, ("score",), rows=rows)

    async def submit_retrieve(self, queries: Sequence[SearchQuery], topk: int,
                              backend: str = "auto") -> list[tuple[list[float], list[str]]]:
        """Top-``topk`` (scores, ids) of each query, searched in a batch with other search requests; the same
        queue, admission (:class:`QueueFull`) and drain (:class:`BatcherClosed`) as :meth:`submit`."""
        with_refs = bool(queries) and queries[0].reference_id is not None
        results = await self._enqueue(queries, ("search", backend, str(with_refs)), topk)
        return [(scores[:topk], ids[:topk]) for scores, ids in results]

    async def _enqueue(self, items: Sequence[Any], kind: tuple[str, ...], topk: int = 0,
                       rows: ItemRows | None = None) -> list[Any]:
        if self._closing or self._task is None:
            raise BatcherClosed("the reward service is shutting down" if self._closing else
                                "the batcher is not started")
        if not items:
            return []
        n = len(items)
        if self._queued_items and self._queued_items + n > self.max_queue:
            raise QueueFull(self._queued_items, n, self.max_queue, self.retry_after)
        assert self._loop is not None and self._wakeup is not None
        future = self._loop.create_future()
        self._queue.append(_Request(items, rows, future, time.perf_counter(), kind, topk))
        self._queued_items += n
        self._wakeup.set()
        if self._filled is not None and self._queued_items >= self._fill_target and not self._filled.done():
            self._filled.set_result(None)
        return await future

    async def run_on_device(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the device thread, in turn with the batches (start-up work: warm-up, threads)."""
        if self._closing:
            raise BatcherClosed("the reward service is shutting down")
        return await self._on_device(fn, *args)

    async def _on_device(self, fn: Callable[..., T], *args: Any) -> T:
        self._device_job = self._executor.submit(fn, *args)
        return await asyncio.wrap_future(self._device_job)

    # -- the dispatcher -------------------------------------------------------------------------------
    async def _dispatch_forever(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._gather()
            batch = self._take()
            await self._run(batch)

    async def _gather(self) -> None:
        """Let already-arrived requests join; linger only while the callers of the last batch are returning."""
        await asyncio.sleep(0)
        target = min(self.max_batch_size, self._expected_items)
        if self._queued_items >= target or self.max_wait_s <= 0 or self._closing:
            return
        remaining = self._last_batch_end + self.max_wait_s - time.perf_counter()
        if remaining <= 0:
            return  # the worker has been idle longer than max_wait: nobody is known to be on the way
        assert self._loop is not None
        self._fill_target = target
        self._filled = self._loop.create_future()
        handle = self._loop.call_later(remaining, _resolve, self._filled)
        try:
            await self._filled
        finally:
            handle.cancel()
            self._filled = None

    def _take(self) -> list[_Request]:
        batch = [self._queue.popleft()]
        size = len(batch[0].items)
        kind = batch[0].kind
        while self._queue and self._queue[0].kind == kind and size + len(self._queue[0].items) <= self.max_batch_size:
            request = self._queue.popleft()
            batch.append(request)
            size += len(request.items)
        self._queued_items -= size
        return batch

    def _search(self, batch: Sequence[_Request], items: Sequence[SearchQuery]) -> list[Any]:
        """Device thread: one search for the batch, at the largest topk asked (each request keeps its own)."""
        return search_batch(self.scorer, items, max(r.topk for r in batch), batch[0].kind[1])

    async def _run(self, batch: list[_Request]) -> None:
        items = [item for r in batch for item in r.items]
        self.batches += 1
        self._running = batch
        if batch[0].kind[0] == "search":
            await self._run_search(batch, items)
            return
        start = time.perf_counter()
        waits = [start - r.enqueued for r in batch]
        try:
            scored = await self._on_device(self.scorer.score_batch, items, _joined_rows(batch))
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0].future, exc=exc)
                self._finished(len(items))
                return
            logger.warning("a batch of %d requests failed (%s: %s); scoring each request alone", len(batch),
                           type(exc).__name__, exc)
            if self.metrics is not None:
                self.metrics.batch_failures.inc()
            for request in batch:
                try:
                    alone = await self._on_device(self.scorer.score_batch, request.items, request.rows)
                except Exception as exc_alone:
                    _settle(request.future, exc=exc_alone)
                else:
                    _settle(request.future, result=alone.samples)
            self._finished(len(items))
            return
        samples = scored.samples
        pos = 0
        for request in batch:
            n = len(request.items)
            _settle(request.future, result=samples[pos:pos + n])
            pos += n
        self._finished(len(items))
        if self.metrics is not None:
            timings = dict(scored.timings)
            timings["batch_s"] = time.perf_counter() - start
            try:
                self.metrics.observe_batch(len(batch), samples, waits, timings, inflation_summary(samples))
            except Exception:  # metrics must never fail a request
                logger.exception("recording batch metrics failed")

    async def _run_search(self, batch: list[_Request], items: list[Any]) -> None:
        """A batch of search requests; if it fails, each request is searched alone (faults stay isolated)."""
        try:
            results = await self._on_device(self._search, batch, items)
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0].future, exc=exc)
            for request in batch if len(batch) > 1 else []:
                try:
                    alone = await self._on_device(self._search, [request], request.items)
                except Exception as exc_alone:
                    _settle(request.future, exc=exc_alone)
                else:
                    _settle(request.future, result=alone)
        else:
            pos = 0
            for request in batch:
                _settle(request.future, result=results[pos:pos + len(request.items)])
                pos += len(request.items)
        self._finished(len(items))

    def _finished(self, num_items: int) -> None:
        self._running = []
        self._last_batch_end = time.perf_counter()
        self._expected_items = num_items + self._queued_items

    def _fail_all(self, exc: BaseException) -> None:
        for request in self._running:
            _settle(request.future, exc=exc)
        self._running = []
        while self._queue:
            _settle(self._queue.popleft().future, exc=exc)
        self._queued_items = 0


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _settle(future: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Resolve a request's future unless its caller already went away."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)
