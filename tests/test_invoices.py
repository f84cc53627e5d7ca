"""Invoices end to end: the billing profile API, ``InvoiceWorkflow`` on the real Temporal dev server (production
worker), real localstripe, real PostgreSQL and a real SMTP server (aiosmtpd). No mocks.

The paid-invoice test builds a period with usage on two channels, a top-up, a subscription fee, a phone-number
rental and overage drawn on the credit line, then checks the exact totals, that the invoice is stored and charged
once (even when the workflow runs twice and the activity is repeated), the PDF's text through the API, the
email with the PDF attached, the overage restored to the wallet, and records the history for the replay test.
"""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import stripe
from psycopg_pool import AsyncConnectionPool
from pypdf import PdfReader
from temporalio.client import Client

from creditflow.config import Settings
from creditflow.domain.money import MICROS_PER_CREDIT
from creditflow.invoicing import store
from creditflow.invoicing.store import InvoiceRequest
from tests.conftest import ledger_snapshot
from tests.receivers import SmtpServer
from tests.support.api import balance, bearer, key_for, new_account, track
from tests.support.invoices import (  # noqa: F401 - fixtures
    assert_run,
    invoice_charges,
    period_around_now,
    rows,
    run_invoice,
    settings,
    smtp,
    start,
    wf_api,
    workflow_input,
)
from tests.support.ledger import assert_invariants
from tests.support.payments import DECLINED_AT_CHARGE, TOPUP, customer_of, intents_of, save_card
from tests.support.temporal import eventually, record_and_replay
from workflows.contract import InvoiceChargeLine, invoice_workflow_id
from workflows.invoice import InvoiceWorkflow

BILLING = "/api/v1/billing"
ADDRESS = f"{BILLING}/invoice-address"
EMAIL = f"{BILLING}/billing-email"
TAXES = f"{BILLING}/tax-registrations"
INVOICES = f"{BILLING}/invoices"
BILLING_EMAIL = "ap@mueller.example"
PHONE_RENTAL = InvoiceChargeLine(description="Phone number rental", quantity=3, unit="number",
                                 unit_price_credits=150)  # type: ignore[arg-type]


# --- helpers ----------------------------------------------------------------------------------------


async def billing_profile(api: httpx.AsyncClient, account: str) -> None:
    """The seed's Invoice Address, Invoice Notifications and Tax Settings pages, filled in."""
    resp = await api.put(ADDRESS, json={"account_id": account, "company": "Müller & Söhne GmbH",
                                        "address_line1": "Hauptstraße 5", "address_line2": "3. OG", "city": "Berlin",
                                        "postal_code": "10115", "region": "Berlin", "country": "DE",
                                        "po_number": "PO-7781"})
    assert resp.status_code == 200, resp.text
    assert (await api.put(EMAIL, json={"account_id": account, "billing_email": BILLING_EMAIL})).status_code == 200
    resp = await api.post(TAXES, json={"account_id": account, "country": "DE", "description": "European VAT number",
                                      "value": "DE123456789", "status": "verified"})
    assert resp.status_code == 201, resp.text


def invoice_emails(smtp: SmtpServer) -> list[Any]:  # noqa: F811
    """The invoice emails received (a top-up in the test sends its own receipt)."""
    return [m for m in smtp.messages if str(m[2]["X-Creditflow-Event"]).startswith("invoice.")]


def pdf_lines(pdf: bytes) -> list[str]:
    reader = PdfReader(io.BytesIO(pdf))
    return [line.strip() for page in reader.pages for line in page.extract_text().splitlines() if line.strip()]


# --- billing profile API ------------------------------------------------------------------------------


