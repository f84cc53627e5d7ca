"""What the seed products promise about entitlement checks, console figures and invoices,
through the HTTP API on the real stack (PostgreSQL; Temporal and localstripe where a payment runs)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment

from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, STRIPE_KEY, new_card
from tests.support.api import app_client, new_account, track
from tests.support.invoices import past_due_invoice
from tests.support.payments import CARDS, DECLINED_AT_CHARGE, save_card, succeeded_intents
from tests.support.temporal import eventually, record_and_replay, ts_env  # noqa: F401 - fixture
from workers.main import build_worker
from workflows.contract import InvoiceAdjustmentLine, InvoiceWorkflowInput, invoice_workflow_id
from workflows.invoice import InvoiceWorkflow

CHECK = "/api/v1/billing/check"
INVOICES = "/api/v1/billing/invoices"
ENTITLED = "/api/v1/entitled"


async def debit(api: httpx.AsyncClient, account: str, credits: int, key: str) -> None:
    resp = await api.post("/api/v1/billing/wallet/credit", json={
        "account_id": account, "amount": -credits, "reason": "test", "idempotency_key": key})
    assert resp.status_code in (200, 201), resp.text


async def checked(api: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await api.post(path, json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


# --- a check without a value asks for one unit ------------------------------------------------------------------


async def test_check_and_entitled_without_value_ask_for_one_unit(api: httpx.AsyncClient,
                                                                 pool: AsyncConnectionPool) -> None:
    account = await new_account(api, external_id="user-1")
    await debit(api, account, 4995, "d-1")  # 5 credits left: one chat message (1) yes, one voice minute (10) no
    voice = await checked(api, CHECK, {"account_id": account, "feature_id": "voice_minute"})
    assert (voice["allowed"], voice["code"]) == (False, "insufficient_credits")
    chat = await checked(api, CHECK, {"account_id": account, "feature_id": "chat_message"})
    assert (chat["allowed"], chat["code"]) == (True, "ok")
    no = await checked(api, ENTITLED, {"customer_id": "user-1", "feature_id": "voice_minute"})
    assert no == {"customer_id": "user-1", "feature_id": "voice_minute", "code": "insufficient_credits",
                  "allowed": False, "balances": [{"feature_id": "credits", "unlimited": False, "balance": 5}]}
    yes = await checked(api, ENTITLED, {"customer_id": "user-1", "feature_id": "chat_message"})
    assert (yes["allowed"], yes["code"]) == (True, "feature_found")
    # Exactly one unit affordable is allowed; the same with an explicit value of 1.
    await debit(api, account, 4, "d-2")
    assert (await checked(api, CHECK, {"account_id": account, "feature_id": "chat_message"}))["allowed"] is True
    assert (await checked(api, CHECK, {"account_id": account, "feature_id": "chat_message", "value": 1}))[
        "allowed"] is True

    # Spend control sees one unit too: an agent limit with 5 of 10 credits left stops a minute (10), not a message.
    other = await new_account(api)
    resp = await api.post("/api/v1/agents", json={"account_id": other, "id": "bot", "monthly_limit": 10})
    assert resp.status_code == 201, resp.text
    assert (await track(api, other, "chat_message", 5, "c-1", agent_id="bot")).status_code == 200
    minute = await checked(api, CHECK, {"account_id": other, "feature_id": "voice_minute", "agent_id": "bot"})
    assert (minute["allowed"], minute["code"]) == (False, "agent_limit_reached")
    message = await checked(api, CHECK, {"account_id": other, "feature_id": "chat_message", "agent_id": "bot"})
    assert (message["allowed"], message["code"]) == (True, "ok")


# --- the console's credit balance figures -------------------------------------------------------------------------


async def test_balance_reports_total_usage_and_remaining_for_the_period(api: httpx.AsyncClient,
                                                                       pool: AsyncConnectionPool) -> None:
    from tests.support.plans import subscribe

    # Wallet-only: the calendar month (UTC). 5,000 welcome + 300 granted by hand; 245 + 10 used; a debit is no usage.
    account = await new_account(api)
    grant = await api.post("/api/v1/billing/wallet/credit", json={
        "account_id": account, "amount": 300, "reason": "goodwill", "idempotency_key": "g-1"})
    assert grant.status_code in (200, 201), grant.text
    await debit(api, account, 5, "d-1")
    assert (await track(api, account, "llm_tokens", 2450, "t-1")).status_code == 200
    assert (await track(api, account, "voice_minute", 1, "t-2")).status_code == 200
    got = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()
    now = datetime.now(UTC)
    month = datetime(now.year, now.month, 1, tzinfo=UTC)
    following = (month + timedelta(days=32)).replace(day=1)
    assert {k: got[k] for k in ("total_credits", "usage_this_period", "remaining_credits", "balance",
                                "period_start", "period_end")} == {
        "total_credits": 5300, "usage_this_period": 255, "remaining_credits": 5040, "balance": 5040,
        "period_start": month.isoformat().replace("+00:00", "Z"),
        "period_end": following.isoformat().replace("+00:00", "Z")}
    # Usage of an earlier month is not this period's; nor are the credits granted then.
    async with pool.connection() as conn, conn.transaction():  # the simulator's clock, for this transaction only
        await conn.execute("SELECT set_config('creditflow.now', %s, true)", ((month - timedelta(days=3)).isoformat(),))
        await conn.execute("SELECT * FROM cf_track(%s, 'chat_message', 7, NULL, 'old-1', NULL, NULL)", (account,))
    again = (await api.get("/api/v1/billing/balance", params={"account_id": account})).json()
    assert (again["total_credits"], again["usage_this_period"], again["balance"]) == (5300, 255, 5033)
    assert again["wallet_balance"] is None  # no plan: the balance is the wallet

    # A plan account: the billing period, plan credits granted in it count as granted.
    planned = await new_account(api)
    period = await subscribe(pool, planned, credits=100)
    assert (await track(api, planned, "voice_minute", 2, "p-1")).status_code == 200  # Growth: 8 a minute
    got = (await api.get("/api/v1/billing/balance", params={"account_id": planned})).json()
    assert {k: got[k] for k in ("total_credits", "usage_this_period", "remaining_credits", "plan_credits_remaining",
                                "wallet_balance", "period_start", "period_end")} == {
        "total_credits": 5100, "usage_this_period": 16, "remaining_credits": 5084, "plan_credits_remaining": 84,
        "wallet_balance": 5000,  # seed 001: the wallet beside the plan's credits
        "period_start": period.start.isoformat().replace("+00:00", "Z"),
        "period_end": period.end.isoformat().replace("+00:00", "Z")}


# --- pay a past-due invoice now; a new card retries; the credit balance --------------------------------------------


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1, topup_poll_interval_seconds=0.3)


@pytest.fixture
async def wf_api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(temporal_settings):
        yield client


@pytest.mark.temporal
async def test_pay_a_past_due_invoice_now_once_with_the_chosen_card(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, temporal_client: Client,
        temporal_settings: Settings) -> None:
    api = wf_api
    account = await new_account(api)
    await save_card(api, sdk, account, DECLINED_AT_CHARGE)
    invoice = await past_due_invoice(api, temporal_client, temporal_settings, account)
    path = f"{INVOICES}/{invoice}/pay"
    # The default card is still declined: the attempt is recorded and the decline answered.
    declined = await api.post(path, json={"account_id": account})
    assert (declined.status_code, declined.json()["error"]["code"]) == (402, "card_declined")
    # Another account's card, or one that is not a card of this account: unknown, nothing charged.
    other = await api.post(path, json={"account_id": account, "payment_method_id": new_card(sdk)})
    assert (other.status_code, other.json()["error"]["code"]) == (404, "unknown_payment_method")
    good = await api.post(CARDS, json={"account_id": account, "payment_method_id": new_card(sdk),
                                       "set_default": False})
    assert good.status_code == 201, good.text
    # Adding a card retried the past-due invoice with it (no request needed), once.
    paid = await eventually(lambda: api.get(f"{INVOICES}/{invoice}", params={"account_id": account}),
                            lambda r: r.json()["status"] == "paid", timeout=30)
    assert paid.json()["attempts"] == 3
    [pi] = await succeeded_intents(sdk, pool, account)
    assert (pi.amount, pi.payment_method, paid.json()["payment_intent_id"]) == (4900, good.json()["id"], pi.id)
    # Paying again: the paid invoice as it is, no second PaymentIntent.
    again = await api.post(path, json={"account_id": account, "payment_method_id": good.json()["id"]})
    assert (again.status_code, again.json()["status"], again.json()["attempts"]) == (200, "paid", 3)
    assert len(await succeeded_intents(sdk, pool, account)) == 1
    listed = (await api.get(INVOICES, params={"account_id": account})).json()
    assert listed["payments_due"] == {"count": 0, "amount_usd": 0}
    # The run that paid it (started again by the new card) replays, and is kept for the replay tests.
    workflow_id = invoice_workflow_id(account, paid.json()["period_start"][:10])
    await eventually(lambda: temporal_client.get_workflow_handle(workflow_id).describe(),
                     lambda d: d.status == WorkflowExecutionStatus.COMPLETED, timeout=30)
    await record_and_replay(temporal_client, workflow_id, "invoice_v2_paid_now")


@pytest.mark.temporal
async def test_pay_now_with_a_chosen_card_and_without_any(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, temporal_client: Client,
        temporal_settings: Settings) -> None:
    api = wf_api
    account = await new_account(api)
    invoice = await past_due_invoice(api, temporal_client, temporal_settings, account)  # no card at all
    path = f"{INVOICES}/{invoice}/pay"
    none = await api.post(path, json={"account_id": account})
    assert (none.status_code, none.json()["error"]["code"]) == (402, "no_payment_method")
    await save_card(api, sdk, account, DECLINED_AT_CHARGE)  # the default; retried at once, declined
    chosen = await api.post(CARDS, json={"account_id": account, "payment_method_id": new_card(sdk),
                                         "set_default": False})
    await eventually(lambda: api.get(f"{INVOICES}/{invoice}", params={"account_id": account}),
                     lambda r: r.json()["status"] == "paid", timeout=30)
    [pi] = await succeeded_intents(sdk, pool, account)
    assert pi.payment_method == chosen.json()["id"]
    unknown = await api.post(f"{INVOICES}/inv_{'0' * 32}/pay", json={"account_id": account})
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_invoice")


@pytest.mark.temporal
async def test_invoices_show_the_credit_balance_they_add_and_apply(
        wf_api: httpx.AsyncClient, temporal_client: Client, temporal_settings: Settings) -> None:
    api = wf_api
    account = await new_account(api)
    now = datetime.now(UTC).replace(microsecond=0)
    # A period whose lines come to -$60 (a downgrade's proration credit): nothing due, $60 carried; the next period's
    # Starter fee ($49) applies $49 of it ("Applied credit balance"), leaving $11.
    for n, extra in enumerate(({"adjustments": [InvoiceAdjustmentLine(description="Proration credit",
                                                                      amount_cents=-6000)]},
                               {"plan_id": "starter"})):
        input = InvoiceWorkflowInput(account_id=account, period_start=now + timedelta(days=n),
                                     period_end=now + timedelta(days=n, hours=1), charge=False, **extra)
        await asyncio.wait_for(temporal_client.execute_workflow(
            InvoiceWorkflow.run, input, id=invoice_workflow_id(account, input.key()),
            task_queue=temporal_settings.temporal_task_queue), 60)
    listed = (await api.get(INVOICES, params={"account_id": account})).json()
    assert listed["credit_balance_usd"] == 11
    assert [(i["amount_usd"], i["credit_added_usd"], i["credit_applied_usd"]) for i in listed["items"]] == [
        (0, 0, 49), (0, 60, 0)]
    newest = (await api.get(f"{INVOICES}/{listed['items'][0]['id']}", params={"account_id": account})).json()
    assert [(line["description"], line["amount_usd"]) for line in newest["lines"]][-1] == (
        "Applied credit balance", -49)


@pytest.mark.temporal
async def test_a_card_saved_pays_a_closed_past_due_invoice_without_creditflows_search_attributes(
        ts_env: WorkflowEnvironment, pool: AsyncConnectionPool, sdk: stripe.StripeClient,  # noqa: F811
        settings: Settings) -> None:
    """With ``CREDITFLOW_TEMPORAL_SEARCH_ATTRIBUTES=false`` (a cluster without creditflow's attributes; here the
    time-skipping server, which has none), the run a new card starts for a past-due invoice whose workflow ended
    upserted them anyway: its first task failed (BadSearchAttributes) and every retry timed out, so the invoice
    stayed past due. Found by the money model test's ``card_works_again`` rule (issue 11)."""
    settings = settings.model_copy(update={
        "temporal_address": ts_env.client.service_client.config.target_host, "temporal_search_attributes": False,
        "temporal_task_queue": f"no-attributes-{uuid.uuid4().hex[:8]}"})
    async with build_worker(ts_env.client, pool, settings):
        async for api in app_client(settings):
            account = await new_account(api)
            await save_card(api, sdk, account, DECLINED_AT_CHARGE)
            now = datetime.now(UTC).replace(microsecond=0)
            input = InvoiceWorkflowInput(account_id=account, period_start=now - timedelta(hours=1),
                                         period_end=now + timedelta(hours=1), plan_id="starter", charge_attempts=1,
                                         publish_search_attributes=False)
            outcome = await asyncio.wait_for(ts_env.client.execute_workflow(
                InvoiceWorkflow.run, input, id=invoice_workflow_id(account, input.key()),
                task_queue=settings.temporal_task_queue), 60)
            assert (outcome.status, outcome.attempts) == ("past_due", 1)
            good = await api.post(CARDS, json={"account_id": account, "payment_method_id": new_card(sdk),
                                               "set_default": True})
            assert good.status_code == 201, good.text
            paid = await eventually(partial(api.get, f"{INVOICES}/{outcome.invoice_id}",
                                            params={"account_id": account}),
                                    lambda r: r.json()["status"] == "paid", timeout=40)
            assert (paid.json()["status"], paid.json()["attempts"]) == ("paid", 2), paid.text
            [pi] = await succeeded_intents(sdk, pool, account)
            assert (pi.amount, pi.payment_method) == (4900, good.json()["id"])
