"""Stripe webhook events: verify, store each event id once, route to the workflow that owns the payment.

Why it is safe to act on a webhook at all: the event only *wakes* the top-up's workflow (signal
``payment_event``); the workflow re-reads the PaymentIntent from Stripe and credits only what Stripe says
succeeded, once (ledger key ``sys:topup:{payment_intent_id}``). A forged-but-signed, replayed or
out-of-order event therefore cannot credit anything by itself.

Exactly once per event id (``stripe_events``, migration 0005):

1. the row is inserted with ON CONFLICT DO NOTHING (committed at once, payload kept as evidence);
2. in one transaction the row is locked (SELECT ... FOR UPDATE): already processed means duplicate (200, no
   effect); otherwise it is routed and marked processed with its outcome in the same transaction.
   Concurrent deliveries of one event wait on the lock and then see it processed.
3. If routing fails (Temporal unreachable) the transaction rolls back: the row stays unprocessed
   (``processed_at`` NULL, ``last_error`` set), the API answers 503 and Stripe's redelivery processes it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import stripe
from psycopg import errors as pg_errors
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.errors import CreditflowError
from creditflow.payments import clawbacks, refunds
from creditflow.payments.topups import CHARGE_METADATA_KEY, KIND_AUTO_RECHARGE, KIND_INVOICE, PAYMENT_SUCCEEDED_LATE
from workflows.contract import PaymentEvent

log = logging.getLogger(__name__)

# The Stripe SDK's default: a signature older than this (replay) is refused.
DEFAULT_TOLERANCE_SECONDS = stripe.Webhook.DEFAULT_TOLERANCE

PAYMENT_INTENT_EVENTS = frozenset({"payment_intent.succeeded", "payment_intent.payment_failed",
                                   "payment_intent.canceled"})
# Routed to the account workflow through the outbox (credits taken back for refunds made on Stripe, disputes).
LATER_EVENTS = frozenset({"charge.refunded", "charge.dispute.created", "charge.dispute.closed"})
# A Refund object whose status changed: applied to creditflow's refund row in the event's transaction (a pending
# refund finalized, or its reserved credits released once when it failed). Refunds made elsewhere are ignored.
REFUND_EVENTS = frozenset({"charge.refund.updated", "refund.updated", "refund.failed"})

OUTCOME_SIGNALED = "signaled"
OUTCOME_WORKFLOW_CLOSED = "workflow_closed"
OUTCOME_IGNORED = "ignored"
OUTCOME_RECORDED = "recorded"
OUTCOME_ROUTED = "routed"  # written to the outbox for the account workflow

_EVENT_ID = re.compile(r"^evt_[A-Za-z0-9_]{1,250}$")
_CHARGE_ID = re.compile(r"^chg_[0-9a-f]{32}$")
# How long a delivery waits for a concurrent delivery of the same event to finish before giving up (503).
_LOCK_TIMEOUT = "30s"

# (account_id, request_id, event) -> False if the top-up's workflow is no longer running.
Signal = Callable[[str, str, PaymentEvent], Awaitable[bool]]
# (account_id, request_id) of a refund whose row a Stripe event just decided: wakes its RefundWorkflow.
WakeRefund = Callable[[str, str], Awaitable[bool]]


class StripeEvent(BaseModel):
    """A verified Stripe event: what routing needs, and the whole payload to store."""

    id: str
    type: str
    created: int
    object: dict[str, Any]
    payload: dict[str, Any]


class WebhookResult(BaseModel):
    event_id: str
    type: str
    duplicate: bool
    outcome: str | None = None
    charge_id: str | None = None


def _invalid_payload(message: str) -> CreditflowError:
    return CreditflowError("webhook_payload_invalid", message)


def verify_event(body: bytes, signature: str | None, secret: str,
                 tolerance: int = DEFAULT_TOLERANCE_SECONDS) -> StripeEvent:
    """Check the ``Stripe-Signature`` header (the official SDK: HMAC-SHA256 of ``{t}.{body}`` with the
    endpoint's secret, ``t`` within ``tolerance`` seconds) and parse the event. Refusals are
    ``webhook_signature_missing`` / ``webhook_signature_invalid`` / ``webhook_payload_invalid`` (400)."""
    if not signature:
        raise CreditflowError("webhook_signature_missing", "the Stripe-Signature header is missing")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid_payload("the body is not UTF-8") from None
    try:
        stripe.WebhookSignature.verify_header(text, signature, secret, tolerance)
    except stripe.SignatureVerificationError as exc:
        raise CreditflowError("webhook_signature_invalid", "the Stripe signature does not verify",
                              details={"reason": str(exc).split(" (")[0]}) from None
    try:
        payload = json.loads(text)
    except ValueError:
        raise _invalid_payload("the body is not JSON") from None
    if not isinstance(payload, dict) or payload.get("object") != "event":
        raise _invalid_payload("the body is not a Stripe event")
    event_id, type_, created = payload.get("id"), payload.get("type"), payload.get("created")
    data = payload.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not (isinstance(event_id, str) and _EVENT_ID.match(event_id) and isinstance(type_, str) and type_
            and len(type_) <= 200 and type(created) is int and created > 0 and isinstance(obj, dict)):
        raise _invalid_payload("the event lacks a valid id, type, created or data.object")
    if "\\u0000" in text:  # valid JSON that PostgreSQL's jsonb cannot hold
        raise _invalid_payload("the event contains NUL characters")
    return StripeEvent(id=event_id, type=type_, created=created, object=obj, payload=payload)


async def _charge_for(conn: Any, payment_intent_id: str | None, metadata: object) -> dict[str, Any] | None:
    """The ``stripe_charges`` row of a PaymentIntent: by its recorded id, else by the charge id creditflow
    put in its metadata (an event can arrive before the PaymentIntent id is committed on the row)."""
    if isinstance(payment_intent_id, str) and payment_intent_id:
        row = await (await conn.execute(
            "SELECT id, account_id, request_id, kind, payment_intent_id, status FROM stripe_charges"
            " WHERE payment_intent_id = %s", (payment_intent_id,))).fetchone()
        if row is not None:
            return row
    charge_id = metadata.get(CHARGE_METADATA_KEY) if isinstance(metadata, dict) else None
    if isinstance(charge_id, str) and _CHARGE_ID.match(charge_id):
        row = await (await conn.execute(
            "SELECT id, account_id, request_id, kind, payment_intent_id, status FROM stripe_charges WHERE id = %s",
            (charge_id,))).fetchone()
        if row is not None and row["payment_intent_id"] not in (None, payment_intent_id):
            # The known gap of payments/topups.py (a PaymentIntent created twice): reconcile by hand.
            log.error("PaymentIntent %s names charge %s, which records PaymentIntent %s",
                      payment_intent_id, charge_id, row["payment_intent_id"])
        return row
    return None


async def _route(conn: Any, event: StripeEvent, signal: Signal,
                 decided: list[tuple[str, str]]) -> tuple[str, str | None]:
    """What to do with a new event: (outcome, charge id). ``decided`` collects the refunds (account, request id)
    whose workflow to wake once this transaction has committed."""
    obj = event.object
    if event.type in PAYMENT_INTENT_EVENTS:
        charge = await _charge_for(conn, obj.get("id"), obj.get("metadata"))
        if charge is None:
            log.info("stripe event %s (%s): PaymentIntent %s is not a creditflow top-up; ignored",
                     event.id, event.type, obj.get("id"))
            return OUTCOME_IGNORED, None
        late = event.type == "payment_intent.succeeded" and charge["status"] != "succeeded"
        if charge["kind"] in (KIND_AUTO_RECHARGE, KIND_INVOICE):
            # Charged off-session: its AutoRechargeWorkflow / InvoiceWorkflow read the outcome synchronously; a
            # success it did not see (it gave up on an unclear outcome) takes the late path below.
            if not late:
                return OUTCOME_RECORDED, charge["id"]
        else:
            running = await signal(charge["account_id"], charge["request_id"],
                                   PaymentEvent(payment_intent_id=obj.get("id"), event_type=event.type))
            if running or not late:
                if not running:
                    log.info("stripe event %s (%s): the workflow of charge %s has finished (charge %s)",
                             event.id, event.type, charge["id"], charge["status"])
                return (OUTCOME_SIGNALED if running else OUTCOME_WORKFLOW_CLOSED), charge["id"]
        # The payment went through after its workflow recorded failure or gave up (Stripe unreachable for the whole
        # retry budget, still processing when the payment window closed): one late path for every kind
        # (creditflow/payments/late.py), through the outbox to the account workflow, which checks it with Stripe and
        # credits (or settles the invoice) once, with the normal path's ledger key.
        await conn.execute(
            "INSERT INTO outbox (account_id, kind, dedup_key, payload) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (dedup_key) DO NOTHING",
            (charge["account_id"], PAYMENT_SUCCEEDED_LATE, f"stripe:{event.id}",
             Jsonb({"charge_id": charge["id"], "payment_intent_id": obj.get("id")})))
        return OUTCOME_ROUTED, charge["id"]
    if event.type in LATER_EVENTS:
        # charge.refunded carries a Charge, charge.dispute.created a Dispute; both name the PaymentIntent. The
        # account workflow takes the credits back (creditflow/payments/clawbacks.py): an outbox row written in
        # this transaction, so the event is processed exactly when it is routed.
        charge = await _charge_for(conn, obj.get("payment_intent"), obj.get("metadata"))
        if charge is None:
            log.info("stripe event %s (%s): PaymentIntent %s is not a creditflow charge; ignored",
                     event.id, event.type, obj.get("payment_intent"))
            return OUTCOME_IGNORED, None
        await conn.execute(
            "INSERT INTO outbox (account_id, kind, dedup_key, payload) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (dedup_key) DO NOTHING",
            (charge["account_id"], clawbacks.EVENT_KINDS[event.type], f"stripe:{event.id}",
             Jsonb(clawbacks.outbox_payload(event.type, obj))))
        return OUTCOME_ROUTED, charge["id"]
    if event.type in REFUND_EVENTS:
        record = await refunds.apply_stripe_event(conn, obj)
        if record is None:
            # A refund made on Stripe directly whose credits were taken back: if it failed, they come back once.
            restored = await clawbacks.restore_failed_refund(conn, obj)
            if restored is not None:
                return OUTCOME_RECORDED, restored
            log.info("stripe event %s (%s): refund %s is not a creditflow refund; ignored", event.id, event.type,
                     obj.get("id"))
            return OUTCOME_IGNORED, None
        log.info("stripe event %s (%s): refund %s is %s", event.id, event.type, record.id, record.status)
        decided.append((record.account_id, record.request_id))
        return OUTCOME_RECORDED, record.charge_id
    return OUTCOME_IGNORED, None


async def receive(pool: AsyncConnectionPool, event: StripeEvent, signal: Signal,
                  wake_refund: WakeRefund | None = None) -> WebhookResult:
    """Store the event once and process it once (see the module docstring). A failure while routing
    (``workflow_unavailable``) is raised with the event left unprocessed, so a redelivery processes it.

    A refund event decides the refund row in the event's transaction; its RefundWorkflow is woken after the commit
    (``wake_refund``, best effort: the workflow also polls, so a failure here is only logged)."""
    decided: list[tuple[str, str]] = []
    async with pool.connection() as conn:
        await conn.execute(
            "INSERT INTO stripe_events (id, type, created, payload) VALUES (%s, %s, to_timestamp(%s), %s)"
            " ON CONFLICT (id) DO NOTHING", (event.id, event.type, event.created, Jsonb(event.payload)))
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'")
                try:
                    row = await (await conn.execute(
                        "SELECT processed_at, outcome, charge_id FROM stripe_events WHERE id = %s FOR UPDATE",
                        (event.id,))).fetchone()
                except pg_errors.LockNotAvailable:
                    raise CreditflowError("webhook_in_progress", "another delivery of this event is still being "
                                          "processed; try again later") from None
                assert row is not None
                if row["processed_at"] is not None:
                    return WebhookResult(event_id=event.id, type=event.type, duplicate=True,
                                         outcome=row["outcome"], charge_id=row["charge_id"])
                outcome, charge_id = await _route(conn, event, signal, decided)
                await conn.execute(
                    "UPDATE stripe_events SET processed_at = now(), outcome = %s, charge_id = %s,"
                    " attempts = attempts + 1, last_error = NULL WHERE id = %s", (outcome, charge_id, event.id))
        except Exception as exc:
            reason = exc.code if isinstance(exc, CreditflowError) else type(exc).__name__
            try:
                await conn.execute("UPDATE stripe_events SET attempts = attempts + 1, last_error = %s"
                                   " WHERE id = %s AND processed_at IS NULL", (reason, event.id))
            except Exception:  # the original failure is what matters
                log.exception("could not record the failure of stripe event %s", event.id)
            log.warning("stripe event %s (%s) not processed: %s; Stripe will redeliver it", event.id, event.type,
                        reason)
            raise
    log.info("stripe event %s (%s): %s", event.id, event.type, outcome)
    for account_id, request_id in decided if wake_refund is not None else []:
        try:
            await wake_refund(account_id, request_id)
        except Exception as exc:  # the ledger effect is committed; the workflow's poll reads it later
            log.warning("stripe event %s: could not wake refund workflow %s/%s (%s)", event.id, account_id,
                        request_id, exc)
    return WebhookResult(event_id=event.id, type=event.type, duplicate=False, outcome=outcome, charge_id=charge_id)