async def test_profile_endpoints_and_scopes(api: httpx.AsyncClient) -> None:
    account = await new_account(api)
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    reader = bearer(await key_for(api, account, "billing:read"))
    empty = await api.get(ADDRESS, headers=reader)
    assert empty.status_code == 200
    assert empty.json() == {"account_id": account, "company": "", "address_line1": "", "address_line2": "",
                            "city": "", "postal_code": "", "region": "", "country": None, "po_number": "",
                            "updated_at": None}

    resp = await api.put(ADDRESS, headers=writer, json={"company": "  Acme Ltd ", "city": "London",
                                                        "country": "GB", "postal_code": "EC1A 1BB"})
    assert resp.status_code == 200, resp.text
    assert {k: resp.json()[k] for k in ("company", "city", "country", "postal_code", "po_number")} == {
        "company": "Acme Ltd", "city": "London", "country": "GB", "postal_code": "EC1A 1BB", "po_number": ""}
    partial = await api.put(ADDRESS, headers=writer, json={"po_number": "PO-1", "city": None})
    assert {k: partial.json()[k] for k in ("company", "city", "po_number")} == {
        "company": "Acme Ltd", "city": "", "po_number": "PO-1"}

    assert (await api.get(EMAIL, headers=reader)).json() == {"account_id": account,
                                                             "billing_email": "billing@acme.test"}
    changed = await api.put(EMAIL, headers=writer, json={"billing_email": "ap@acme.test"})
    assert changed.json() == {"account_id": account, "billing_email": "ap@acme.test"}
    channels = await api.get(f"{BILLING}/notification-channels", headers=reader)
    assert channels.json()["effective_email"] == "ap@acme.test"  # notifications follow the billing email

    # A customer adds registrations as unverified; setting a status is for operators.
    vat = await api.post(TAXES, headers=writer, json={"country": "GB", "description": "UK VAT number",
                                                      "value": "GB987654321"})
    assert vat.status_code == 201, vat.text
    body = vat.json()
    assert body["id"].startswith("txr_") and (body["status"], body["country"]) == ("unverified", "GB")
    again = await api.post(TAXES, headers=writer, json={"country": "GB", "description": "UK VAT number",
                                                        "value": "GB987654321"})
    assert (again.status_code, again.json()["id"]) == (200, body["id"])
    refused = await api.post(TAXES, headers=writer, json={"country": "DE", "description": "European VAT number",
                                                          "value": "DE1", "status": "verified"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "forbidden")
    verified = await api.patch(f"{TAXES}/{body['id']}", json={"account_id": account, "status": "verified"})
    assert (verified.status_code, verified.json()["status"]) == (200, "verified")
    assert (await api.patch(f"{TAXES}/{body['id']}", headers=writer,
                            json={"account_id": account, "status": "unverified"})).status_code == 403
    eu = await api.post(TAXES, json={"account_id": account, "country": "DE", "description": "European VAT number",
                                     "value": "DE123456789", "status": "verified"})
    assert eu.status_code == 201 and eu.json()["status"] == "verified"

    profile = (await api.get(f"{BILLING}/profile", headers=reader)).json()
    assert profile["billing_email"] == "ap@acme.test" and profile["invoice_address"]["company"] == "Acme Ltd"
    assert [(t["country"], t["value"], t["status"]) for t in profile["tax_registrations"]] == [
        ("GB", "GB987654321", "verified"), ("DE", "DE123456789", "verified")]

    deleted = await api.delete(f"{TAXES}/{body['id']}", headers=writer)
    assert deleted.json() == {"id": body["id"], "deleted": True}
    assert [t["value"] for t in (await api.get(TAXES, headers=reader)).json()["items"]] == ["DE123456789"]
    gone = await api.delete(f"{TAXES}/{body['id']}", headers=writer)
    assert (gone.status_code, gone.json()["error"]["code"]) == (404, "unknown_tax_registration")


async def test_profile_bad_input_and_other_tenants_change_nothing(api: httpx.AsyncClient, database_url: str,
                                                                  pool: AsyncConnectionPool) -> None:
    account, other = await new_account(api), await new_account(api)
    writer = bearer(await key_for(api, account, "billing:write", "usage:write", "payments:write"))
    reader = bearer(await key_for(api, account, "billing:read"))
    others_reg = (await api.post(TAXES, json={"account_id": other, "country": "FR", "description": "VAT",
                                              "value": "FR1"})).json()["id"]
    await api.put(ADDRESS, headers=writer, json={"company": "Acme", "country": "US"})

    async def state() -> tuple[object, ...]:
        return (await ledger_snapshot(database_url),
                await rows(pool, "SELECT * FROM billing_profiles ORDER BY account_id"),
                await rows(pool, "SELECT * FROM tax_registrations ORDER BY id"),
                await rows(pool, "SELECT id, billing_email FROM accounts ORDER BY id"))

    before = await state()
    cases: list[tuple[str, str, dict[str, str], dict[str, Any] | None, int, str]] = [
        ("PUT", ADDRESS, writer, {"country": "UK"}, 422, "validation_error"),  # GB is the code
        ("PUT", ADDRESS, writer, {"country": "de"}, 422, "validation_error"),
        ("PUT", ADDRESS, writer, {"company": "Acme\nEvil"}, 422, "validation_error"),
        ("PUT", ADDRESS, writer, {"company": "x" * 201}, 422, "validation_error"),
        ("PUT", ADDRESS, writer, {"postal_code": 10115}, 422, "validation_error"),
        ("PUT", ADDRESS, writer, {"vat": "DE1"}, 422, "validation_error"),
        ("PUT", ADDRESS, writer, {"company": "Other", "account_id": other}, 403, "forbidden"),
        ("PUT", ADDRESS, reader, {"company": "Other"}, 403, "insufficient_scope"),
        ("PUT", ADDRESS, {"Authorization": "Bearer cf_sk_nope"}, {"company": "X"}, 401, "unauthorized"),
        ("PUT", EMAIL, writer, {"billing_email": "not-an-email"}, 422, "validation_error"),
        ("PUT", EMAIL, writer, {}, 422, "validation_error"),
        ("PUT", EMAIL, reader, {"billing_email": "a@b.test"}, 403, "insufficient_scope"),
        ("PUT", EMAIL, writer, {"billing_email": "a@b.test", "account_id": other}, 403, "forbidden"),
        ("POST", TAXES, writer, {"country": "XX", "description": "VAT", "value": "1"}, 422, "validation_error"),
        ("POST", TAXES, writer, {"country": "DE", "description": " ", "value": "1"}, 422, "validation_error"),
        ("POST", TAXES, writer, {"country": "DE", "description": "VAT", "value": ""}, 422, "validation_error"),
        ("POST", TAXES, writer, {"country": "DE", "description": "VAT", "value": "1", "status": "ok"}, 422,
         "validation_error"),
        ("POST", TAXES, writer, {"country": "DE", "description": "VAT", "value": "1", "status": "verified"}, 403,
         "forbidden"),
        ("POST", TAXES, reader, {"country": "DE", "description": "VAT", "value": "1"}, 403, "insufficient_scope"),
        ("DELETE", f"{TAXES}/{others_reg}", writer, None, 404, "unknown_tax_registration"),
        ("DELETE", f"{TAXES}/txr_nope", writer, None, 422, "invalid_id"),
        ("DELETE", f"{TAXES}/{others_reg}", reader, None, 403, "insufficient_scope"),
        ("PATCH", f"{TAXES}/{others_reg}", writer, {"account_id": other, "status": "verified"}, 403,
         "insufficient_scope"),
        ("PATCH", f"{TAXES}/{others_reg}", {}, {"account_id": account, "status": "verified"}, 404,
         "unknown_tax_registration"),
        ("GET", f"{TAXES}?account_id={other}", reader, None, 403, "forbidden"),
        ("GET", f"{BILLING}/profile?account_id={other}", reader, None, 403, "forbidden"),
    ]
    for method, path, headers, body, status, code in cases:
        resp = await api.request(method, path, headers=headers, json=body)
        assert (resp.status_code, resp.json()["error"]["code"]) == (status, code), (method, path, body, resp.text)
    admin_missing = await api.put(ADDRESS, json={"company": "X"})
    assert (admin_missing.status_code, admin_missing.json()["error"]["code"]) == (422, "validation_error")
    unknown = await api.get(ADDRESS, params={"account_id": "acc_" + "0" * 32})
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "unknown_account")
    assert await state() == before


