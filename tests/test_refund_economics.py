"""Refunds and disputes conserve money: a purchase's credits and money move together, in the proportion
that lot was bought, whatever the order of refunds, disputes and Stripe's answers.

Real PostgreSQL, Temporal dev server (production worker), localstripe; disputes and refund status changes are fed as
signed webhook events (localstripe has no disputes and creates every refund ``succeeded``). No mocks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.domain.topups import DEFAULT_PACKAGES, CreditPackage
from creditflow.errors import CreditflowError
from creditflow.payments.gateway import RefundState, StripeGateway
from tests.conftest import ADMIN_KEY, STRIPE_KEY
from tests.support.api import new_account
from tests.support.auto_recharge import relay  # noqa: F401 - fixture: the outbox relay running
from tests.support.ledger import assert_invariants
from tests.support.payments import TOPUP, save_card
from tests.support.temporal import eventually
from tests.support.webhooks import SECRET, Clients, cf, clients_for, event, sign  # noqa: F401 - fixtures
from workflows.contract import RefundOutcome, refund_workflow_id

pytestmark = pytest.mark.temporal

MIGRATIONS = Path(__file__).resolve().parent.parent / "creditflow" / "ledger" / "migrations"

REFUNDS = "/api/v1/billing/refunds"
# A package carrying more credits than cents (packages allow it): 1,200 credits for $10.
BONUS = CreditPackage(id="bonus", name="Bonus", price_usd=Decimal(10), credits=1_200)


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1,
                    stripe_webhook_secret=SECRET,  # type: ignore[arg-type]
                    topup_packages=[*DEFAULT_PACKAGES, BONUS])


async def balance_of(client: Clients, account: str) -> Any:
    return (await client.admin.get("/api/v1/billing/balance", params={"account_id": account})).json()["balance"]


async def buy(client: Clients, account: str, request_id: str, **what: Any) -> dict[str, Any]:
    resp = await client.admin.post(TOPUP, json={"account_id": account, "request_id": request_id, **what})
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
    return dict(resp.json())


def exact(resp: Any) -> dict[str, Any]:
    """The JSON body with exact decimals (amounts are never floats)."""
    return dict(json.loads(resp.text, parse_float=Decimal))


async def refund(client: Clients, account: str, pi: str, request_id: str, credits: int | None = None) -> Any:
    body: dict[str, Any] = {"account_id": account, "payment_intent_id": pi, "request_id": request_id}
    if credits is not None:
        body["credits"] = credits
    return await client.admin.post(REFUNDS, json=body)


def migration_statements(name: str, *starts: str) -> list[str]:
    """The statements of one of creditflow's migrations that start with one of ``starts`` (to re-run a backfill)."""
    text = (MIGRATIONS / name).read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [sql.strip() for sql in body.split(";") if sql.strip().startswith(starts)]


def lot_id(lot: dict[str, Any]) -> str:
    return str(lot["id"])


async def lot_of(pool: AsyncConnectionPool, transaction_id: str) -> dict[str, Any]:
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT id, source, original_micros, remaining_micros, paid_cents FROM credit_lots"
            " WHERE txn_id = %s::uuid", (transaction_id.removeprefix("txn_"),))).fetchone()
    assert row is not None
    return dict(row)


async def journal(pool: AsyncConnectionPool, account: str, type_: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute(
            "SELECT amount_micros, idempotency_key FROM journal WHERE account_id = %s AND type = %s ORDER BY seq",
            (account, type_))).fetchall()


def stripe_money(sdk: stripe.StripeClient, pis: list[str]) -> tuple[int, int]:
    """(captured, refunded) cents of these PaymentIntents, as Stripe has them."""
    captured = sum(sdk.v1.payment_intents.retrieve(pi).amount for pi in pis)
    refunded = sum(r.amount for pi in pis
                   for r in sdk.v1.refunds.list(params={"payment_intent": pi, "limit": 100}).auto_paging_iter()
                   if r.status == "succeeded")
    return captured, refunded


