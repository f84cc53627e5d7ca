"""Group commit for the metering hot path.

Concurrent ``track`` calls in one process share transactions. Every call joins a queue; at most
``writers`` writer tasks drain it, and a writer takes its share of what is waiting (the queue split
evenly among the writers about to take), so a group holds whatever arrived while the previous ones
were being written: one round trip, one statement (``cf_track_group``) and one commit for all of
it. Nothing waits for a timer: an idle process writes a lone call at once, through ``cf_track``;
groups grow only with concurrency, which is exactly when per-transaction costs are the bottleneck.

Why few writers: measured on the benchmark (8 callers, 2 cores shared with PostgreSQL), two
writers with groups of about four beat eight single-event transactions in flight, and three
writers with smaller groups; a group costs one commit and one call's fixed overhead, and each
event in it only its own writes.

Every event is still decided on its own (``cf_track`` for each; within a group, in arrival order
within its account) and answered only after its group has committed; a test proves grouped and
one-by-one decisions identical. Two writers may hold events of one account at once: the account's
row lock orders them, as it orders any concurrent calls. If a group fails as a whole, nothing of it
was committed and its events are written again one by one, in order, so a failure stays with the
event that caused it.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from creditflow.ledger.models import TrackResult

# Both write on the connection the writer holds, in autocommit (each call is its own transaction).
OneFn = Callable[[AsyncConnection[Any], object], Awaitable[TrackResult]]
GroupFn = Callable[[AsyncConnection[Any], Sequence[object]], Awaitable[list[TrackResult]]]

DEFAULT_WRITERS = 2
DEFAULT_MAX_GROUP = 200
# A busy writer hands its connection back to the pool after this many writes, so the pool still applies
# its max_lifetime and health checks to it under constant load (about once a second on the benchmark).
WRITES_PER_CHECKOUT = 1000

_Waiting = tuple[object, "asyncio.Future[TrackResult]"]


class TrackCoalescer:
    """At most ``writers`` writes at a time per pool, each a group of up to ``max_group`` events."""

    def __init__(self, pool: AsyncConnectionPool, one: OneFn, group: GroupFn, *,
                 writers: int = DEFAULT_WRITERS, max_group: int = DEFAULT_MAX_GROUP) -> None:
        if writers < 1 or max_group < 1:
            raise ValueError("writers and max_group must be at least 1")
        self._pool = pool
        self._one = one
        self._group = group
        self._max_writers = writers
        self._max_group = max_group
        self._pending: list[_Waiting] = []
        self._writers = 0  # writer tasks alive
        self._starting = 0  # of which not yet holding their first group
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def writers(self) -> int:
        return self._max_writers

    async def track(self, event: object) -> TrackResult:
        future: asyncio.Future[TrackResult] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        if self._writers < self._max_writers:
            # The writer runs after the callbacks already scheduled: calls made in the same turn of the
            # event loop (callers woken by one group's results) join this group instead of each starting one.
            self._writers += 1
            self._starting += 1
            task = asyncio.create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _drain(self) -> None:
        group: list[_Waiting] = []
        starting = True
        lease = _Lease(self._pool)  # this writer's connection, held while it has groups to write
        writes = 0
        try:
            while self._pending:
                # Split what is waiting evenly among the writers about to take from it (this one included).
                takers = self._starting + (0 if starting else 1)
                if starting:
                    self._starting -= 1
                    starting = False
                share = min(self._max_group, -(-len(self._pending) // takers))
                group = self._pending[:share]
                del self._pending[:share]
                await self._write(lease, group)
                writes += 1
                if writes % WRITES_PER_CHECKOUT == 0:
                    await lease.release()
                # One turn of the event loop for this group's callers, woken by its results, to queue their next
                # calls: this writer then takes them itself. Without it, when two writers' results arrive in the
                # same turn, both writers' callers queue together, are split again and sent together: the writers
                # run in lockstep, the server idle while the process works and the reverse (6.4k against 5.5k
                # events/s on the benchmark).
                await asyncio.sleep(0)
        finally:
            if starting:
                self._starting -= 1
            self._writers -= 1
            for _, future in group:  # cancelled mid-write (shutdown): never leave a caller hanging
                if not future.done():
                    future.cancel()
            await lease.release()

    async def _write(self, lease: _Lease, group: list[_Waiting]) -> None:
        if len(group) == 1:
            await self._write_alone(lease, *group[0])
            return
        try:
            conn = await lease.get()
        except Exception as exc:  # noqa: BLE001 - no connection (pool closed or exhausted): the callers get why
            _fail(group, exc)
            return
        try:
            results = await self._group(conn, [event for event, _ in group])
        except Exception:  # noqa: BLE001 - nothing was committed: write them one by one, in order
            for event, future in group:
                await self._write_alone(lease, event, future)
            return
        for (event, future), result in zip(group, results, strict=True):
            if result.allowed:
                if not future.done():
                    future.set_result(result)
            else:
                # Decided again alone: a denial in a group may hide a replay (see metering.track_grouped).
                await self._write_alone(lease, event, future)

    async def _write_alone(self, lease: _Lease, event: object, future: asyncio.Future[TrackResult]) -> None:
        try:
            result = await self._one(await lease.get(), event)
        except Exception as exc:  # noqa: BLE001 - no connection, or this event failed: handed to its caller
            _fail([(event, future)], exc)
            return
        if not future.done():
            future.set_result(result)


class _Lease:
    """A writer's pool connection: taken on first use, kept across groups, replaced when a failure broke it
    (handing a broken connection back makes the pool discard it)."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool
        self._conn: AsyncConnection[Any] | None = None

    async def get(self) -> AsyncConnection[Any]:
        if self._conn is not None and (self._conn.broken or self._conn.closed):
            await self.release()
        if self._conn is None:
            self._conn = await self._pool.getconn()
        return self._conn

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._pool.putconn(conn)


def _fail(waiting: list[_Waiting], exc: BaseException) -> None:
    for _, future in waiting:
        if not future.done():
            future.set_exception(exc)


_coalescers: weakref.WeakKeyDictionary[AsyncConnectionPool, TrackCoalescer] = weakref.WeakKeyDictionary()


def coalescer_for(pool: AsyncConnectionPool, one: OneFn, group: GroupFn, *,
                  writers: int | None = None) -> TrackCoalescer:
    """The pool's coalescer, made on first use; ``writers`` (when given) replaces it with one that
    has that many writers (calls already queued on the old one are still answered by it)."""
    coalescer = _coalescers.get(pool)
    if coalescer is None or (writers is not None and writers != coalescer.writers):
        coalescer = _coalescers[pool] = TrackCoalescer(pool, one, group, writers=writers or DEFAULT_WRITERS)
    return coalescer
