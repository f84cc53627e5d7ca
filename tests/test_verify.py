"""``creditflow verify``: a clean ledger passes every check, and each kind of money defect is reported with its ids.

The defects are produced with the ledger's own functions (the states the money-conservation bugs left behind), not by
editing totals, so the checks are shown to see what the bugs did; plain corruption of a total is caught too.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from typer.testing import CliRunner

from creditflow.cli import app
from creditflow.ids import new_id
from creditflow.ledger import accounts
from creditflow.ledger.verify import CHECKS, verify
from tests.support.ledger import M, new_account, paid_purchase


async def refund_credits(pool: AsyncConnectionPool, account_id: str, purchase: dict[str, Any], *, credits: int,
                         cents: int) -> str:
    """A refund row and its reservation, as the refund saga writes them, for ``credits`` against ``cents``."""
    refund_id = new_id("ref")
    async with pool.connection() as conn, conn.transaction():
        txn = await (await conn.execute("SELECT txn_id FROM credit_lots WHERE id = %s",
                                        (purchase["lot_id"],))).fetchone()
        assert txn is not None
        await conn.execute(
            "INSERT INTO refunds (id, account_id, request_id, charge_id, payment_intent_id, purchase_txn_id, lot_id,"
            " credits, amount_cents, reason) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, 'requested_by_customer')",
            (refund_id, account_id, f"rr-{refund_id}", purchase["charge_id"], purchase["payment_intent_id"],
             txn["txn_id"], purchase["lot_id"], credits, cents))
        row = await (await conn.execute(
            "SELECT * FROM cf_refund_reserve(%s, %s, %s, %s, %s, %s, %s)",
            (account_id, purchase["lot_id"], credits * M, f"sys:refund:{refund_id}", b"h", "Refund", "{}")
        )).fetchone()
        assert row is not None
        await conn.execute("UPDATE refunds SET reserve_txn_id = %s WHERE id = %s", (row["txn_id"], refund_id))
    return refund_id


async def _invoice(pool: AsyncConnectionPool, account: str, overage_micros: int, key: str = "2026-10-01") -> str:
    invoice_id = new_id("inv")
    now = datetime(2026, 11, 1, tzinfo=UTC)
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO invoices (id, account_id, number, period_key, period_start, period_end, status,"
            " subtotal_cents, amount_due_cents, overage_micros, draft, html, pdf, issued_at, due_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, 'open', 0, 0, %s, '{}', '', '', %s, %s)",
            (invoice_id, account, f"CF-{invoice_id[-8:]}", key, now - timedelta(days=31), now, overage_micros,
             now, now))
    return invoice_id


def by_check(report: Any) -> dict[str, list[Any]]:
    found: dict[str, list[Any]] = {}
    for v in report.violations:
        found.setdefault(v.check, []).append(v)
    return found


async def test_a_clean_lifecycle_passes_every_check(pool: AsyncConnectionPool) -> None:
    account = await new_account(pool, bonus=500)
    purchase = await paid_purchase(pool, account, cents=1000, credits=1200)
    # Refunding half the money takes back half the credits (the lot's own proportion): consistent.
    await refund_credits(pool, account, purchase, credits=600, cents=500)
    report = await verify(pool)
    assert report.ok, report.violations
    assert report.accounts_checked == 1
    assert report.checks == [c.name for c in CHECKS]
    assert (await verify(pool, account)).ok


async def test_bonus_refund_at_one_cent_per_credit_is_reported(pool: AsyncConnectionPool) -> None:
    """The bonus-package refund loop: 1,200 credits for $10, 1,000 credits refunded for $10, 200 stay."""
    account = await new_account(pool)
    purchase = await paid_purchase(pool, account, cents=1000, credits=1200)
    await refund_credits(pool, account, purchase, credits=1000, cents=1000)
    [violation] = by_check(await verify(pool))["credits_leave_with_their_money"]
    assert violation.account_id == account
    assert violation.ids["lot_id"] == purchase["lot_id"]
    assert violation.ids["payment_intent_id"] == purchase["payment_intent_id"]
    assert (violation.ids["returned_cents"], violation.ids["taken_micros"], violation.ids["owed_micros"]) == (
        "1000", str(1000 * M), str(1200 * M))


async def test_refunding_more_money_than_paid_is_reported(pool: AsyncConnectionPool) -> None:
    account = await new_account(pool)
    purchase = await paid_purchase(pool, account, cents=1000, credits=1000)
    await refund_credits(pool, account, purchase, credits=600, cents=600)
    await refund_credits(pool, account, purchase, credits=400, cents=500)
    found = by_check(await verify(pool))
    [violation] = found["refunds_within_paid"]
    assert (violation.ids["amount_cents"], violation.ids["refunded_cents"]) == ("1000", "1100")


async def test_plan_credits_of_a_closed_period_are_reported(pool: AsyncConnectionPool) -> None:
    """A plan lot that outlived its closed period (what a hold across the renewal left behind)."""
    account = await new_account(pool)
    end = datetime(2026, 11, 1, tzinfo=UTC)
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT * FROM cf_post(%s, 'plan_grant', %s, 'system:plan_credits', 'Plan credits', NULL, 'plan', 0, %s,"
            " 'sys:plan:test', NULL)", (account, 3000 * M, end))).fetchone()
        assert row is not None
        await conn.execute(
            "INSERT INTO billing_periods (account_id, period_key, period_index, period_start, period_end, plan_id,"
            " fee_cents, overage_micros, closed_at) VALUES (%s, '2026-10-01', 0, %s, %s, 'pro', 0, 0, %s)",
            (account, end - timedelta(days=31), end, end))
    [violation] = by_check(await verify(pool, account))["plan_credits_die_with_their_period"]
    assert violation.ids["lot_id"] == row["lot_id"]
    assert violation.ids["remaining_micros"] == str(3000 * M)
    assert violation.ids["period_key"] == "2026-10-01"


async def test_overage_repaid_twice_is_reported(pool: AsyncConnectionPool) -> None:
    account = await new_account(pool)
    invoice_id = await _invoice(pool, account, 600 * M)
    async with pool.connection() as conn:
        for key in (f"sys:invoice:{invoice_id}", f"sys:invoice:{invoice_id}:again"):
            await conn.execute(
                "SELECT cf_post(%s, 'overage_repayment', %s, 'system:payments_clearing', 'Overage repaid', NULL,"
                " 'purchase', 20, NULL, %s, NULL)", (account, 600 * M, key))
    [violation] = by_check(await verify(pool, account))["invoice_repaid_at_most_its_overage"]
    assert violation.ids["invoice_id"] == invoice_id
    assert (violation.ids["repaid_micros"], violation.ids["entries"]) == (str(1200 * M), "2")


async def test_a_total_edited_by_hand_is_reported(pool: AsyncConnectionPool, database_url: str) -> None:
    account = await new_account(pool, bonus=100)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("UPDATE balances SET balance_micros = balance_micros + 7, held_micros = 5"
                           " WHERE account_id = %s", (account,))
    found = by_check(await verify(pool))
    assert set(found) == {"balance_equals_journal", "lots_equal_balance", "held_equals_active_holds"}
    assert found["balance_equals_journal"][0].ids == {"balance_micros": str(100 * M + 7),
                                                      "journal_micros": str(100 * M)}


async def test_unknown_account_is_refused(pool: AsyncConnectionPool) -> None:
    from creditflow.errors import CreditflowError

    with pytest.raises(CreditflowError) as exc:
        await verify(pool, "acc_" + "0" * 32)
    assert exc.value.code == "unknown_account"


async def test_cli_and_api_report_the_same_violations(pool: AsyncConnectionPool, api: httpx.AsyncClient,
                                                      database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    account = await new_account(pool)
    purchase = await paid_purchase(pool, account, cents=1000, credits=1200)
    monkeypatch.setenv("CREDITFLOW_DATABASE_URL", database_url)
    from creditflow.config import get_settings

    get_settings.cache_clear()
    from creditflow import ops_cli

    monkeypatch.setattr(ops_cli.console, "width", 400)
    runner = CliRunner()

    def cli(*args: str) -> Any:  # the command runs its own event loop: off this test's loop
        return asyncio.to_thread(runner.invoke, app, list(args))

    clean = await cli("verify")
    assert clean.exit_code == 0, clean.output
    assert "no violation" in clean.output

    await refund_credits(pool, account, purchase, credits=1000, cents=1000)
    broken = await cli("verify", "--account", account)
    assert broken.exit_code == 1
    assert "credits_leave_with_their_money" in broken.output and purchase["lot_id"] in broken.output
    as_json = await cli("verify", "--json")
    assert as_json.exit_code == 1 and '"ok": false' in as_json.output
    listed = await cli("verify", "--list-checks")
    assert listed.exit_code == 0 and all(c.name in listed.output for c in CHECKS)
    get_settings.cache_clear()

    resp = await api.get("/api/v1/verify", params={"account_id": account})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["ok"] is False
    assert [v["check"] for v in body["violations"]] == ["credits_leave_with_their_money"]
    malformed = await api.get("/api/v1/verify", params={"account_id": "nope"})
    assert malformed.status_code == 422 and malformed.json()["error"]["code"] == "invalid_id"
    assert (await api.get("/api/v1/verify", headers={"Authorization": "Bearer wrong"})).status_code == 401


async def test_a_refund_marked_succeeded_while_stripe_says_pending_is_reported(pool: AsyncConnectionPool) -> None:
    account = await new_account(pool)
    purchase = await paid_purchase(pool, account, cents=1000, credits=1000)
    refund_id = await refund_credits(pool, account, purchase, credits=100, cents=100)
    async with pool.connection() as conn:
        await conn.execute("UPDATE refunds SET status = 'succeeded', stripe_refund_id = 're_pending1',"
                           " stripe_status = 'pending' WHERE id = %s", (refund_id,))
    [violation] = by_check(await verify(pool, account))["refund_succeeded_only_when_stripe_did"]
    assert (violation.ids["refund_id"], violation.ids["stripe_status"]) == (refund_id, "pending")


async def test_an_invoice_paid_twice_is_reported(pool: AsyncConnectionPool) -> None:
    account = await new_account(pool)
    invoice_id = await _invoice(pool, account, 0)
    async with pool.connection() as conn:
        for request_id, pi in ((invoice_id, "pi_first0001"), (f"{invoice_id}:2", "pi_second002")):
            await conn.execute(
                "INSERT INTO stripe_charges (id, account_id, request_id, kind, amount_cents, credits, description,"
                " customer_id, payment_intent_id, status) VALUES (%s, %s, %s, 'invoice', 4900, 0, 'Invoice',"
                " 'cus_test', %s, 'succeeded')", (new_id("chg"), account, request_id, pi))
    [violation] = by_check(await verify(pool, account))["invoice_charged_once"]
    assert (violation.ids["invoice_id"], violation.ids["charges"]) == (invoice_id, "2")
    assert violation.ids["payment_intents"] == "pi_first0001 pi_second002"


async def test_overage_billed_twice_or_in_fractions_is_reported(pool: AsyncConnectionPool) -> None:
    """Unpaid overage billed again at the next close (7,000 drawn, 9,000 billed); a fraction of a credit billed."""
    account = (await accounts.create_account(pool, name="Over", billing_email="o@verify.test",
                                             welcome_bonus_credits=0, overage_credit_line=10_000)).id
    async with pool.connection() as conn:
        await conn.execute("SELECT cf_post(%s, 'adjustment', %s, 'system:adjustments', 'use', NULL, 'adjustment', 10,"
                           " NULL, 'sys:test:use', NULL)", (account, -7_000 * M))
    await _invoice(pool, account, 7_000 * M)
    assert (await verify(pool, account)).ok
    await _invoice(pool, account, 2_000 * M, key="2026-11-01")
    [billed] = by_check(await verify(pool, account))["overage_billed_at_most_drawn"]
    assert (billed.ids["drawn_micros"], billed.ids["billed_micros"]) == (str(7_000 * M), str(9_000 * M))
    fraction = await _invoice(pool, account, 400_000, key="2026-12-01")
    [whole] = by_check(await verify(pool, account))["overage_billed_in_whole_credits"]
    assert whole.ids["invoice_id"] == fraction


async def test_a_repayment_that_creates_credits_is_reported(pool: AsyncConnectionPool) -> None:
    """Paid overage credited again as a permanent lot while the next grant had already repaid the line."""
    account = await new_account(pool, bonus=4_400)
    async with pool.connection() as conn:
        await conn.execute("SELECT cf_post(%s, 'overage_repayment', %s, 'system:payments_clearing', 'Overage paid',"
                           " NULL, 'adjustment', 10, NULL, 'sys:invoice:inv_x', NULL)", (account, 600 * M))
    [violation] = by_check(await verify(pool, account))["overage_repayment_creates_no_credits"]
    assert violation.ids["balance_after_micros"] == str(5_000 * M)


async def test_credits_taken_beyond_the_money_returned_are_reported(pool: AsyncConnectionPool) -> None:
    """A dispute closed as an inquiry (the merchant kept the money) that kept the credits it took."""
    account = await new_account(pool)
    purchase = await paid_purchase(pool, account, cents=1000, credits=1000)
    async with pool.connection() as conn:
        await conn.execute(
            "SELECT cf_clawback_lot(%s, %s, %s, 'dispute', 'system:disputes', 'sys:dispute:dp_inq', 'Disputed', %s)",
            (account, purchase["lot_id"], 1000 * M,
             Jsonb({"payment_intent_id": purchase["payment_intent_id"], "amount_cents": 1000})))
        await conn.execute(
            "INSERT INTO disputes (id, account_id, charge_id, payment_intent_id, lot_id, amount_cents, claimed_micros,"
            " taken_micros, status, closed_at)"
            " VALUES ('dp_inq', %s, %s, %s, %s, 1000, %s, %s, 'warning_closed', now())",
            (account, purchase["charge_id"], purchase["payment_intent_id"], purchase["lot_id"], 1000 * M, 1000 * M))
    [violation] = by_check(await verify(pool, account))["credits_taken_back_at_most_their_money"]
    assert (violation.ids["returned_cents"], violation.ids["taken_micros"]) == ("0", str(1000 * M))


async def test_a_recharge_success_that_is_not_a_charge_of_its_own_is_reported(pool: AsyncConnectionPool) -> None:
    """A new account workflow run that reused sequence 1 took recharge-1's old success for its own:
    two recorded successes, one charge."""
    from creditflow.ledger import auto_recharge

    account = await new_account(pool)
    purchase = await paid_purchase(pool, account, cents=2000, credits=2000)
    async with pool.connection() as conn:
        await conn.execute("UPDATE stripe_charges SET kind = 'auto_recharge', request_id = 'recharge-1' WHERE id = %s",
                           (purchase["charge_id"],))
    first = datetime(2026, 11, 1, 12, tzinfo=UTC)
    for attempted_at in (first, first, first + timedelta(days=3)):  # a retried activity writes its row once
        await auto_recharge.record_attempt(pool, account, generation=1, status="succeeded", error=None,
                                           consecutive_failures=0, attempted_at=attempted_at, seq=1,
                                           charge_id=purchase["charge_id"])
        if attempted_at == first:
            assert "recharge_success_is_its_own_charge" not in by_check(await verify(pool, account))
    [violation] = by_check(await verify(pool, account))["recharge_success_is_its_own_charge"]
    assert (violation.ids["charge_id"], violation.ids["attempts"], violation.ids["seqs"]) == (
        purchase["charge_id"], "2", "1, 1")


async def test_a_credit_balance_not_applied_to_the_next_invoice_is_reported(pool: AsyncConnectionPool) -> None:
    """An invoice that carries a credit forward, and the next one that does not apply it."""
    account = await new_account(pool)
    credit = await _invoice(pool, account, 0, key="2026-09-01")
    later = await _invoice(pool, account, 0, key="2026-10-01")
    async with pool.connection() as conn:
        await conn.execute("UPDATE invoices SET subtotal_cents = -10000, credit_added_cents = 10000,"
                           " created_at = created_at - interval '1 month' WHERE id = %s", (credit,))
        await conn.execute("UPDATE invoices SET subtotal_cents = 0, credit_applied_cents = 4900 WHERE id = %s",
                           (later,))
    assert "credit_balance_carried_and_applied" not in by_check(await verify(pool, account))
    async with pool.connection() as conn:  # the next invoice billed the plan fee in full instead
        await conn.execute("UPDATE invoices SET subtotal_cents = 4900, amount_due_cents = 4900,"
                           " credit_applied_cents = 0 WHERE id = %s", (later,))
    [violation] = by_check(await verify(pool, account))["credit_balance_carried_and_applied"]
    assert (violation.ids["invoice_id"], violation.ids["available_cents"], violation.ids["credit_applied_cents"]) == (
        later, "10000", "0")


async def test_an_outbox_row_delivered_before_an_earlier_one_is_reported(pool: AsyncConnectionPool) -> None:
    """A dispute's close delivered while its opening was still failing (the relay must keep an account's order)."""
    account = await new_account(pool)
    async with pool.connection() as conn:
        rows = [(await (await conn.execute(
            "INSERT INTO outbox (account_id, kind, dedup_key) VALUES (%s, %s, %s) RETURNING id",
            (account, kind, f"{kind}:{account}"))).fetchone())["id"]  # type: ignore[index]
            for kind in ("stripe.charge.dispute.created", "stripe.charge.dispute.closed")]
        await conn.execute("UPDATE outbox SET dispatched_at = now() WHERE id = %s", (rows[1],))
    [violation] = by_check(await verify(pool, account))["outbox_delivered_in_order"]
    assert (violation.ids["row_id"], violation.ids["kind"], violation.ids["earlier_delivered_at"]) == (
        str(rows[1]), "stripe.charge.dispute.closed", "infinity")
    async with pool.connection() as conn:  # delivered in order: nothing to report
        await conn.execute("UPDATE outbox SET dispatched_at = now() WHERE account_id = %s", (account,))
    assert "outbox_delivered_in_order" not in by_check(await verify(pool, account))


async def test_a_purchase_entry_commits_with_its_charge_or_not_at_all(pool: AsyncConnectionPool) -> None:
    """The entry crediting a charge and the charge naming it are one transaction: verify never sees a purchase
    without its charge (``purchase_traces_to_a_charge``), even for a moment or after a crash between them."""
    from creditflow.domain.lots import LotSource
    from creditflow.ledger import postings

    account = await new_account(pool)

    async def crash(conn: Any, transaction_id: str) -> None:
        raise RuntimeError("worker killed after the entry, before the charge row")

    with pytest.raises(RuntimeError):
        await postings.post(pool, account_id=account, type="purchase", amount_micros=1000 * M,
                            counter_book="system:payments_clearing", description="Credits",
                            idempotency_key="sys:topup:pi_crash",
                            lot_source=LotSource.PURCHASE, lot_paid_cents=1000, with_entry=crash)
    async with pool.connection() as conn:
        found = await (await conn.execute("SELECT count(*) AS n FROM journal WHERE account_id = %s"
                                          " AND idempotency_key = 'sys:topup:pi_crash'", (account,))).fetchone()
    assert found is not None and found["n"] == 0
    await paid_purchase(pool, account, cents=1000, credits=1000)
    assert (await verify(pool, account)).ok


async def test_plan_credits_granted_twice_in_one_month_are_reported(pool: AsyncConnectionPool) -> None:
    """Defect 5's double grant: a new account workflow run that forgot the subscription subscribes again (anchor:
    now), so a second period overlapping the first one gets the plan's credits too."""
    from activities.billing_cycle import BillingCycleActivities, StartSubscriptionInput
    from creditflow.domain.plans import load_plan_catalog

    cycle = BillingCycleActivities(pool, load_plan_catalog())
    account = await new_account(pool)
    first_anchor, again_at = datetime(2026, 10, 1, 10, tzinfo=UTC), datetime(2026, 10, 15, 12, tzinfo=UTC)
    await cycle.start_subscription(StartSubscriptionInput(account_id=account, plan_id="starter",
                                                          anchor=first_anchor, now=first_anchor))
    assert "plan_granted_once_per_period" not in by_check(await verify(pool, account))
    await cycle.start_subscription(StartSubscriptionInput(account_id=account, plan_id="starter",
                                                          anchor=again_at, now=again_at))
    async with pool.connection() as conn:
        grants = await (await conn.execute(
            "SELECT j.id::text AS txn, l.id AS lot FROM journal j JOIN credit_lots l ON l.txn_id = j.id"
            " WHERE j.account_id = %s AND j.type = 'plan_grant' ORDER BY j.seq", (account,))).fetchall()
    [violation] = by_check(await verify(pool))["plan_granted_once_per_period"]
    assert violation.account_id == account
    assert violation.ids == {
        "transaction_id": grants[0]["txn"], "lot_id": grants[0]["lot"], "period_key": "2026-10-01",
        "again_transaction_id": grants[1]["txn"], "again_lot_id": grants[1]["lot"], "again_period_key": "2026-10-15"}
    assert violation.message == (
        f"plan credits granted twice for one month: period 2026-10-01 (entry {grants[0]['txn']}, lot "
        f"{grants[0]['lot']}) and the overlapping period 2026-10-15 (entry {grants[1]['txn']}, lot "
        f"{grants[1]['lot']})")