async def test_invoice_api_tenancy_and_bad_ids(api: httpx.AsyncClient, pool: AsyncConnectionPool,
                                               settings: Settings) -> None:  # noqa: F811
    """Invoices stored directly (the workflow is tested below): listing, detail, PDF, tenants, malformed ids."""
    account, other = await new_account(api), await new_account(api)
    begin, end = period_around_now()
    record, created = await store.prepare(
        pool, InvoiceRequest(account_id=account, period_start=begin, period_end=end,
                             period_key=begin.date().isoformat(), plan_id="starter"),
        catalog=settings.plan_catalog(), seller_name="Creditflow Inc.", issued_at=end, due_days=14)
    assert created and record.status == "draft" and record.amount_due_cents == 4900
    reader = bearer(await key_for(api, account, "billing:read"))
    others = bearer(await key_for(api, other, "billing:write", "usage:write", "payments:write"))
    assert (await api.get(INVOICES, headers=reader)).json()["items"] == []  # a draft is not issued yet
    await store.mark_open(pool, record.id)
    listed = (await api.get(INVOICES, headers=reader)).json()
    [item] = listed["items"]
    assert (item["status"], item["payment_due"], item["amount_usd"], item["pdf_url"]) == (
        "open", True, 49, f"/api/v1/billing/invoices/{record.id}/pdf")
    assert listed["payments_due"] == {"count": 1, "amount_usd": 49}
    assert (await api.get(INVOICES, headers=reader, params={"status": "paid"})).json()["items"] == []
    detail = (await api.get(f"{INVOICES}/{record.id}", headers=reader)).json()
    assert [(line["description"], line["amount_usd"]) for line in detail["lines"]] == [
        (f"Starter plan, {begin:%Y-%m-%d} to {end:%Y-%m-%d}", 49)]
    admin_list = (await api.get(INVOICES, params={"account_id": account})).json()
    assert admin_list["items"][0]["pdf_url"].endswith(f"?account_id={account}")
    assert (await api.get(admin_list["items"][0]["pdf_url"])).status_code == 200

    for path in (f"{INVOICES}/{record.id}", f"{INVOICES}/{record.id}/pdf"):
        resp = await api.get(path, headers=others)
        assert (resp.status_code, resp.json()["error"]["code"]) == (404, "unknown_invoice")
        resp = await api.get(path, headers=reader, params={"account_id": other})
        assert (resp.status_code, resp.json()["error"]["code"]) == (403, "forbidden")
    assert (await api.get(INVOICES, headers=others)).json()["items"] == []
    for bad in ("inv_123", "acc_" + "0" * 32, "inv_" + "0" * 32):
        resp = await api.get(f"{INVOICES}/{bad}/pdf", headers=reader)
        assert resp.json()["error"]["code"] == ("unknown_invoice" if bad.startswith("inv_" + "0") else "invalid_id")
    bad_status = await api.get(INVOICES, headers=reader, params={"status": "draft"})
    assert (bad_status.status_code, bad_status.json()["error"]["code"]) == (422, "validation_error")
    assert (await api.get(INVOICES, headers={"Authorization": "Bearer cf_sk_x"})).status_code == 401


