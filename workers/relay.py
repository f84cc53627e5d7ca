"""The outbox relay: delivers outbox rows to account workflows by signal-with-start.

Runs inside the worker process. It wakes on ``NOTIFY creditflow_outbox`` (sent by the insert trigger)
and polls every ``outbox_poll_interval_seconds`` as the safety net (a notification is lost when no
relay is listening). A row is marked dispatched only after Temporal accepted the signal, in the
transaction that holds its lock, so a crash or an unreachable Temporal leaves it pending: delivery is at
least once and the workflow's dedup key makes it effective once. A row that fails is retried with
exponential backoff so a poisoned row does not spin; while it fails, its account's later rows wait (each
account's events arrive in order, ``outbox.claim_batch``), other accounts go on. The relay also sweeps expired
holds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.client import signal_with_start_account
from creditflow.config import Settings
from creditflow.ledger import outbox
from creditflow.ledger.metering import expire_overdue_holds
from workflows.contract import OutboxEvent

log = logging.getLogger(__name__)

LISTEN_RECONNECT_SECONDS = 5.0
# Bounds one delivery when Temporal hangs instead of refusing; the row is retried later.
DELIVERY_RPC_TIMEOUT = timedelta(seconds=10)

Failure = tuple[outbox.OutboxRow, str]  # a row and the error that kept it pending


class OutboxRelay:
    def __init__(self, pool: AsyncConnectionPool, client: Client, settings: Settings, *,
                 hold_sweep_interval: float | None = None) -> None:
        self._pool = pool
        self._client = client
        self._task_queue = settings.temporal_task_queue
        self._search_attributes = settings.temporal_search_attributes
        self._batch_size = settings.outbox_batch_size
        self._poll_interval = settings.outbox_poll_interval_seconds
        self._hold_sweep_interval = hold_sweep_interval or settings.hold_sweep_interval_seconds
        # Row id -> monotonic time before which it is not retried (rows that failed in this process).
        self._not_before: dict[int, float] = {}

    async def run_once(self) -> int:
        """Deliver what is pending now (except rows backing off); returns the number delivered."""
        delivered = 0
        while True:
            claimed, ok = await self._drain_batch()
            delivered += ok
            # Stop on an empty or short batch, or when nothing went through (Temporal is down).
            if claimed < self._batch_size or ok == 0:
                return delivered

    async def run(self) -> None:
        """Drain on every notification and poll tick, sweep holds, until cancelled."""
        last_sweep = float("-inf")
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self._pool.conninfo,
                                                                 autocommit=True) as listener:
                    await listener.execute(f"LISTEN {outbox.CHANNEL}")
                    while True:
                        await self._safely(self.run_once, "outbox drain")
                        if time.monotonic() - last_sweep >= self._hold_sweep_interval:
                            await self._safely(self.sweep_holds, "hold sweep")
                            last_sweep = time.monotonic()
                        await self._wait_for_work(listener)
            except psycopg.OperationalError as err:
                log.warning("outbox relay lost its database connection (%s); retrying", err)
                await asyncio.sleep(LISTEN_RECONNECT_SECONDS)

    async def sweep_holds(self) -> None:
        released = await expire_overdue_holds(self._pool)
        if released:
            log.info("expired overdue holds: %s credits released", released)

    async def _wait_for_work(self, listener: psycopg.AsyncConnection[Any]) -> None:
        """Until a notification arrives or the poll interval passes, whichever comes first.

        The generators run to their end (no ``break``): an abandoned one keeps the connection's lock."""
        async for _ in listener.notifies(timeout=self._poll_interval, stop_after=1):
            pass
        # One drain serves every row inserted so far: drop the notifications already queued.
        async for _ in listener.notifies(timeout=0):
            pass

    async def _safely(self, step: Callable[[], Awaitable[object]], what: str) -> None:
        """A failing step is logged and retried on the next tick; cancellation goes through."""
        try:
            await step()
        except psycopg.OperationalError:
            raise
        except Exception:
            log.exception("%s failed", what)

    async def _drain_batch(self) -> tuple[int, int]:
        """Claim one batch, deliver it, record the outcome; returns (claimed, delivered)."""
        now = time.monotonic()
        self._not_before = {k: t for k, t in self._not_before.items() if t > now}
        async with self._pool.connection() as conn, conn.transaction():
            rows = await outbox.claim_batch(conn, self._batch_size, exclude_ids=self._not_before.keys())
            if not rows:
                return 0, 0
            by_account: dict[str, list[outbox.OutboxRow]] = defaultdict(list)
            for row in rows:
                by_account[row.account_id].append(row)
            # Accounts in parallel, each account's rows in order.
            results = await asyncio.gather(*(self._deliver(group) for group in by_account.values()))
            done = {row_id: run for ok, _ in results for row_id, run in ok.items()}
            failed = [failure for _, bad in results for failure in bad]
            await outbox.mark_dispatched(conn, done)
            for row, error in failed:
                attempts = await outbox.record_failure(conn, row.id, error)
                self._not_before[row.id] = time.monotonic() + outbox.retry_delay(attempts)
        if failed:
            log.warning("outbox: %d of %d rows not delivered (first error: %s)", len(failed), len(rows),
                        failed[0][1])
        return len(rows), len(done)

    async def _deliver(self, rows: list[outbox.OutboxRow]) -> tuple[dict[int, str | None], list[Failure]]:
        """Signal one account's rows in order; returns (delivered ids with the run that accepted each, failures)."""
        ok: dict[int, str | None] = {}
        failed: list[Failure] = []
        for row in rows:
            try:  # any failure, a malformed row included, leaves the row pending for a later attempt
                ok[row.id] = await self._signal(row)
            except Exception as err:
                failed.append((row, f"{type(err).__name__}: {err}"))
                break  # the account's later rows wait for this one: its events are applied in order
        return ok, failed

    async def _signal(self, row: outbox.OutboxRow) -> str | None:
        """Deliver one row; returns the id of the workflow run that accepted it."""
        event = OutboxEvent(dedup_key=row.dedup_key, kind=row.kind, payload=row.payload,
                            created_at=row.created_at)
        name = event.payload.get("name") if event.kind == "account.created" else None
        handle = await signal_with_start_account(self._client, self._task_queue, row.account_id, event,
                                                 name=name if isinstance(name, str) else None,
                                                 rpc_timeout=DELIVERY_RPC_TIMEOUT,
                                                 search_attributes=self._search_attributes)
        return handle.result_run_id