async def test_a_subscription_renewed_and_changed_grants_once_per_period(pool: AsyncConnectionPool) -> None:
    """Subscribe, change plan now (a top-up keyed by the change), change at the renewal, renew twice, an anchor on
    the 31st (periods clamped to shorter months) and a renewal retried: one grant per period, nothing reported."""
    from activities.billing_cycle import (
        BillingCycleActivities,
        ChangeNowInput,
        PendingPlanInput,
        RenewInput,
        StartSubscriptionInput,
    )
    from creditflow.domain.plans import load_plan_catalog

    cycle = BillingCycleActivities(pool, load_plan_catalog())
    account = await new_account(pool)
    anchor = datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
    state = await cycle.start_subscription(StartSubscriptionInput(account_id=account, plan_id="starter",
                                                                  anchor=anchor, now=anchor))
    state = await cycle.change_plan_now(ChangeNowInput(account_id=account, subscription=state,
                                                       new_plan_id="growth", at=anchor + timedelta(days=10)))
    state = await cycle.set_pending_plan(PendingPlanInput(
        account_id=account, subscription=state.model_copy(update={"pending_plan_id": "scale"})))
    for _ in range(3):
        renewed = await cycle.renew_subscription(RenewInput(account_id=account, subscription=state))
        again = await cycle.renew_subscription(RenewInput(account_id=account, subscription=state))  # a retry
        assert again.subscription == renewed.subscription
        assert renewed.subscription is not None
        state = renewed.subscription
    async with pool.connection() as conn:
        keys = [r["idempotency_key"] for r in await (await conn.execute(
            "SELECT idempotency_key FROM journal WHERE account_id = %s AND type = 'plan_grant' ORDER BY seq",
            (account,))).fetchall()]
    assert keys == ["sys:plan_grant:2026-01-31", "sys:plan_grant:2026-01-31:change1", "sys:plan_grant:2026-02-28",
                    "sys:plan_grant:2026-03-31", "sys:plan_grant:2026-04-30"]
    assert "plan_granted_once_per_period" not in by_check(await verify(pool, account))