# --- InvoiceWorkflow ------------------------------------------------------------------------------------


@pytest.mark.temporal
async def test_invoice_paid_charged_once_pdf_and_email(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, temporal_client: Client,  # noqa: F811
        temporal_settings: Settings, smtp: SmtpServer) -> None:  # noqa: F811
    api = wf_api
    account = await new_account(api, overage_credit_line=2000)
    card = await save_card(api, sdk, account)
    await billing_profile(api, account)
    begin, _ = period_around_now()
    # A $10 top-up in the period (informational on the invoice), then usage on two channels past zero:
    # 5,000 welcome + 1,000 bought - 6,000 voice - 1,234 chat = -1,234 drawn on the credit line.
    top_up = await api.post(TOPUP, json={"account_id": account, "amount_usd": 10, "request_id": "t-1"})
    assert top_up.status_code == 200 and top_up.json()["status"] == "succeeded", top_up.text
    assert (await track(api, account, "voice_minute", 600, "call-1")).status_code == 200
    assert (await track(api, account, "chat_message", 1234, "chat-1")).status_code == 200
    assert (await balance(api, account))["balance"] == -1234
    end = datetime.now(UTC) + timedelta(seconds=1)
    await asyncio.sleep(1.1)
    input = workflow_input(account, begin, end, plan_id="growth", recurring_charges=[PHONE_RENTAL],
                           overage_micros=1234 * MICROS_PER_CREDIT)

    outcome = await run_invoice(temporal_client, temporal_settings, input)
    # $199 Growth + 3 x $1.50 numbers + 1,234 credits of overage at $0.01 = $215.84.
    assert (outcome.status, outcome.amount_due_cents, outcome.attempts, outcome.emailed) == ("paid", 21584, 1, True)
    number = f"CF-{account[4:16].upper()}-{begin:%Y%m%d}"
    assert outcome.number == number

    # Charged once: one invoice charge row, one succeeded PaymentIntent for it, the invoice paid with it.
    [charge] = await invoice_charges(pool, account)
    intents = [pi for pi in intents_of(sdk, await customer_of(pool, account))
               if pi.metadata.to_dict().get("creditflow_charge_id") == charge["id"]]
    assert [(pi.status, pi.amount, pi.payment_method) for pi in intents] == [("succeeded", 21584, card)]
    [row] = await rows(pool, "SELECT * FROM invoices WHERE account_id = %s", account)
    assert (row["status"], row["charge_id"], row["payment_intent_id"], row["amount_due_cents"]) == (
        "paid", charge["id"], intents[0].id, 21584)
    assert (charge["status"], charge["request_id"], charge["credits"]) == ("succeeded", row["id"], 0)
    # The overage is restored to the wallet once the invoice is paid: the credit line is whole again.
    [repayment] = await rows(pool, "SELECT * FROM journal WHERE account_id = %s AND type = 'overage_repayment'",
                             account)
    assert repayment["amount_micros"] == 1234 * MICROS_PER_CREDIT
    assert charge["ledger_txn_id"] == row["repayment_txn_id"] == f"txn_{repayment['id'].hex}"
    assert (await balance(api, account))["balance"] == 0

    # Started again with the same id (the first run has closed), and the activity repeated: nothing new.
    again = await run_invoice(temporal_client, temporal_settings, input)
    assert (again.status, again.invoice_id, again.number) == ("paid", outcome.invoice_id, number)
    record, created = await store.prepare(
        pool, InvoiceRequest(account_id=account, period_start=begin, period_end=end, period_key=input.key(),
                             plan_id="growth"), catalog=temporal_settings.plan_catalog(), seller_name="x",
        issued_at=end, due_days=0)
    assert (created, record.id, record.status) == (False, outcome.invoice_id, "paid")
    assert len(await rows(pool, "SELECT id FROM invoices WHERE account_id = %s", account)) == 1
    assert len(await invoice_charges(pool, account)) == 1
    assert len([pi for pi in intents_of(sdk, await customer_of(pool, account)) if pi.amount == 21584]) == 1
    assert len(await rows(pool, "SELECT id FROM journal WHERE type = 'overage_repayment'")) == 1

    # The API: listed in the history (nothing due), the PDF downloads and says it all.
    reader = bearer(await key_for(api, account, "billing:read"))
    listed = (await api.get(INVOICES, headers=reader)).json()
    [item] = listed["items"]
    assert (item["number"], item["status"], item["payment_due"], item["amount_usd"], item["payment_intent_id"]) == (
        number, "paid", False, 215.84, intents[0].id)
    assert listed["payments_due"] == {"count": 0, "amount_usd": 0}
    pdf = await api.get(item["pdf_url"], headers=reader)
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.headers["content-disposition"] == f'attachment; filename="{number}.pdf"'
    lines = pdf_lines(pdf.content)
    assert lines[:2] == ["Invoice", "Creditflow Inc."]
    assert_run(lines, ["Invoice number", number])
    assert_run(lines, ["Bill to", "Müller & Söhne GmbH", "Hauptstraße 5", "3. OG", "10115 Berlin", "Berlin", "DE",
                       "PO number: PO-7781", BILLING_EMAIL])
    assert_run(lines, ["Tax registrations", "European VAT number (DE): DE123456789 [verified]"])
    assert_run(lines, ["1", f"Growth plan, {begin:%Y-%m-%d} to {end:%Y-%m-%d}", "1 month", "$199.00", "$199.00"])
    assert_run(lines, ["2", "Phone number rental", "3 number", "$1.50", "$4.50"])
    assert_run(lines, ["3", "Overage drawn on the credit line", "1,234 credit", "$0.01", "$12.34"])
    assert_run(lines, ["Subtotal", "$215.84", "Total due", "$215.84"])
    assert_run(lines, ["chat", "1,234 message", "1,234"])
    assert_run(lines, ["voice", "600 minute", "6,000"])
    assert "Top-up of $10.00" in " ".join(lines)
    detail = (await api.get(f"{INVOICES}/{item['id']}", headers=reader)).json()
    assert [(u["channel"], u["quantity"], u["credits"]) for u in detail["usage"]] == [
        ("chat", 1234, 1234), ("voice", 600, 6000)]
    assert [t["amount_usd"] for t in detail["top_ups"]] == [10]

    # The email: once, to the billing email, with the very PDF attached.
    [(_, recipients, message)] = invoice_emails(smtp)
    assert recipients == [BILLING_EMAIL]
    assert message["Subject"] == f"Invoice {number}: $215.84, paid"
    [attachment] = list(message.iter_attachments())
    assert (attachment.get_content_type(), attachment.get_filename()) == ("application/pdf", f"{number}.pdf")
    assert attachment.get_content() == pdf.content
    assert "is attached (PDF)" in message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    await assert_invariants(pool)
    await record_and_replay(temporal_client, invoice_workflow_id(account, input.key()), "invoice_v1_paid")