# --- a lot refunds at its own price: bonus packages and partial refunds ----------------------------------


async def test_bonus_package_refund_loop_creates_no_credits(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient) -> None:  # noqa: F811
    """Buy 1,200 credits for $10 and refund "all refundable", three times: every time the 1,200 credits leave with the
    $10; credits and money end where they started (5,000 welcome credits, $0 net)."""
    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    pis = []
    for n in range(3):
        bought = await buy(cf, account, f"bonus-{n}", package_id="bonus")
        assert (bought["credits"], bought["amount_usd"], bought["balance"]) == (1200, 10, 6200)
        pis.append(bought["payment_intent_id"])
        resp = await refund(cf, account, bought["payment_intent_id"], f"all-{n}")
        assert resp.status_code == 200, resp.text
        body = exact(resp)
        assert (body["status"], body["credits"], body["amount_usd"], body["balance"]) == ("succeeded", 1200, 10, 5000)
        lot = await lot_of(pool, bought["transaction_id"])
        assert (lot["source"], lot["original_micros"], lot["remaining_micros"], lot["paid_cents"]) == (
            "purchase", 1200 * MICROS_PER_CREDIT, 0, 1000)
    assert await balance_of(cf, account) == 5000
    assert stripe_money(sdk, pis) == (3000, 3000)
    await assert_invariants(pool)
    # Lots written before migration 0023_1 get their price from their charge (its backfill, run again here).
    async with pool.connection() as conn:
        await conn.execute("UPDATE credit_lots SET paid_cents = NULL WHERE account_id = %s", (account,))
        for sql in migration_statements("0023_1_lot_prices.sql", "UPDATE"):
            await conn.execute(sql)
        prices = await (await conn.execute("SELECT source, paid_cents FROM credit_lots WHERE account_id = %s"
                                           " ORDER BY source", (account,))).fetchall()
    assert [(p["source"], p["paid_cents"]) for p in prices] == [("purchase", 1000)] * 3 + [("welcome_bonus", None)]


async def test_partial_refunds_are_priced_by_the_lot_and_round_against_the_refund(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient) -> None:  # noqa: F811
    """1,200 credits for 1,000 cents: 600 credits give 500 cents; 7 credits give floor(5.83) = 5 cents; 1 credit is
    worth less than a cent (refused, nothing written); the rest (593) gives floor(494.17) = 494 cents. Never more
    than paid."""
    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    bought = await buy(cf, account, "b", package_id="bonus")
    pi = bought["payment_intent_id"]
    half = exact(await refund(cf, account, pi, "r-600", 600))
    assert (half["credits"], half["amount_usd"], half["balance"]) == (600, 5, 5600)
    seven = exact(await refund(cf, account, pi, "r-7", 7))
    assert (seven["credits"], seven["amount_usd"], seven["balance"]) == (7, Decimal("0.05"), 5593)
    tiny = await refund(cf, account, pi, "r-1", 1)
    assert tiny.status_code == 422 and tiny.json()["error"]["code"] == "refund_exceeds_remaining", tiny.text
    rest = exact(await refund(cf, account, pi, "r-rest"))
    assert (rest["credits"], rest["amount_usd"], rest["balance"]) == (593, Decimal("4.94"), 5000)
    assert stripe_money(sdk, [pi]) == (1000, 999)
    await assert_invariants(pool)


