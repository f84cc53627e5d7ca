"""A dispute (or a refund made on Stripe) takes back what its money bought even while holds reserve the balance.

Holding the whole balance when a chargeback arrives must not let the customer keep the disputed credits: the holds
give way (their reservations are cut), as they do for plan credits at a renewal, and the dispute takes its credits.
"""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool

from creditflow.ledger import metering
from creditflow.payments import clawbacks
from tests.support.ledger import M, new_account, paid_purchase


async def _balances(pool: AsyncConnectionPool, account: str) -> tuple[int, int]:
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT balance_micros, held_micros FROM balances WHERE account_id = %s",
                                        (account,))).fetchone()
    assert row is not None
    return int(row["balance_micros"]), int(row["held_micros"])


async def test_dispute_while_the_balance_is_held_takes_the_credits_back(pool: AsyncConnectionPool) -> None:
    account = await new_account(pool)
    purchase = await paid_purchase(pool, account, cents=1000, credits=1000)
    hold = await metering.create_hold(
        pool, metering.UsageEvent.build(account, "chat_message", 1000, "hold-everything", None, None), 3600)
    assert hold.allowed and await _balances(pool, account) == (1000 * M, 1000 * M)

    payload = {"payment_intent_id": purchase["payment_intent_id"], "dispute_id": "dp_held", "amount": 1000,
               "reason": "fraudulent", "status": "needs_response"}
    result = await clawbacks.apply(pool, account, clawbacks.DISPUTED, payload)
    assert [(c.kind, c.taken_micros) for c in result.applied] == [("dispute", 1000 * M)]
    assert await _balances(pool, account) == (0, 0)  # the hold's reservation was cut

    # Releasing the hold brings nothing back; settling it charges nothing it cannot cover.
    assert hold.hold_id is not None
    released = await metering.release_hold(pool, account, hold.hold_id)
    assert released.allowed
    assert await _balances(pool, account) == (0, 0)
    again = await clawbacks.apply(pool, account, clawbacks.DISPUTED, payload)  # a redelivery: nothing more
    assert [c.taken_micros for c in again.applied] == [1000 * M]
    assert await _balances(pool, account) == (0, 0)


async def test_a_cut_hold_settles_what_it_can_and_verify_stays_clean(pool: AsyncConnectionPool) -> None:
    from creditflow.ledger.verify import verify

    account = await new_account(pool)
    purchase = await paid_purchase(pool, account, cents=1000, credits=1000)
    hold = await metering.create_hold(
        pool, metering.UsageEvent.build(account, "chat_message", 800, "call", None, None), 3600)
    assert hold.allowed and hold.hold_id is not None
    await clawbacks.apply(pool, account, clawbacks.DISPUTED, {
        "payment_intent_id": purchase["payment_intent_id"], "dispute_id": "dp_call", "amount": 1000})
    assert await _balances(pool, account) == (0, 0)
    settled = await metering.settle_hold(pool, account, hold.hold_id, 500, None)
    assert settled.allowed  # settlements are never refused: nothing was left to charge (the floor is 0)
    assert await _balances(pool, account) == (0, 0)
    report = await verify(pool, account)
    assert report.ok, report.violations


async def test_a_refund_on_stripe_of_used_credits_is_recorded_once(pool: AsyncConnectionPool) -> None:
    """Nothing is left to take back (the credits were used): the Stripe refund still gets its one ledger effect, a
    row of 0 with what it wanted, so a redelivery or the reconciliation does not apply it again (found by the soak:
    the Stripe refund had no ledger effect at all)."""
    from creditflow.ledger.verify import verify

    account = await new_account(pool)
    purchase = await paid_purchase(pool, account, cents=1000, credits=1000)
    used = await metering.track(pool, metering.UsageEvent.build(account, "chat_message", 1000, "use-all", None, None))
    assert used.allowed
    payload = {"payment_intent_id": purchase["payment_intent_id"],
               "refunds": [{"id": "re_used", "amount": 500, "creditflow_refund_id": None}]}
    for _ in range(2):
        result = await clawbacks.apply(pool, account, clawbacks.REFUNDED, payload)
        assert [(c.key, c.taken_micros) for c in result.applied] == [("sys:stripe_refund:re_used", 0)]
    async with pool.connection() as conn:
        rows = await (await conn.execute(
            "SELECT amount_micros, metadata->>'wanted_micros' AS wanted FROM journal WHERE account_id = %s"
            " AND idempotency_key = 'sys:stripe_refund:re_used'", (account,))).fetchall()
    assert [(r["amount_micros"], r["wanted"]) for r in rows] == [(0, str(500 * M))]
    assert (await verify(pool, account)).ok
