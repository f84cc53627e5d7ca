"""Reconciliation helpers for tests: one run of the engine now, and one account's differences."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from psycopg_pool import AsyncConnectionPool

from creditflow.domain.reconciliation import ReconcileResult
from creditflow.payments.gateway import StripeGateway
from creditflow.payments.reconcile import Reconciler, open_run, record_result


async def reconcile_now(pool: AsyncConnectionPool, gateway: StripeGateway, *, grace: timedelta = timedelta(0),
                        since: datetime | None = None) -> ReconcileResult:
    now = datetime.now(UTC) + timedelta(seconds=2)  # localstripe stamps in whole seconds
    window = await open_run(pool, f"test:{uuid.uuid4().hex}", trigger="manual",
                            since=since or now - timedelta(hours=1), now=now)
    result = await Reconciler(pool, gateway, window, now=now, server_filter=False, grace=grace).run()
    await record_result(pool, result)
    return result


def kinds(result: ReconcileResult, account: str) -> list[tuple[str, str]]:
    """This test's differences (the emulator is shared by the session: other tests' payments are listed too)."""
    return sorted((d.action, d.kind) for d in result.differences if d.account_id == account)