async def test_dispute_of_a_bonus_package_takes_credits_in_the_lots_proportion(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, relay: Any) -> None:  # noqa: F811
    """A lost dispute of D cents takes ceil(D * 1,200 / 1,000) credits of that lot: 500 cents -> 600 credits, then a
    Stripe-side refund of 7 cents -> 8.4 credits (rounded up, in micros)."""
    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    bought = await buy(cf, account, "b", package_id="bonus")
    pi = bought["payment_intent_id"]
    dispute = {"id": "dp_half", "object": "dispute", "payment_intent": pi, "charge": "ch_x", "amount": 500,
               "reason": "fraudulent", "status": "needs_response"}
    body = event("charge.dispute.created", dispute)
    assert (await cf.deliver(body, sign(body))).json()["outcome"] == "routed"
    [taken] = await eventually(lambda: journal(pool, account, "dispute"), lambda r: len(r) == 1, timeout=20)
    assert taken["amount_micros"] == -600 * MICROS_PER_CREDIT
    charge = {"id": "ch_x", "object": "charge", "payment_intent": pi, "amount": 1000, "amount_refunded": 7,
              "refunds": {"object": "list", "data": [{"id": "re_dash_7", "amount": 7}]}}
    body = event("charge.refunded", charge)
    assert (await cf.deliver(body, sign(body))).json()["outcome"] == "routed"
    [back] = await eventually(lambda: journal(pool, account, "refund"), lambda r: len(r) == 1, timeout=20)
    assert back["amount_micros"] == -8_400_000
    assert (await lot_of(pool, bought["transaction_id"]))["remaining_micros"] == 1200 * MICROS_PER_CREDIT - 608_400_000
    await assert_invariants(pool)


# --- a pending refund is not a refund yet: Stripe may still fail it -------------------------------------


class StripeAnswersPending(StripeGateway):
    """Test-only gateway: the refunds are real (localstripe), but Stripe's answer is reported ``pending``, as real
    Stripe answers for payment methods that refund asynchronously (localstripe creates every refund ``succeeded``).
    What happens next is fed as signed webhook events, as Stripe sends them."""

    async def create_refund(self, payment_intent_id: str, amount_cents: int, *, idempotency_key: str,
                            metadata: dict[str, str]) -> RefundState:
        made = await super().create_refund(payment_intent_id, amount_cents, idempotency_key=idempotency_key,
                                           metadata=metadata)
        return made.model_copy(update={"status": "pending"})

    async def retrieve_refund(self, refund_id: str) -> RefundState:
        return (await super().retrieve_refund(refund_id)).model_copy(update={"status": "pending"})


@pytest.fixture
async def pending_cf(temporal_client: Client, pool: AsyncConnectionPool,
                     temporal_settings: Settings) -> AsyncIterator[Clients]:
    """The app, and the production worker whose Stripe answers every refund ``pending``."""
    from workers.main import build_worker

    gateway = StripeAnswersPending.from_settings(temporal_settings)
    async with build_worker(temporal_client, pool, temporal_settings, gateway=gateway), \
            clients_for(temporal_settings) as clients:
        yield clients


def refund_event(type_: str, refund_row: dict[str, Any], status: str, **extra: Any) -> bytes:
    """A Refund object as Stripe sends it in refund / charge.refund events (creditflow's metadata included)."""
    obj = {"id": refund_row["stripe_refund_id"], "object": "refund", "amount": refund_row["amount_cents"],
           "payment_intent": refund_row["payment_intent_id"], "status": status,
           "metadata": {"creditflow_refund_id": refund_row["id"], "creditflow_account_id": refund_row["account_id"]},
           **extra}
    return event(type_, obj)


async def refund_rows(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT * FROM refunds WHERE account_id = %s ORDER BY created_at",
                                         (account,))).fetchall()


