"""Account activities: what the account workflow reads from the ledger.

The workflow is (re)started by events that may not carry the account's name or status (e.g. after an
operator terminated it), so it reads them from the ledger, the source of truth, once per workflow chain.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel
from temporalio import activity


class LoadAccountInput(BaseModel):
    account_id: str


class AccountSnapshot(BaseModel):
    """What the workflow shows in its details and search attributes."""

    account_id: str
    name: str
    status: str


class AccountActivities:
    """Activities bound to the worker's database pool."""

    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    @activity.defn(name="load_account")
    async def load_account(self, input: LoadAccountInput) -> AccountSnapshot | None:
        """The account's name and status, or None when the ledger has no such account."""
        async with self._pool.connection() as conn:
            row = await (await conn.execute(
                "SELECT id, name, status FROM accounts WHERE id = %s", (input.account_id,))).fetchone()
        if row is None:
            return None
        return AccountSnapshot(account_id=row["id"], name=row["name"], status=row["status"])
