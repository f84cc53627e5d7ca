"""One Stripe customer per account, created exactly once.

Stripe's idempotency key (``creditflow:customer:{account_id}``) covers retries within 24 hours on Stripe,
but localstripe ignores it and a key says nothing about a call made days later, so our own record is the
guard: in one transaction we take a per-account lock, look for the stored customer, create one only if
there is none, and store it before committing. Concurrent callers queue on the lock and the later ones
find the row. A failed Stripe call rolls the transaction back: nothing is stored.

The lock is a transaction-scoped advisory lock, not the account's ``balances`` row: that row is the
metering hot path's lock, and holding it across a Stripe call (with retries, seconds) would stall the
account's usage events. Only ``ensure_customer`` takes this lock.

Known gap: if the process dies after Stripe created the customer and before the commit, the next call
creates a second one on localstripe (on Stripe the idempotency key returns the first within 24 hours).
The orphan carries our metadata (``creditflow_account_id``) and is never used by creditflow.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from creditflow.errors import CreditflowError
from creditflow.payments.gateway import StripeGateway

_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended('creditflow:stripe_customer:' || %s, 0))"


async def stored_customer(pool: AsyncConnectionPool, account_id: str) -> str | None:
    """The account's Stripe customer id, None if it has none yet; ``unknown_account`` if no such account."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT a.id, c.customer_id FROM accounts a LEFT JOIN stripe_customers c ON c.account_id = a.id"
            " WHERE a.id = %s", (account_id,))).fetchone()
    if row is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    return row["customer_id"]


async def ensure_customer(pool: AsyncConnectionPool, gateway: StripeGateway, account_id: str) -> str:
    """The account's Stripe customer id, creating the customer on the first call (exactly once)."""
    existing = await stored_customer(pool, account_id)  # the common case: no lock, no transaction
    if existing is not None:
        return existing
    async with pool.connection() as conn, conn.transaction():
        await conn.execute(_LOCK_SQL, (account_id,))
        row = await (await conn.execute(
            "SELECT a.name, a.billing_email, c.customer_id FROM accounts a"
            " LEFT JOIN stripe_customers c ON c.account_id = a.id WHERE a.id = %s", (account_id,))).fetchone()
        if row is None:
            raise CreditflowError("unknown_account", f"no account {account_id}")
        if row["customer_id"] is not None:
            return str(row["customer_id"])
        customer_id = await gateway.create_customer(account_id, name=row["name"], email=row["billing_email"],
                                                    idempotency_key=f"creditflow:customer:{account_id}")
        await conn.execute("INSERT INTO stripe_customers (account_id, customer_id) VALUES (%s, %s)",
                           (account_id, customer_id))
    return customer_id
