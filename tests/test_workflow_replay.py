"""Determinism of TopUpWorkflow and RefundWorkflow: live runs on the real dev server replay on the current code,
and so do the histories recorded from earlier versions (tests/histories/topup/, tests/histories/refund/).

The recorded files live in subfolders because ``test_account_workflow.test_recorded_histories_replay`` replays
every ``tests/histories/*.json`` with AccountWorkflow only. A live run writes its file when it is missing;
``CREDITFLOW_RECORD_HISTORIES=1`` rewrites them (do that only for a new ``_vN`` after a deliberate change).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from temporalio.client import Client, WorkflowHistory

from creditflow.config import Settings
from tests.conftest import ADMIN_KEY, STRIPE_KEY, new_card
from tests.support.api import app_client, new_account
from tests.support.payments import DECLINED_AT_CHARGE, TOPUP, customer_of, intents_of, save_card
from tests.support.temporal import HISTORIES, record_and_replay, replayer
from workflows.contract import RefundOutcome, TopUpOutcome, refund_workflow_id, topup_workflow_id

pytestmark = pytest.mark.temporal

REFUNDS = "/api/v1/billing/refunds"


@pytest.fixture
def settings(database_url: str, stripe_base: str) -> Settings:
    return Settings(database_url=database_url, admin_api_key=ADMIN_KEY,  # type: ignore[arg-type]
                    welcome_bonus_credits=5000, stripe_api_key=STRIPE_KEY,  # type: ignore[arg-type]
                    stripe_api_base=stripe_base, stripe_retry_max_wait_seconds=0.1,
                    topup_poll_interval_seconds=0.3)


@pytest.fixture
async def api(temporal_settings: Settings, temporal_worker: Any) -> AsyncIterator[httpx.AsyncClient]:
    async for client in app_client(temporal_settings):
        yield client


async def topup_result(client: Client, account: str, request_id: str) -> TopUpOutcome:
    handle = client.get_workflow_handle(topup_workflow_id(account, request_id), result_type=TopUpOutcome)
    return await asyncio.wait_for(handle.result(), 20)


async def test_saved_card_topup_replays(api: httpx.AsyncClient, sdk: stripe.StripeClient,
                                        temporal_client: Client) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": 25, "request_id": "replay-1"})
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
    outcome = await topup_result(temporal_client, account, "replay-1")
    assert (outcome.status, outcome.balance) == ("succeeded", 7500)
    await record_and_replay(temporal_client, topup_workflow_id(account, "replay-1"), "topup_v1_saved_card")


async def test_client_secret_topup_replays(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                           sdk: stripe.StripeClient, temporal_client: Client) -> None:
    account = await new_account(api)
    resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": 10, "request_id": "replay-cs"})
    assert resp.status_code == 200 and resp.json()["status"] == "requires_payment", resp.text
    [pi] = intents_of(sdk, await customer_of(pool, account))
    await asyncio.sleep(1.0)  # let a few polls see it unpaid: they are part of the recorded history
    sdk.v1.payment_intents.update(pi.id, params={"payment_method": new_card(sdk)})
    assert sdk.v1.payment_intents.confirm(pi.id).status == "succeeded"
    outcome = await topup_result(temporal_client, account, "replay-cs")  # found by polling (no signal)
    assert (outcome.status, outcome.payment_intent_id, outcome.balance) == ("succeeded", pi.id, 6000)
    await record_and_replay(temporal_client, topup_workflow_id(account, "replay-cs"), "topup_v1_client_secret")


async def test_declined_topup_replays(api: httpx.AsyncClient, sdk: stripe.StripeClient,
                                      temporal_client: Client) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account, DECLINED_AT_CHARGE)
    resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": 25, "request_id": "replay-dec"})
    assert resp.status_code == 402, resp.text
    outcome = await topup_result(temporal_client, account, "replay-dec")
    assert (outcome.status, outcome.error_code, outcome.transaction_id) == ("failed", "card_declined", None)
    await record_and_replay(temporal_client, topup_workflow_id(account, "replay-dec"), "topup_v1_declined")


async def test_refund_replays(api: httpx.AsyncClient, sdk: stripe.StripeClient, temporal_client: Client) -> None:
    account = await new_account(api)
    await save_card(api, sdk, account)
    resp = await api.post(TOPUP, json={"account_id": account, "amount_usd": 25, "request_id": "replay-r"})
    assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
    refund = await api.post(REFUNDS, json={"account_id": account, "purchase_transaction_id": resp.json()[
        "transaction_id"], "credits": 1000, "request_id": "replay-r1"})
    assert refund.status_code == 200 and refund.json()["status"] == "succeeded", refund.text
    handle = temporal_client.get_workflow_handle(refund_workflow_id(account, "replay-r1"), result_type=RefundOutcome)
    outcome = await asyncio.wait_for(handle.result(), 20)
    assert (outcome.status, outcome.credits) == ("succeeded", 1000)
    await record_and_replay(temporal_client, refund_workflow_id(account, "replay-r1"), "refund_v1_success")


async def test_recorded_topup_and_refund_histories_replay() -> None:
    """Every recorded top-up, refund, auto-recharge and invoice history replays on the current code."""
    files = sorted([*HISTORIES.glob("topup/*.json"), *HISTORIES.glob("refund/*.json"),
                    *HISTORIES.glob("recharge/*.json"), *HISTORIES.glob("invoice/*.json")])
    assert {p.stem for p in files} >= {"topup_v1_saved_card", "topup_v1_client_secret", "topup_v1_declined",
                                        "refund_v1_success", "recharge_v1_succeeded", "recharge_v1_declined",
                                        "invoice_v1_paid", "invoice_v1_past_due"}, files
    for path in files:
        result = await replayer().replay_workflow(WorkflowHistory.from_json(path.stem, path.read_text()))
        assert result.replay_failure is None, (path.name, result.replay_failure)