async def test_a_refund_or_dispute_of_an_invoice_payment_not_reflected_is_reported(pool: AsyncConnectionPool) -> None:
    """Defect 8 (invoices): a refund made on Stripe and a dispute of an invoice payment, applied by the account
    workflow (outbox rows applied) but not reflected on the invoice; creditflow's own refunds are not counted."""
    account = await new_account(pool)
    invoice_id = await _invoice(pool, account, 0)
    pi = "pi_invoicepaid01"
    async with pool.connection() as conn:
        await conn.execute("UPDATE invoices SET status = 'paid', paid_at = now(), payment_intent_id = %s"
                           " WHERE id = %s", (pi, invoice_id))
        rows = [(await (await conn.execute(
            "INSERT INTO outbox (account_id, kind, dedup_key, payload, dispatched_at, applied_at)"
            " VALUES (%s, %s, %s, %s, now(), now()) RETURNING id", (account, kind, key, Jsonb(payload)))).fetchone()
        )["id"] for kind, key, payload in (  # type: ignore[index]
            ("stripe.charge.refunded", "stripe:evt_inv_ref", {
                "payment_intent_id": pi, "stripe_charge_id": "ch_1", "refunds": [
                    {"id": "re_stripe_side", "amount": 400, "creditflow_refund_id": None},
                    {"id": "re_ours", "amount": 100, "creditflow_refund_id": "ref_x"}]}),
            ("stripe.charge.dispute.created", "stripe:evt_inv_dp", {
                "payment_intent_id": pi, "stripe_charge_id": "ch_1", "dispute_id": "dp_inv", "amount": 1000,
                "status": "needs_response"}),
            ("stripe.charge.refunded", "stripe:evt_inv_pending", {  # not applied yet: not judged
                "payment_intent_id": pi, "refunds": [{"id": "re_later", "amount": 1, "creditflow_refund_id": None}]}),
        )]
        await conn.execute("UPDATE outbox SET applied_at = NULL WHERE id = %s", (rows[2],))
    found = by_check(await verify(pool, account))["invoice_payment_reversals_reflected"]
    assert [(v.ids["kind"], v.ids["stripe_id"], v.ids["outbox_row_id"]) for v in found] == [
        ("refund", "re_stripe_side", str(rows[0])), ("dispute", "dp_inv", str(rows[1]))]
    assert found[0].message == (f"refund re_stripe_side of the payment {pi} of invoice {invoice_id} was applied "
                                f"(outbox row {rows[0]}, stripe:evt_inv_ref) but the invoice does not reflect it")
    async with pool.connection() as conn:  # reflected: nothing to report
        for stripe_id, kind in (("re_stripe_side", "refund"), ("dp_inv", "dispute")):
            await conn.execute("INSERT INTO invoice_payment_events (invoice_id, stripe_id, kind, amount_cents,"
                               " moved_micros) VALUES (%s, %s, %s, 0, 0)", (invoice_id, stripe_id, kind))
    assert "invoice_payment_reversals_reflected" not in by_check(await verify(pool, account))