async def test_pending_refund_is_not_succeeded_and_a_later_failure_gives_the_credits_back_once(
        pending_cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, temporal_client: Client) -> None:
    app = pending_cf
    account = await new_account(app.admin)
    await save_card(app.admin, sdk, account)
    bought = await buy(app, account, "b", amount_usd=25)  # 2,500 credits, 7,500 in all
    pi = bought["payment_intent_id"]

    resp = await refund(app, account, pi, "r-all")
    assert resp.status_code == 202, resp.text
    body = exact(resp)
    assert (body["status"], body["credits"], body["amount_usd"], body["balance"]) == ("pending", 2500, 25, 5000)
    assert body["stripe_refund_id"].startswith("re_")
    [row] = await refund_rows(pool, account)
    assert (row["status"], row["stripe_status"], row["finalized_at"]) == ("pending", "pending", None)
    listed = (await app.admin.get(REFUNDS, params={"account_id": account})).json()["items"]
    assert [(r["status"], r["credits"]) for r in listed] == [("pending", 2500)]
    # Asking again answers the same pending refund.
    again = await refund(app, account, pi, "r-all")
    assert (again.status_code, again.json()["refund_id"]) == (202, body["refund_id"])

    # Stripe: the refund failed. The reserved credits go back to the purchase's lot, once, whatever is redelivered.
    failed = refund_event("charge.refund.updated", row, "failed", failure_reason="expired_or_canceled_card")
    first = await app.deliver(failed, sign(failed))
    assert (first.status_code, first.json()["outcome"]) == (200, "recorded"), first.text
    assert (await app.deliver(failed, sign(failed))).json()["duplicate"] is True
    also = refund_event("refund.failed", row, "failed", failure_reason="expired_or_canceled_card")
    assert (await app.deliver(also, sign(also))).status_code == 200
    assert await balance_of(app, account) == 7500
    [row] = await refund_rows(pool, account)
    assert (row["status"], row["stripe_status"], row["failure_code"]) == ("failed", "failed", "refund_failed")
    assert [r["amount_micros"] // MICROS_PER_CREDIT for r in await journal(pool, account, "refund")] == [-2500]
    assert [r["amount_micros"] // MICROS_PER_CREDIT for r in await journal(pool, account, "refund_reversal")] == [2500]
    assert (await lot_of(pool, bought["transaction_id"]))["remaining_micros"] == 2500 * MICROS_PER_CREDIT
    # The webhook woke the refund's workflow (signal refund_event): it ends failed, and asking again says so.
    outcome = await workflow_result(temporal_client, account, "r-all")
    assert (outcome.status, outcome.error_code, outcome.balance) == ("failed", "refund_failed", 7500)
    again = await refund(app, account, pi, "r-all")
    assert (again.status_code, again.json()["error"]["code"]) == (502, "refund_failed"), again.text

    # Another refund, pending, then succeeded: finalized once, the credits stay refunded.
    resp = await refund(app, account, pi, "r-1000", 1000)
    assert resp.status_code == 202 and exact(resp)["balance"] == 6500, resp.text
    row = (await refund_rows(pool, account))[1]
    assert row["status"] == "pending"
    for type_ in ("refund.updated", "charge.refund.updated"):
        done = refund_event(type_, row, "succeeded")
        assert (await app.deliver(done, sign(done))).json()["outcome"] == "recorded"
    row = (await refund_rows(pool, account))[1]
    assert (row["status"], row["stripe_status"]) == ("succeeded", "succeeded") and row["finalized_at"] is not None
    assert await balance_of(app, account) == 6500
    outcome = await workflow_result(temporal_client, account, "r-1000")
    assert (outcome.status, outcome.credits, outcome.amount_cents, outcome.balance) == ("succeeded", 1000, 1000, 6500)
    await assert_invariants(pool)
    # The new path (patch refund-pending-waits: mark pending, answer, wait for Stripe) replays deterministically.
    from tests.support.temporal import replayer

    # ("r-all" was asked again after its workflow closed: its latest run replays the decided row, no Stripe call.)
    for request_id in ("r-all", "r-1000"):
        history = await temporal_client.get_workflow_handle(refund_workflow_id(account, request_id)).fetch_history()
        patches = {json.loads(e.marker_recorded_event_attributes.details["patch-data"].payloads[0].data)["id"]
                   for e in history.events if e.HasField("marker_recorded_event_attributes")}
        assert patches == ({"refund-pending-waits", "refund-notices"} if request_id == "r-1000" else {"refund-notices"})
        await replayer().replay_workflow(history)


async def workflow_result(client: Client, account: str, request_id: str) -> RefundOutcome:
    handle = client.get_workflow_handle(refund_workflow_id(account, request_id), result_type=RefundOutcome)
    return await asyncio.wait_for(handle.result(), 20)


async def test_pending_refund_polled_by_its_workflow_is_settled_by_stripes_answer(
        pending_cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient,
        temporal_settings: Settings) -> None:
    """The workflow's poll (activity ``settle_pending_refund``) applies what Stripe says now: localstripe has the
    refund succeeded, so it is finalized; asked again, nothing changes."""
    from creditflow.payments import refunds

    app = pending_cf
    account = await new_account(app.admin)
    await save_card(app.admin, sdk, account)
    bought = await buy(app, account, "b", amount_usd=25)
    resp = await refund(app, account, bought["payment_intent_id"], "r", 400)
    assert resp.status_code == 202 and exact(resp)["status"] == "pending", resp.text
    [row] = await refund_rows(pool, account)
    gateway = StripeGateway.from_settings(temporal_settings)  # what Stripe (localstripe) says: succeeded
    for _ in range(2):
        settled = await refunds.settle_pending(pool, gateway, row["id"])
        assert (settled.refund.status, settled.refund.stripe_status, settled.balance) == ("succeeded", "succeeded",
                                                                                          7100)
    assert [r["amount_micros"] // MICROS_PER_CREDIT for r in await journal(pool, account, "refund")] == [-400]
    assert await journal(pool, account, "refund_reversal") == []
    await assert_invariants(pool)


# --- a dispute opened while a refund is in flight ---------------------------------------------------------


class StripeRefusesOnceDisputed(StripeGateway):
    """Test-only gateway: a refund call stays in flight until the test opens ``gate``, then Stripe refuses it as it
    refuses the refund of a disputed charge (``charge_disputed``, an invalid request: permanent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = asyncio.Event()
        self.called = asyncio.Event()

    async def create_refund(self, payment_intent_id: str, amount_cents: int, *, idempotency_key: str,
                            metadata: dict[str, str]) -> RefundState:
        self.called.set()
        await self.gate.wait()
        raise CreditflowError("payment_request_invalid", "This charge is disputed and cannot be refunded",
                              details={"stripe_code": "charge_disputed"})


async def notices(pool: AsyncConnectionPool, account: str, kind: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT payload FROM notifications_log WHERE account_id = %s AND kind = %s",
                                         (account, kind))).fetchall()


async def test_dispute_during_a_refund_is_not_lost(temporal_client: Client, pool: AsyncConnectionPool,
                                                   temporal_settings: Settings, sdk: stripe.StripeClient,
                                                   relay: Any) -> None:  # noqa: F811
    """Purchase (2,500 credits for $25); a refund of all of it reserves the credits and is in flight at Stripe; a
    dispute of the whole $25 is opened (the lot is empty: nothing to take yet) and lost; Stripe then refuses the
    refund of the disputed charge. The released credits satisfy the dispute: the customer keeps neither the
    credits nor the money (5,000 welcome credits left, as before the purchase)."""
    from workers.main import build_worker

    gateway = StripeRefusesOnceDisputed.from_settings(temporal_settings)
    assert isinstance(gateway, StripeRefusesOnceDisputed)
    async with build_worker(temporal_client, pool, temporal_settings, gateway=gateway), \
            clients_for(temporal_settings) as app:
        account = await new_account(app.admin)
        await save_card(app.admin, sdk, account)
        bought = await buy(app, account, "b", amount_usd=25)
        pi = bought["payment_intent_id"]
        asked = asyncio.create_task(refund(app, account, pi, "r-all"))
        await asyncio.wait_for(gateway.called.wait(), 20)
        assert await balance_of(app, account) == 5000  # reserved, in flight

        dispute = {"id": "dp_during", "object": "dispute", "payment_intent": pi, "charge": "ch_x", "amount": 2500,
                   "reason": "fraudulent", "status": "needs_response"}
        opened = event("charge.dispute.created", dispute)
        assert (await app.deliver(opened, sign(opened))).json()["outcome"] == "routed"
        await eventually(lambda: notices(pool, account, "payment.disputed"), lambda r: len(r) == 1, timeout=20)
        lost = event("charge.dispute.closed", {**dispute, "status": "lost"})
        assert (await app.deliver(lost, sign(lost))).json()["outcome"] == "routed"

        gateway.gate.set()  # Stripe refuses the refund of the disputed charge
        resp = await asyncio.wait_for(asked, 60)
        assert resp.status_code == 422 and resp.json()["error"]["code"] == "payment_request_invalid", resp.text
        assert await balance_of(app, account) == 5000
        assert (await lot_of(pool, bought["transaction_id"]))["remaining_micros"] == 0
        moves = [(r["type"], r["amount_micros"] // MICROS_PER_CREDIT) for r in await all_moves(pool, account)]
        # The dispute opened while the refund held the credits: it took nothing then (a row of 0 records it, 0027)
        # and took the released credits when Stripe refused the refund.
        assert moves == [("welcome_bonus", 5000), ("purchase", 2500), ("refund", -2500), ("dispute", 0),
                         ("refund_reversal", 2500), ("dispute", -2500)]
        assert stripe_money(sdk, [pi]) == (2500, 0)  # Stripe keeps no refund; the dispute gave the $25 back
        [claim] = await eventually(lambda: dispute_rows(pool, account), lambda r: r[0]["status"] == "lost",
                                   timeout=20)  # the close is applied by the account workflow, maybe after
        assert (claim["id"], claim["status"], claim["claimed_micros"], claim["taken_micros"]) == (
            "dp_during", "lost", 2500 * MICROS_PER_CREDIT, 2500 * MICROS_PER_CREDIT)
        await assert_invariants(pool)


async def test_dispute_during_a_pending_refund_that_fails_takes_the_released_credits(
        pending_cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, relay: Any) -> None:  # noqa: F811
    """The same through a refund Stripe answered ``pending`` and later reports failed: the release gives the
    credits to the open dispute, once (a redelivered failure changes nothing)."""
    app = pending_cf
    account = await new_account(app.admin)
    await save_card(app.admin, sdk, account)
    bought = await buy(app, account, "b", package_id="bonus")  # 1,200 credits for $10
    pi = bought["payment_intent_id"]
    assert (await refund(app, account, pi, "r-all")).status_code == 202
    dispute = {"id": "dp_pending", "object": "dispute", "payment_intent": pi, "charge": "ch_x", "amount": 1000,
               "reason": "fraudulent", "status": "needs_response"}
    opened = event("charge.dispute.created", dispute)
    assert (await app.deliver(opened, sign(opened))).json()["outcome"] == "routed"
    [claim] = await eventually(lambda: dispute_rows(pool, account), lambda r: len(r) == 1, timeout=20)
    assert (claim["claimed_micros"], claim["taken_micros"]) == (1200 * MICROS_PER_CREDIT, 0)
    [row] = await refund_rows(pool, account)
    for _ in range(2):
        failed = refund_event("refund.failed", row, "failed")
        assert (await app.deliver(failed, sign(failed))).status_code == 200
    assert await balance_of(app, account) == 5000
    moves = [(r["type"], r["amount_micros"] // MICROS_PER_CREDIT) for r in await all_moves(pool, account)]
    assert moves == [("welcome_bonus", 5000), ("purchase", 1200), ("refund", -1200), ("dispute", 0),
                     ("refund_reversal", 1200), ("dispute", -1200)]
    [claim] = await dispute_rows(pool, account)
    assert claim["taken_micros"] == 1200 * MICROS_PER_CREDIT
    await assert_invariants(pool)


async def dispute_rows(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT * FROM disputes WHERE account_id = %s ORDER BY created_at",
                                         (account,))).fetchall()


async def all_moves(pool: AsyncConnectionPool, account: str) -> list[dict[str, Any]]:
    async with pool.connection() as conn:
        return await (await conn.execute("SELECT type, amount_micros FROM journal WHERE account_id = %s ORDER BY seq",
                                         (account,))).fetchall()


# --- disputes closing as inquiries, refunds failing after their finalize -------------------------------


async def test_dispute_closed_as_warning_closed_returns_what_was_taken_once(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, relay: Any) -> None:  # noqa: F811
    """An inquiry (``warning_needs_response``) that closes ``warning_closed`` leaves the merchant the money: the
    credits taken when it opened come back to the purchase's own lot, once, however often Stripe says so."""
    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    bought = await buy(cf, account, "b", package_id="bonus")  # 1,200 credits for $10
    pi = bought["payment_intent_id"]
    inquiry = {"id": "dp_inquiry", "object": "dispute", "payment_intent": pi, "charge": "ch_x", "amount": 500,
               "reason": "general", "status": "warning_needs_response"}
    opened = event("charge.dispute.created", inquiry)
    assert (await cf.deliver(opened, sign(opened))).json()["outcome"] == "routed"
    await eventually(lambda: journal(pool, account, "dispute"), lambda r: len(r) == 1, timeout=20)
    assert await balance_of(cf, account) == 5600
    for n in range(2):  # a redelivery and a second event with the same news
        closed = event("charge.dispute.closed", {**inquiry, "status": "warning_closed"}, event_id=f"evt_wc_{n}")
        for _ in range(2):
            assert (await cf.deliver(closed, sign(closed))).status_code == 200
    [back] = await eventually(lambda: journal(pool, account, "dispute_reversal"), lambda r: len(r) == 1, timeout=20)
    assert (back["amount_micros"], back["idempotency_key"]) == (600 * MICROS_PER_CREDIT, "sys:dispute_won:dp_inquiry")
    await eventually(lambda: dispute_rows(pool, account), lambda r: r[0]["returned_micros"] > 0, timeout=20)
    assert await balance_of(cf, account) == 6200
    lot = await lot_of(pool, bought["transaction_id"])
    assert (lot["remaining_micros"], lot["paid_cents"]) == (1200 * MICROS_PER_CREDIT, 1000)  # back in its own lot
    [claim] = await dispute_rows(pool, account)
    assert (claim["status"], claim["taken_micros"], claim["returned_micros"]) == (
        "warning_closed", 600 * MICROS_PER_CREDIT, 600 * MICROS_PER_CREDIT)
    # Every redelivered close applied first: a late one must not write the row between the DELETE and the backfill.
    await eventually(lambda: _unapplied_stripe_rows(pool, account), lambda n: n == 0, timeout=60)
    # Disputes applied before migration 0023_3 are recorded from their journal rows (its backfill, run again here).
    async with pool.connection() as conn:
        await conn.execute("DELETE FROM disputes WHERE account_id = %s", (account,))
        for sql in migration_statements("0023_3_disputes.sql", "INSERT", "UPDATE"):
            await conn.execute(sql)
    [claim] = await dispute_rows(pool, account)
    assert (claim["status"], claim["lot_id"], claim["amount_cents"], claim["taken_micros"],
            claim["returned_micros"]) == ("won", lot_id(lot), 500, 600 * MICROS_PER_CREDIT, 600 * MICROS_PER_CREDIT)
    # The purchase is whole again: refunding all of it returns the $10 for the 1,200 credits.
    all_back = exact(await refund(cf, account, pi, "r-all"))
    assert (all_back["credits"], all_back["amount_usd"], all_back["balance"]) == (1200, 10, 5000)
    await assert_invariants(pool)


async def test_refund_reported_failed_before_its_finalize_stays_failed(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
        temporal_settings: Settings) -> None:
    """The saga's steps driven directly: Stripe answers succeeded, then reports the refund failed before the saga
    finalizes it. The failure released the credits once; the finalize that follows leaves the refund failed."""
    from datetime import UTC, datetime

    from creditflow.domain.refunds import RefundReason
    from creditflow.payments import refunds

    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    bought = await buy(cf, account, "b", amount_usd=25)
    gateway = StripeGateway.from_settings(temporal_settings)
    plan = await refunds.plan(pool, account_id=account, request_id="direct", purchase_transaction_id=None,
                              payment_intent_id=bought["payment_intent_id"], credits=500,
                              reason=RefundReason.REQUESTED_BY_CUSTOMER, requested_by="admin", now=datetime.now(UTC))
    reserved = await refunds.reserve(pool, plan)
    made = await refunds.refund_payment(pool, gateway, reserved.refund.id)
    assert made.status == "succeeded"
    row = (await refund_rows(pool, account))[0]
    failed = refund_event("charge.refund.updated", row, "failed")
    assert (await cf.deliver(failed, sign(failed))).json()["outcome"] == "recorded"
    done = await refunds.finalize(pool, reserved.refund.id, made.id, made.status)
    assert (done.refund.status, done.refund.stripe_status, done.balance) == ("failed", "failed", 7500)
    assert [r["amount_micros"] // MICROS_PER_CREDIT for r in await journal(pool, account, "refund_reversal")] == [500]
    await assert_invariants(pool)


async def test_refund_made_on_stripe_that_fails_gives_its_credits_back_once(
        cf: Clients, pool: AsyncConnectionPool, sdk: stripe.StripeClient, relay: Any) -> None:  # noqa: F811
    """A refund made in the Stripe dashboard took its credits back (charge.refunded); Stripe later reports it failed:
    the money did not go back, so the credits return to the purchase's lot, once."""
    account = await new_account(cf.admin)
    await save_card(cf.admin, sdk, account)
    bought = await buy(cf, account, "b", package_id="bonus")  # 1,200 credits for $10
    pi = bought["payment_intent_id"]
    charge = {"id": "ch_x", "object": "charge", "payment_intent": pi, "amount": 1000, "amount_refunded": 500,
              "refunds": {"object": "list", "data": [{"id": "re_dash_f", "amount": 500}]}}
    body = event("charge.refunded", charge)
    assert (await cf.deliver(body, sign(body))).json()["outcome"] == "routed"
    await eventually(lambda: journal(pool, account, "refund"), lambda r: len(r) == 1, timeout=20)
    assert await balance_of(cf, account) == 5600
    obj = {"id": "re_dash_f", "object": "refund", "amount": 500, "payment_intent": pi, "status": "failed"}
    for type_ in ("charge.refund.updated", "refund.failed", "charge.refund.updated"):
        failed = event(type_, obj)
        assert (await cf.deliver(failed, sign(failed))).json()["outcome"] == "recorded"
    [back] = await journal(pool, account, "refund_reversal")
    assert (back["amount_micros"], back["idempotency_key"]) == (600 * MICROS_PER_CREDIT,
                                                                "sys:stripe_refund_failed:re_dash_f")
    assert await balance_of(cf, account) == 6200
    assert (await lot_of(pool, bought["transaction_id"]))["remaining_micros"] == 1200 * MICROS_PER_CREDIT
    unknown = event("refund.failed", {**obj, "id": "re_never_taken"})
    assert (await cf.deliver(unknown, sign(unknown))).json()["outcome"] == "ignored"
    await assert_invariants(pool)


async def _unapplied_stripe_rows(pool: AsyncConnectionPool, account: str) -> int:
    """Stripe events of the account not yet applied by its workflow (``outbox.applied_at``)."""
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "SELECT count(*) AS n FROM outbox WHERE account_id = %s AND kind LIKE 'stripe.%%' AND applied_at IS NULL",
            (account,))).fetchone()
    return int(row["n"]) if row else 0
