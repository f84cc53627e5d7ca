"""Hosted checkout sessions: a link where a customer buys a credit package (or an amount) with a new card.

Why a module of its own, apart from the API and the page: the API creates sessions for platforms, the hosted page
(``creditflow/web/checkout.py``) pays them, and the customer portal sends its "pay with a new card" through the same
page; all three call these functions.

A session fixes what is bought when it is created (cents and credits from the package or the custom amount, within
the top-up rules of ``creditflow.domain.topups``) and where the buyer goes afterwards. Paying it is an ordinary
top-up, nothing new: the page confirms a card with Stripe.js on a SetupIntent of the account's customer, and
``pay`` charges that card through ``TopUpWorkflow`` (the same charge row, the same ledger key, the same lot
pricing). The top-up's request id is derived from the session id (``checkout:{id}``), so a double click or a reload
joins the charge in flight and the credits land once; only after an attempt failed (a declined card) does another
card get a new request id (``checkout:{id}:{n}``), and the failed charge is never repeated.

The session id (``cs_`` + 122 random bits) is the capability of the hosted page; the page's POSTs also carry the
session's CSRF token.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from psycopg_pool import AsyncConnectionPool
from pydantic import BaseModel

from creditflow.client import CreditflowClient
from creditflow.config import Settings
from creditflow.domain.charges import KIND_TOPUP
from creditflow.domain.topups import TopUpError, TopUpPolicy, cents_to_usd, format_usd, quote
from creditflow.errors import CreditflowError
from creditflow.ids import new_id
from creditflow.invoicing import pay_now
from creditflow.ledger.idempotency import request_hash
from creditflow.payments.customers import ensure_customer
from creditflow.payments.gateway import ACCOUNT_METADATA_KEY, SetupIntentState, StripeGateway
from creditflow.payments.methods import PAYMENT_METHOD_ID, attach_method
from workflows.contract import TOPUP_FAILED, TOPUP_REQUIRES_PAYMENT, TOPUP_SUCCEEDED, TopUpInput, TopUpTerms

SESSION_ID = re.compile(r"^cs_[0-9a-f]{32}$")
SETUP_INTENT_ID = re.compile(r"^seti_[A-Za-z0-9_]{1,250}$")
SESSION_METADATA_KEY = "creditflow_checkout_session_id"
MAX_URL_LENGTH = 2048
# Stripe Checkout's placeholder: a success_url holding it gets the session id there instead of ``?session_id=``.
SESSION_ID_PLACEHOLDER = "{CHECKOUT_SESSION_ID}"
SETUP_DESCRIPTION = "Save a card"

OPEN, COMPLETE, EXPIRED = "open", "complete", "expired"
# A payment session buys credits; a setup session only saves the card the buyer confirms (no amount, nothing charged).
PAYMENT, SETUP = "payment", "setup"
# What ``pay`` answers the page (besides errors): go to ``redirect_url``; confirm ``client_secret`` (3-D Secure)
# and pay again; or still deciding: pay again (the same charge is joined).
PAY_COMPLETE, PAY_REQUIRES_ACTION, PAY_PROCESSING = "complete", "requires_action", "processing"


class CheckoutSession(BaseModel):
    """A row of ``checkout_sessions`` with its status as of now (``expired`` is computed, never stored)."""

    id: str
    account_id: str
    status: str
    amount_cents: int
    credits: int
    package_id: str | None
    description: str
    success_url: str
    cancel_url: str
    csrf_token: str
    setup_intent_id: str | None
    setup_intents: int
    charge_request_id: str | None
    charge_attempts: int
    transaction_id: str | None
    created_at: datetime
    expires_at: datetime
    completed_at: datetime | None
    mode: str = PAYMENT
    set_default: bool = False
    payment_method_id: str | None = None

    @property
    def amount_usd(self) -> Decimal:
        return cents_to_usd(self.amount_cents)

    @property
    def price(self) -> str:
        """For people, exact: ``$50.00``."""
        return format_usd(self.amount_cents)

    @property
    def payment_status(self) -> str:
        if self.mode == SETUP:
            return "no_payment_required"  # Stripe Checkout's word for a setup session
        return "paid" if self.status == COMPLETE else "unpaid"

    @property
    def success_redirect(self) -> str:
        """``success_url`` naming this session (``?session_id=cs_...`` appended, or Stripe's placeholder filled)."""
        return with_session_id(self.success_url, self.id)


class PayResult(BaseModel):
    """``pay``'s answer to the page."""

    status: str
    redirect_url: str | None = None
    client_secret: str | None = None
    credits: int | None = None
    transaction_id: str | None = None
    payment_method_id: str | None = None


def validate_return_url(value: object, field: str) -> str:
    """An absolute http(s) URL the buyer's browser may be sent to: at most 2,048 characters, no whitespace, control
    characters (NUL) or backslashes (which browsers read as slashes), a host. Anything else is ``validation_error``
    naming ``field``, so a ``javascript:`` or ``data:`` URL can never reach the page."""
    def refuse(why: str) -> CreditflowError:
        return CreditflowError("validation_error", f"{field} {why}", param=field,
                               details={"problems": [{"field": field, "message": why}]})

    if not isinstance(value, str) or not value:
        raise refuse("must be an absolute http or https URL")
    if len(value) > MAX_URL_LENGTH:
        raise refuse(f"must be at most {MAX_URL_LENGTH} characters")
    if any(ord(c) <= 0x20 or 0x7F <= ord(c) <= 0x9F or c == "\\" for c in value):
        raise refuse("must not contain spaces, control characters or backslashes")
    try:
        parts = urlsplit(value)
        host = parts.hostname
        _ = parts.port  # a port that is no number is refused here
    except ValueError as exc:
        raise refuse("is not a valid URL") from exc
    if parts.scheme.lower() not in ("http", "https") or not host:
        raise refuse("must be an absolute http or https URL")
    return value


def with_session_id(url: str, session_id: str) -> str:
    """``url`` with the session id: in place of ``{CHECKOUT_SESSION_ID}`` when it holds one (Stripe's convention),
    else as a ``session_id`` query parameter (the other parameters and the fragment kept)."""
    if SESSION_ID_PLACEHOLDER in url:
        return url.replace(SESSION_ID_PLACEHOLDER, session_id)
    parts = urlsplit(url)
    query = urlencode([*parse_qsl(parts.query, keep_blank_values=True), ("session_id", session_id)])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def checkout_page_url(base_url: str, session_id: str) -> str:
    """The hosted page of a session under ``base_url`` (the API's public base URL)."""
    return f"{base_url.rstrip('/')}/checkout/{session_id}"


def _now() -> datetime:
    return datetime.now(UTC)


def _status(row: dict[str, Any], now: datetime) -> str:
    if row["status"] == COMPLETE:
        return COMPLETE
    return EXPIRED if now >= row["expires_at"] else OPEN


def _session(row: dict[str, Any], now: datetime | None = None) -> CheckoutSession:
    fields = {k: row[k] for k in CheckoutSession.model_fields if k != "status"}
    return CheckoutSession(status=_status(row, now or _now()), **fields)


async def create_checkout_session(pool: AsyncConnectionPool, policy: TopUpPolicy, *, account_id: str,
                                  success_url: str, cancel_url: str, package_id: str | None = None,
                                  amount_usd: object = None, idempotency_key: str | None = None,
                                  expires_in: timedelta = timedelta(hours=24), mode: str = PAYMENT,
                                  set_default: bool = False) -> tuple[CheckoutSession, bool]:
    """A new open session for ``package_id`` or ``amount_usd`` (exactly one, by the top-up rules), or in ``mode``
    setup for neither (the page saves a card, the default when ``set_default``); returns it and
    whether it was created now. With an ``idempotency_key`` the same request returns the session it created, another
    request under that key is ``idempotency_conflict``. Nothing is written for a refused request."""
    if mode == SETUP:
        if package_id is not None or amount_usd is not None:
            raise CreditflowError("invalid_amount", "a setup session saves a card and buys nothing: send no package "
                                  "or amount", param="amount" if package_id is None else "package_id")
        amount_cents, credits, package, description = 0, 0, None, SETUP_DESCRIPTION
    elif mode == PAYMENT:
        try:
            q = quote(policy, amount_usd=amount_usd, package_id=package_id)
        except TopUpError as exc:
            param = "package_id" if exc.code == "unknown_package" else "amount"
            raise CreditflowError(exc.code, str(exc), param=param) from exc
        amount_cents, credits, package, description = q.amount_cents, q.credits, q.package_id, q.description
        if set_default:  # a paid card is never made the default behind the buyer's back (docs/checkout.md)
            raise CreditflowError("validation_error", "set_default applies to mode setup only", param="set_default")
    else:
        raise CreditflowError("validation_error", "mode must be payment or setup", param="mode")
    success_url = validate_return_url(success_url, "success_url")
    cancel_url = validate_return_url(cancel_url, "cancel_url")
    parts: tuple[object, ...] = (account_id, amount_cents, credits, package, success_url, cancel_url)
    if mode == SETUP:  # a payment session's fingerprint stays what it was (keys stored before setup mode existed)
        parts += (mode, set_default)
    fingerprint = request_hash("checkout.session", *parts)
    session_id = new_id("cs")
    async with pool.connection() as conn:
        if await (await conn.execute("SELECT 1 FROM accounts WHERE id = %s", (account_id,))).fetchone() is None:
            raise CreditflowError("unknown_account", f"no account {account_id}", param="account_id")
        row = await (await conn.execute(
            "INSERT INTO checkout_sessions (id, account_id, amount_cents, credits, package_id, description,"
            " success_url, cancel_url, csrf_token, idempotency_key, request_hash, expires_at, mode, set_default)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now() + %s, %s, %s)"
            " ON CONFLICT (account_id, idempotency_key) DO NOTHING RETURNING *",
            (session_id, account_id, amount_cents, credits, package, description, success_url,
             cancel_url, secrets.token_urlsafe(32), idempotency_key, fingerprint, expires_in, mode,
             set_default))).fetchone()
        if row is not None:
            return _session(row), True
        row = await (await conn.execute(
            "SELECT * FROM checkout_sessions WHERE account_id = %s AND idempotency_key = %s",
            (account_id, idempotency_key))).fetchone()
    assert row is not None
    if bytes(row["request_hash"]) != fingerprint:
        raise CreditflowError("idempotency_conflict",
                              f"Idempotency-Key {idempotency_key} was already used for another checkout session",
                              param="Idempotency-Key")
    return await _refreshed(pool, row), False


async def _refreshed(pool: AsyncConnectionPool, row: dict[str, Any]) -> CheckoutSession:
    """The session as of now: an open session whose charge has been credited (the buyer may have left before the
    answer) is completed here."""
    if row["status"] == COMPLETE or row["charge_request_id"] is None:
        return _session(row)
    async with pool.connection() as conn:
        charge = await (await conn.execute(
            "SELECT status, ledger_txn_id FROM stripe_charges WHERE account_id = %s AND kind = %s AND request_id = %s",
            (row["account_id"], KIND_TOPUP, row["charge_request_id"]))).fetchone()
    if charge is None or charge["status"] != "succeeded":
        return _session(row)
    return await _complete(pool, row["id"], charge["ledger_txn_id"])


async def _complete(pool: AsyncConnectionPool, session_id: str, transaction_id: str | None) -> CheckoutSession:
    async with pool.connection() as conn:
        await conn.execute(
            "UPDATE checkout_sessions SET status = 'complete', transaction_id = %s, completed_at = now()"
            " WHERE id = %s AND status = 'open'", (transaction_id, session_id))
        row = await (await conn.execute("SELECT * FROM checkout_sessions WHERE id = %s", (session_id,))).fetchone()
    assert row is not None
    return _session(row)


async def get_checkout_session(pool: AsyncConnectionPool, session_id: str, *,
                               account_id: str | None = None) -> CheckoutSession:
    """The session as of now. ``account_id``: the caller's account (API keys); another account's session is
    ``unknown_checkout_session``, as is a malformed or unknown id. None: the hosted page (the id is the capability)."""
    if not SESSION_ID.match(session_id or ""):
        raise CreditflowError("unknown_checkout_session", "no such checkout session")
    async with pool.connection() as conn:
        row = await (await conn.execute("SELECT * FROM checkout_sessions WHERE id = %s", (session_id,))).fetchone()
    if row is None or (account_id is not None and row["account_id"] != account_id):
        raise CreditflowError("unknown_checkout_session", "no such checkout session")
    return await _refreshed(pool, row)


def check_csrf(session: CheckoutSession, token: str | None) -> None:
    """The page's POSTs carry the token rendered into it; compared in constant time."""
    if not token or not hmac.compare_digest(token.encode(), session.csrf_token.encode()):
        raise CreditflowError("csrf_token_invalid", "this request did not come from the checkout page; reload it")


def _open(session: CheckoutSession) -> None:
    if session.status == EXPIRED:
        raise CreditflowError("checkout_session_expired", "this checkout link has expired")


async def setup_card(pool: AsyncConnectionPool, gateway: StripeGateway, session_id: str,
                     csrf_token: str | None) -> SetupIntentState:
    """The SetupIntent the page confirms the buyer's card with (Stripe.js ``confirmCardSetup``): the session's
    current one while it still waits for a card, else a new one (after a declined card, or a card confirmed but
    not charged). Created for the account's Stripe customer, tagged with the session id."""
    session = await get_checkout_session(pool, session_id)
    check_csrf(session, csrf_token)
    _open(session)
    if session.status == COMPLETE:
        raise CreditflowError("checkout_session_complete", "this checkout session is already complete")
    customer_id = await ensure_customer(pool, gateway, session.account_id)
    async with pool.connection() as conn, conn.transaction():  # one SetupIntent at a time per session
        row = await (await conn.execute("SELECT setup_intent_id, setup_intents FROM checkout_sessions WHERE id = %s"
                                        " FOR UPDATE", (session.id,))).fetchone()
        assert row is not None
        if row["setup_intent_id"] is not None:
            current = await gateway.retrieve_setup_intent(row["setup_intent_id"])
            if current.status in ("requires_payment_method", "requires_confirmation", "requires_action"):
                return current
        n = row["setup_intents"] + 1
        created = await gateway.create_setup_intent(
            customer_id=customer_id, idempotency_key=f"creditflow:checkout:{session.id}:seti:{n}",
            metadata={ACCOUNT_METADATA_KEY: session.account_id, SESSION_METADATA_KEY: session.id})
        await conn.execute("UPDATE checkout_sessions SET setup_intent_id = %s, setup_intents = %s WHERE id = %s",
                           (created.id, n, session.id))
    return created


async def _confirmed_card(pool: AsyncConnectionPool, gateway: StripeGateway, session: CheckoutSession,
                          setup_intent_id: str, payment_method_id: str) -> str:
    """The card the buyer confirmed on this session's SetupIntent, saved on the account's customer (made the default
    only by a setup session asked to). Anything else (another session's SetupIntent, one not confirmed, another
    card) is refused."""
    refused = CreditflowError("payment_method_invalid", "confirm the card on this checkout page first",
                              param="payment_method")
    if not SETUP_INTENT_ID.match(setup_intent_id) or not PAYMENT_METHOD_ID.match(payment_method_id):
        raise refused
    seti = await gateway.retrieve_setup_intent(setup_intent_id)
    if (seti.metadata.get(SESSION_METADATA_KEY) != session.id or seti.status != "succeeded"
            or seti.payment_method_id != payment_method_id):
        raise refused
    card = await attach_method(pool, gateway, session.account_id, payment_method_id,
                               set_default=True if session.set_default else (None if session.mode == SETUP else False))
    return card.id


async def _charge_request(pool: AsyncConnectionPool, session: CheckoutSession, card: str) -> tuple[str, str]:
    """The top-up request id paying the session and the card its terms name: the charge in flight (or paid) is
    joined with its own card; after a failed attempt another card starts attempt n+1, the same card gets the same
    refusal again (a failed charge is never repeated)."""
    async with pool.connection() as conn, conn.transaction():
        row = await (await conn.execute("SELECT * FROM checkout_sessions WHERE id = %s FOR UPDATE",
                                        (session.id,))).fetchone()
        assert row is not None
        current = _session(row)
        if current.charge_request_id is not None:
            charge = await (await conn.execute(
                "SELECT status, requested_payment_method_id FROM stripe_charges"
                " WHERE account_id = %s AND kind = %s AND request_id = %s",
                (current.account_id, KIND_TOPUP, current.charge_request_id))).fetchone()
            if charge is None:  # the workflow has not written its row yet (or refused before it)
                return current.charge_request_id, card
            # In flight or paid: join it. Declined with this very card: the same request (the same decline).
            # Canceled (its payment window closed unpaid) or declined with another card: a new attempt.
            if charge["status"] not in ("failed", "canceled") or (
                    charge["status"] == "failed" and charge["requested_payment_method_id"] == card):
                return current.charge_request_id, charge["requested_payment_method_id"] or card
        _open(current)  # a new attempt starts only while the link is open
        attempt = current.charge_attempts + 1
        request_id = f"checkout:{current.id}" if attempt == 1 else f"checkout:{current.id}:{attempt}"
        await conn.execute("UPDATE checkout_sessions SET charge_request_id = %s, charge_attempts = %s WHERE id = %s",
                           (request_id, attempt, current.id))
    return request_id, card


async def pay(pool: AsyncConnectionPool, gateway: StripeGateway, temporal: Callable[[], Awaitable[CreditflowClient]],
              settings: Settings, session_id: str, *, csrf_token: str | None, setup_intent_id: str,
              payment_method_id: str) -> PayResult:
    """Charge the card the page confirmed (``setup_intent_id`` / ``payment_method_id``) for the session, through
    the top-up workflow, and say where the page goes next. Safe to repeat: a paid session answers its redirect, a
    charge in flight is joined. A decline is ``card_declined`` (402): nothing charged, another card may be tried.
    ``temporal``: connects on first use (``app.state.temporal.get``), so a paid session answers while Temporal is
    down."""
    session = await get_checkout_session(pool, session_id)
    check_csrf(session, csrf_token)
    if session.mode == SETUP:
        return await _save_card(pool, gateway, temporal, session, setup_intent_id, payment_method_id)
    if session.status == COMPLETE:
        return _paid(session)
    if session.charge_request_id is None:
        _open(session)  # expired before any attempt: refused before Stripe is asked anything
    card = await _confirmed_card(pool, gateway, session, setup_intent_id, payment_method_id)
    request_id, card = await _charge_request(pool, session, card)
    input = TopUpInput(
        account_id=session.account_id, request_id=request_id, description=session.description,
        terms=TopUpTerms(amount_cents=session.amount_cents, credits=session.credits, package_id=session.package_id,
                         payment_method_id=card),
        payment_expiry_seconds=settings.topup_payment_expiry_seconds,
        poll_interval_seconds=settings.topup_poll_interval_seconds)
    outcome = await (await temporal()).topup(input, wait=timedelta(seconds=settings.topup_answer_timeout_seconds))
    if outcome is None:
        return PayResult(status=PAY_PROCESSING)
    if outcome.status == TOPUP_SUCCEEDED:
        return _paid(await _complete(pool, session.id, outcome.transaction_id))
    if outcome.status == TOPUP_REQUIRES_PAYMENT and outcome.client_secret:
        return PayResult(status=PAY_REQUIRES_ACTION, client_secret=outcome.client_secret)
    if outcome.status == TOPUP_FAILED:
        details: dict[str, object] = {}
        if outcome.decline_code is not None or outcome.error_code == "card_declined":
            details["decline_code"] = outcome.decline_code
        raise CreditflowError(outcome.error_code or "payment_failed", outcome.error_message, details=details)
    # canceled (the payment window closed) or still pending
    if outcome.status == TOPUP_REQUIRES_PAYMENT:
        return PayResult(status=PAY_PROCESSING)
    raise CreditflowError("checkout_payment_canceled", "the payment was not completed; try again")


def _paid(session: CheckoutSession) -> PayResult:
    return PayResult(status=PAY_COMPLETE, redirect_url=session.success_redirect, credits=session.credits,
                     transaction_id=session.transaction_id)


async def _save_card(pool: AsyncConnectionPool, gateway: StripeGateway,
                     temporal: Callable[[], Awaitable[CreditflowClient]], session: CheckoutSession,
                     setup_intent_id: str, payment_method_id: str) -> PayResult:
    """A setup session's end: the confirmed card saved on the account's customer (the default if the session says
    so, or if the account has none), the session complete, and the account's past-due invoices tried with the new
    card, as when a card is added through the API. Safe to repeat: a complete session answers its redirect."""
    if session.status == COMPLETE:
        return _saved(session)
    _open(session)
    card = await _confirmed_card(pool, gateway, session, setup_intent_id, payment_method_id)
    async with pool.connection() as conn:
        row = await (await conn.execute(
            "UPDATE checkout_sessions SET status = 'complete', payment_method_id = %s, completed_at = now()"
            " WHERE id = %s AND status = 'open' RETURNING *", (card, session.id))).fetchone()
    if row is None:  # completed meanwhile (a second tab): the same answer
        return _saved(await get_checkout_session(pool, session.id))
    await pay_now.card_saved(pool, gateway, temporal, session.account_id, card)
    return _saved(_session(row))


def _saved(session: CheckoutSession) -> PayResult:
    return PayResult(status=PAY_COMPLETE, redirect_url=session.success_redirect,
                     payment_method_id=session.payment_method_id)