@pytest.mark.temporal
async def test_declined_card_goes_past_due_with_retries_and_notice(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, temporal_client: Client,  # noqa: F811
        temporal_settings: Settings, smtp: SmtpServer) -> None:  # noqa: F811
    api = wf_api
    account = await new_account(api)
    await save_card(api, sdk, account, DECLINED_AT_CHARGE)
    begin, end = period_around_now()
    input = workflow_input(account, begin, end, plan_id="starter", charge_attempts=2, retry_interval_seconds=1)
    outcome = await run_invoice(temporal_client, temporal_settings, input)
    assert (outcome.status, outcome.attempts, outcome.error_code, outcome.amount_due_cents) == (
        "past_due", 2, "card_declined", 4900)
    charges = await invoice_charges(pool, account)
    assert [(c["request_id"], c["status"], c["failure_code"]) for c in charges] == [
        (outcome.invoice_id, "failed", "card_declined"), (f"{outcome.invoice_id}:2", "failed", "card_declined")]
    assert not [pi for pi in intents_of(sdk, await customer_of(pool, account)) if pi.status == "succeeded"]
    [row] = await rows(pool, "SELECT status, attempts, last_error, paid_at FROM invoices WHERE account_id = %s",
                       account)
    assert (row["status"], row["attempts"], row["paid_at"]) == ("past_due", 2, None)
    assert row["last_error"].startswith("card_declined")
    # One past-due notice (not one per attempt), emailed with the PDF; no "paid" email.
    notices = await rows(pool, "SELECT kind, payload FROM notifications_log WHERE account_id = %s AND kind LIKE"
                               " 'invoice.%%'", account)
    assert [(n["kind"], n["payload"]["amount_due_cents"]) for n in notices] == [("invoice.past_due", 4900)]
    [(_, _, message)] = invoice_emails(smtp)
    assert message["Subject"] == f"Invoice {outcome.number} is past due"
    assert [a.get_filename() for a in message.iter_attachments()] == [f"{outcome.number}.pdf"]
    reader = bearer(await key_for(api, account, "billing:read"))
    listed = (await api.get(INVOICES, headers=reader)).json()
    assert listed["payments_due"] == {"count": 1, "amount_usd": 49}
    assert (listed["items"][0]["status"], listed["items"][0]["payment_due"]) == ("past_due", True)
    await record_and_replay(temporal_client, invoice_workflow_id(account, input.key()), "invoice_v1_past_due")


