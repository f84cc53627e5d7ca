"""Number rental in the wallet (migration 0030_2): one month of one recurring charge, charged once.

A wallet-only account pays each recurring charge from the wallet monthly, as a usage item with channel ``number``;
an account with an active plan has it on its invoice instead (the month is recorded ``invoiced``, never both).
``RentalWorkflow`` calls this once per month per charge; the (charge, month) row makes a retry a no-op.
"""

from __future__ import annotations

from datetime import datetime

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.errors import CreditflowError
from creditflow.ledger.subscriptions import RecurringCharge


class RentalMonth(BaseModel):
    """What one month of a rental did: ``paid`` (``txn_id``), ``unpaid``, ``invoiced`` or ``removed``."""

    status: str
    charge_id: str
    period_key: str
    amount_micros: int = 0
    txn_id: str | None = None
    created: bool = False
    description: str = ""
    quantity: int = 0


async def charge(pool: AsyncConnectionPool, account_id: str, charge_id: str, period_start: datetime) -> RentalMonth:
    """Charge the month starting at ``period_start`` of the rental ``charge_id`` (once); ``removed`` if the charge
    was removed (or never belonged to this account)."""
    key = period_start.date().isoformat()
    async with pool.connection() as conn, conn.transaction():
        row = await (await conn.execute("SELECT * FROM recurring_charges WHERE id = %s AND account_id = %s",
                                        (charge_id, account_id))).fetchone()
        if row is None or not row["active"]:
            return RentalMonth(status="removed", charge_id=charge_id, period_key=key)
        rental = RecurringCharge(**row)
        planned = await (await conn.execute(
            "SELECT 1 FROM subscriptions WHERE account_id = %s AND status = 'active'", (account_id,))).fetchone()
        result = await (await conn.execute(
            "SELECT * FROM cf_rental_charge(%s, %s, %s, %s, %s, %s, %s)",
            (account_id, charge_id, key, rental.quantity, rental.unit_price_micros, rental.description,
             planned is not None))).fetchone()
    if result is None:
        raise CreditflowError("unknown_account", f"no account {account_id}")
    txn = result["txn_id"]
    return RentalMonth(status=result["status"], charge_id=charge_id, period_key=key,
                       amount_micros=result["amount_micros"], txn_id=None if txn is None else f"txn_{txn.hex}",
                       created=result["created"], description=rental.description, quantity=rental.quantity)
