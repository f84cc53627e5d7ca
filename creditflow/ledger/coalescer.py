"""Group commit for the metering hot path.

Concurrent ``track`` calls in one process are coalesced into groups (``metering.track_pipelined``:
``cf_track`` calls sent together in one transaction): one round trip, one transaction and one WAL
flush for everything that arrived while the previous group was being written, instead of one
each. Nothing waits for a timer: while fewer than ``max_in_flight`` writes are in progress an
event is written at once, alone, through ``cf_track``; groups form only when the process has more
concurrent calls than that, which is exactly when per-transaction costs are the bottleneck. Every
event is still decided on its own, in arrival order within its account, and answered only after
its group has committed; a test proves grouped and one-by-one decisions identical. If a group
fails as a whole, nothing of it was committed and its events are written again one by one, in
order, so a failure stays with the event that caused it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Sequence

from psycopg_pool import AsyncConnectionPool

from creditflow.ledger.models import TrackResult

OneFn = Callable[[AsyncConnectionPool, object], Awaitable[TrackResult]]
BatchFn = Callable[[AsyncConnectionPool, Sequence[object]], Awaitable[list[TrackResult]]]


class TrackCoalescer:
    """At most ``max_in_flight`` writes at a time per pool; calls beyond that queue up and are
    written together by the next free writer."""

    def __init__(self, pool: AsyncConnectionPool, one: OneFn, batch: BatchFn, *,
                 max_batch: int = 200, max_in_flight: int = 8) -> None:
        self._pool = pool
        self._one = one
        self._batch = batch
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[object, asyncio.Future[TrackResult]]] = []
        self._in_flight = 0
        self._busy: dict[object, int] = {}  # accounts with a direct write in progress
        self._tasks: set[asyncio.Task[None]] = set()

    async def track(self, event: object) -> TrackResult:
        account = getattr(event, "account_id", None)
        if self._in_flight < self._max_in_flight and not self._pending and account not in self._busy:
            # Not saturated, and no write of this account in progress: write it now, in the
            # caller's task, exactly like ``track_alone``. (A second event of a busy account would
            # only wait for its row lock: it waits in the queue instead and shares a commit.)
            self._in_flight += 1
            self._busy[account] = self._busy.get(account, 0) + 1
            try:
                return await self._one(self._pool, event)
            finally:
                self._in_flight -= 1
                if self._busy[account] == 1:
                    del self._busy[account]
                else:
                    self._busy[account] -= 1
                self._start_drain()
        future: asyncio.Future[TrackResult] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        self._start_drain()
        return await future

    def _start_drain(self) -> None:
        """Give the queue a writer if a slot is free (saturated: the queue is written in groups)."""
        if self._pending and self._in_flight < self._max_in_flight:
            self._in_flight += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        batch: list[tuple[object, asyncio.Future[TrackResult]]] = []
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: len(batch)]
                await self._write(batch)
        finally:
            self._in_flight -= 1
            for _, future in batch:  # cancelled mid-write (shutdown): never leave a caller hanging
                if not future.done():
                    future.cancel()

    async def _write(self, batch: list[tuple[object, asyncio.Future[TrackResult]]]) -> None:
        if len(batch) == 1:
            await self._write_alone(*batch[0])
            return
        try:
            results = await self._batch(self._pool, [event for event, _ in batch])
        except Exception:  # noqa: BLE001 - nothing was committed: write them one by one, in order
            for event, future in batch:
                await self._write_alone(event, future)
            return
        for (event, future), result in zip(batch, results, strict=True):
            if result.allowed:
                if not future.done():
                    future.set_result(result)
            else:
                # Decided again alone: a denial in a group may hide a replay (see track_pipelined).
                await self._write_alone(event, future)

    async def _write_alone(self, event: object, future: asyncio.Future[TrackResult]) -> None:
        try:
            result = await self._one(self._pool, event)
        except Exception as exc:  # noqa: BLE001 - handed to the caller that sent this event
            if not future.done():
                future.set_exception(exc)
            return
        if not future.done():
            future.set_result(result)


_coalescers: weakref.WeakKeyDictionary[AsyncConnectionPool, TrackCoalescer] = weakref.WeakKeyDictionary()


def coalescer_for(pool: AsyncConnectionPool, one: OneFn, batch: BatchFn) -> TrackCoalescer:
    coalescer = _coalescers.get(pool)
    if coalescer is None:
        coalescer = _coalescers[pool] = TrackCoalescer(pool, one, batch)
    return coalescer