@pytest.mark.temporal
async def test_no_card_then_a_card_and_the_retry_signal_pays(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool, sdk: stripe.StripeClient, temporal_client: Client,  # noqa: F811
        temporal_settings: Settings) -> None:
    api = wf_api
    account = await new_account(api)
    begin, end = period_around_now()
    input = workflow_input(account, begin, end, recurring_charges=[PHONE_RENTAL], charge_attempts=3,
                           retry_interval_seconds=3600)
    handle = await start(temporal_client, temporal_settings, input)
    status = await eventually(lambda: handle.query(InvoiceWorkflow.status),
                              lambda s: s.status == "past_due" and s.next_attempt_at is not None, timeout=30)
    assert (status.error_code, status.attempts) == ("no_payment_method", 1)
    assert await invoice_charges(pool, account) == []  # no card: nothing recorded, nothing charged
    card = await save_card(api, sdk, account)
    await handle.signal(InvoiceWorkflow.retry_payment)
    outcome = await asyncio.wait_for(handle.result(), 30)
    assert (outcome.status, outcome.attempts, outcome.amount_due_cents) == ("paid", 2, 450)
    [charge] = await invoice_charges(pool, account)
    assert (charge["request_id"], charge["status"], charge["payment_method_id"]) == (
        f"{outcome.invoice_id}:2", "succeeded", card)
    [row] = await rows(pool, "SELECT status, attempts, charge_id FROM invoices WHERE account_id = %s", account)
    assert (row["status"], row["attempts"], row["charge_id"]) == ("paid", 2, charge["id"])


@pytest.mark.temporal
async def test_nothing_due_is_paid_without_a_charge(
        wf_api: httpx.AsyncClient, pool: AsyncConnectionPool, temporal_client: Client, temporal_settings: Settings,  # noqa: F811
        smtp: SmtpServer) -> None:  # noqa: F811
    api = wf_api
    account = await new_account(api)
    begin, _ = period_around_now()
    assert (await track(api, account, "llm_tokens", 2455, "tokens-1")).status_code == 200
    end = datetime.now(UTC) + timedelta(seconds=1)
    await asyncio.sleep(1.1)
    outcome = await run_invoice(temporal_client, temporal_settings, workflow_input(account, begin, end))
    assert (outcome.status, outcome.amount_due_cents, outcome.attempts, outcome.charge_id) == ("paid", 0, 0, None)
    assert await invoice_charges(pool, account) == []
    [(_, _, message)] = invoice_emails(smtp)
    assert "Nothing to pay for this period." in message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    [attachment] = list(message.iter_attachments())
    lines = pdf_lines(attachment.get_content())
    assert_run(lines, ["llm", "2,455 token", "245.5"])
    assert_run(lines, ["Subtotal", "$0.00", "Total due", "$0.00"])
